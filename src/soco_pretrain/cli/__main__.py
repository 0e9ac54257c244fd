"""``python -m soco_pretrain.cli`` runs the ``soco`` command line."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
