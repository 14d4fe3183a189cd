"""`python -m ogpsa_bench ...` (from benchmarks/): the benchmark's command line (`cli.py`)."""

import sys

from .cli import main

sys.exit(main())
