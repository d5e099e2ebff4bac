"""``python -m gradsentry``."""

import sys

from gradsentry.cli import main

if __name__ == "__main__":
    sys.exit(main())
