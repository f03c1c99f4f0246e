"""What the multi-process test scripts (``tests/dist_*.py``, ``tests/train_many.py``) share:
writing rank 0's report, several backends in one launch, leaving without interpreter
finalization."""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist


def finish(backend, out: str, report: dict) -> None:
    """Rank 0 writes ``report`` as JSON to ``out``; every rank leaves the process group."""
    if backend.is_main:
        Path(out).write_text(json.dumps(report))
    backend.close()


@contextlib.contextmanager
def one_process_group():
    """Backends built one after another in these processes (several runs in one launch) share
    the process group the first one joins: a backend's ``close`` leaves it with a barrier instead
    of destroying it (joining a new group in the same processes hangs under torchrun); it is
    destroyed at the end. A launch costs each process ~7 s of imports, a tiny run a second or two."""
    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda group=None: dist.barrier() if group is None else destroy(group)
    try:
        yield
    finally:
        dist.destroy_process_group = destroy
    if dist.is_initialized():
        destroy()


def run(main) -> None:
    """``main()``, then exit at once: everything is done and written, and in interpreter
    finalization gloo's threads can still abort a CPU process ("terminate called without an
    active exception", SIGABRT)."""
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
