"""What the multi-process test scripts (``tests/dist_*.py``) share: writing rank 0's report and
leaving without interpreter finalization."""

import json
import os
import sys
from pathlib import Path


def finish(backend, out: str, report: dict) -> None:
    """Rank 0 writes ``report`` as JSON to ``out``; every rank leaves the process group."""
    if backend.is_main:
        Path(out).write_text(json.dumps(report))
    backend.close()


def run(main) -> None:
    """``main()``, then exit at once: everything is done and written, and in interpreter
    finalization gloo's threads can still abort a CPU process ("terminate called without an
    active exception", SIGABRT)."""
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
