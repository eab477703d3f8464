"""The algorithm scripts, one file each, and the module they share (plumbing.py).

A script imports its shared module as a sibling (`import plumbing`), which works when it runs as a file
(`python cleanrl_style/ppo.py`); this line makes it work when a script is imported as part of the package too
(`from cleanrl_style import ppo`, as the tests and the benchmarks do)."""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
