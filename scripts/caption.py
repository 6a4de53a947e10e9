#!/usr/bin/env python
"""Same as ``capstream run FILE``: ``python scripts/caption.py --config FILE [--set k=v ...]``."""

import argparse
import sys

from capstream.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML config file")
    args, rest = parser.parse_known_args()
    sys.exit(main(["run", args.config, *rest]))
