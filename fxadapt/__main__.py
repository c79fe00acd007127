"""``python -m fxadapt``: the same as the ``fxadapt`` console script (see :mod:`fxadapt.cli`)."""

import sys

from .cli import main

sys.exit(main())
