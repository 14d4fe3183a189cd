#!/usr/bin/env python
"""`python benchmarks/run.py [options]`: the OGPSA overhead benchmark (`ogpsa_bench/`, benchmarks/README.md).

This file only puts its folder on the path (as running it as a script does) and calls the package's
command line, so the documented command keeps working; `--help` lists the options.
"""

import sys

from ogpsa_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
