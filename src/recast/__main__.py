"""``python -m recast`` runs the command line (also what ``torchrun -m recast`` uses)."""

import sys

from recast.cli import main

if __name__ == "__main__":
    sys.exit(main())
