"""`python -m kleinbild ...`: the same as the `kleinbild` command."""

import sys

from kleinbild.cli import main

if __name__ == "__main__":
    sys.exit(main())
