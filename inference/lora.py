#!/usr/bin/env python
"""Same as `sd3fit infer lora`: run with the project's environment, e.g. `.venv/bin/python inference/lora.py --help`."""

import sys

from sd3fit.cli import main

sys.exit(main(["infer", "lora", *sys.argv[1:]]))
