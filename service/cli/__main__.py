"""``python -m service.cli``: the command line, as ``mnist-service``."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main())
