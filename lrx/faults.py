"""Fault injection for tests: the one place that reads ``LRX_FAULT``.

``LRX_FAULT`` holds comma-separated faults ``KIND@POINT[@rank=R][@attempt=A]`` that lrx's own code fires
at a few named points, so the tests of stopping, hangs, full disks and restarts run the real
code paths (through ``launch/train.py``, torchrun and the SLURM templates) without patching:

- kinds: ``crash`` (the process exits at once with status 1, as a killed one would),
  ``hang`` (it sleeps for an hour), ``pause`` (it sleeps for 2 seconds), ``enospc`` (the write raises ``OSError(ENOSPC)``),
  ``sigterm`` / ``sigint`` / ``sigusr1`` (the process sends itself that signal);
- points: ``step:N`` (inside optimizer step N, after its backward, before the optimizer step
  and the method's hook: an SRLoRA event of step N runs after it), ``checkpoint:N`` (in the
  middle of writing checkpoint N: some of its files are written), ``write:PARENT/NAME`` (an
  atomic write of the folder ``NAME`` in ``PARENT``, e.g. ``write:my-run/adapter``, once its
  files are in the temporary folder);
- ``@rank=R``: only on process R (default: every process);
- ``@attempt=A``: only in workers that ``torchrun --max-restarts`` started for the A-th time
  (``TORCHELASTIC_RESTART_COUNT``; the first attempt is 0; default: every attempt).

A fault fires at most once per process. Unset (as for every user) nothing here does anything.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import time

ENV = "LRX_FAULT"
KINDS = ("crash", "hang", "pause", "enospc", "sigterm", "sigint", "sigusr1")


@functools.cache
def planned() -> tuple[tuple[str, str, int | None], ...]:
    """The faults ``LRX_FAULT`` asks for in this attempt, as (kind, point, rank or None)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    out = []
    for spec in filter(None, (x.strip() for x in os.environ.get(ENV, "").split(","))):
        kind, point, *extra = spec.split("@")
        where = dict(x.split("=", 1) for x in extra if "=" in x)
        if kind not in KINDS or len(where) != len(extra) or set(where) - {"rank", "attempt"}:
            raise ValueError(f"{ENV}: {spec!r} is not KIND@POINT[@rank=R][@attempt=A] with KIND one of {', '.join(KINDS)}")
        if where.get("attempt", attempt) == attempt:
            out.append((kind, point, int(where["rank"]) if "rank" in where else None))
    return tuple(out)


_fired: set[int] = set()


def reset() -> None:
    """Read ``LRX_FAULT`` again (tests that change it in-process)."""
    planned.cache_clear()
    _fired.clear()


def fire(point: str, rank: int = 0) -> None:
    """Cause the faults planned at ``point`` on process ``rank`` (nothing when ``LRX_FAULT`` is unset)."""
    for index, (kind, where, only) in enumerate(planned()):
        if where != point or (only is not None and only != rank) or index in _fired:
            continue
        _fired.add(index)
        print(f"LRX_FAULT: {kind} at {point} on rank {rank}", file=sys.stderr, flush=True)
        if kind == "crash":
            os._exit(1)
        if kind in ("hang", "pause"):
            time.sleep(3600 if kind == "hang" else 2)
        if kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if kind.startswith("sig"):
            os.kill(os.getpid(), getattr(signal, kind.upper()))
            time.sleep(0.2)  # the handling thread takes it now, not after the rest of the step
