"""Importing this puts the repository root first on `sys.path`.

Benchmarks must measure the pipeline of the checkout they sit in. `python bench/x.py` puts only
bench/ on the path, so `import pipeline` would find whichever copy is installed (an editable
install of another checkout, say), while Ray's workers, started in the working directory,
import this one: a driver and workers of two versions. Import this before `pipeline`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))
