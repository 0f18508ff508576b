"""Benchmark trioserve against its peers: ``python benchmarks/run.py --help``.

The harness is the package ``benchmarks`` (see its ``__init__``); this
script runs its command line, :mod:`benchmarks.cli`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this directory is first on sys.path; the package
    # lives in its parent, with the trioserve being measured.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from benchmarks.cli import main

    sys.exit(main())
