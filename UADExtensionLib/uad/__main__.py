"""``python -m uad``: the same as the ``uad`` command (used by the Slicer module's subprocess)."""

import sys

from uad.cli import main

sys.exit(main())
