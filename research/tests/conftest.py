"""The research probes' tests borrow the main suite's fixtures (the default target, real photos, videos).

``tests/conftest.py`` is loaded under its own module name and its fixtures re-exported here, so both
suites share one definition of each fixture.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:  # run as `pytest research/tests` from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("flash_tests_conftest", ROOT / "tests" / "conftest.py")
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)

smollm2_target = _main.smollm2_target
photos = _main.photos
videos = _main.videos
