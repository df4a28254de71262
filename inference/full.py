#!/usr/bin/env python
"""Same as `sd3fit infer full`: run with the project's environment, e.g. `.venv/bin/python inference/full.py --help`."""

import sys

from sd3fit.cli import main

sys.exit(main(["infer", "full", *sys.argv[1:]]))
