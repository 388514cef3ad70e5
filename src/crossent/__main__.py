"""``python -m crossent``: the same command line as ``crossent``."""

import sys

from crossent.cli import main

if __name__ == "__main__":
    sys.exit(main())
