"""The security suite: each test reproduces one attack (issue 20) against real processes, real
files and a real registry, and checks that it is refused. Every one of them failed on the code
before the fix."""

import sys
from pathlib import Path

# The attacks reuse the suite's helpers (tests/*.py, tests/reliability/*.py) as top-level modules,
# as pytest's rootdir import does when the whole suite is collected; a lone security file needs it too.
for _folder in (Path(__file__).resolve().parent.parent, Path(__file__).resolve().parent.parent / "reliability"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))
