"""`python -m ktgen ...`: the same as the `ktgen` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
