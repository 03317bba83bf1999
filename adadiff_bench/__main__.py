"""`python -m adadiff_bench` is the `adadiff-bench` command."""
import sys

from .cli import main

sys.exit(main())
