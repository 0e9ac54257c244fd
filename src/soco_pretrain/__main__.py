"""``python -m soco_pretrain`` runs the ``soco`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
