#!/usr/bin/env python
"""Same as `sd3fit infer base`: run with the project's environment, e.g. `.venv/bin/python inference/base.py --help`."""

import sys

from sd3fit.cli import main

sys.exit(main(["infer", "base", *sys.argv[1:]]))
