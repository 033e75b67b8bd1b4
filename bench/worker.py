"""Run one benchmark case in this (fresh) process: `python bench/worker.py SPEC.json RESULT.json` (the
`--isolation subprocess` mode of bench/run.py).

SPEC names a module of bench/, a function in it and its keyword arguments; the function returns a dict of numbers,
to which the process's peak resident set size is added before it is written to RESULT.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import Case, _call  # noqa: E402


def main(spec_path: str, result_path: str) -> None:
    """Import the case's module, call its function and write the result with the process's peak RSS."""
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    result = _call(Case(spec["module"], spec["module"], spec["function"], spec.get("kwargs", {})))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
