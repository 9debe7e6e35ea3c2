"""``python -m flash``: see :mod:`flash.cli`."""

import sys

from flash.cli import main

sys.exit(main())
