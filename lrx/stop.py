"""Stopping a run on request: signals (``train.stop_signals``) and the SLURM templates' stop file.

A first signal (SIGTERM, SIGINT or SIGUSR1 by default), or the file named by ``LRX_STOP_FILE``
appearing, asks the run to stop. Every process finishes its current optimizer step (an
SRLoRA event of that step included); at the step's end one collective (``Backend.any_rank``)
tells every process whether any of them was asked, so all stop after the same step; they
write a complete checkpoint (unless that step wrote one) and exit with ``EXIT_STOPPED``
(75, "stopped, resumable": ``--resume auto`` continues exactly).

A second signal at least ``REPEAT_AFTER_S`` after the first, or ``train.stop_grace_s``
seconds after it, exits at once with status 128 + the signal's number, whatever the main
thread is doing (a thread watches the signals through Python's wakeup file descriptor, so a
main thread blocked in a collective does not delay it). Checkpoints are written into a
temporary folder and renamed once complete, so the newest complete checkpoint is intact.
Repeats within ``REPEAT_AFTER_S`` count as one: under torchrun a terminal's Ctrl-C, or
SLURM's SIGTERM to every process of a step, reaches a worker twice, directly and forwarded by
torchrun.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retrying is expected to work
REPEAT_AFTER_S = 1.0
STOP_FILE_ENV = "LRX_STOP_FILE"


class Stopped(Exception):
    """The run stopped on request after a complete checkpoint; ``--resume auto`` continues it."""

    def __init__(self, step: int, checkpoint: Path, reason: str, main: bool = True):
        self.step, self.checkpoint, self.reason, self.main = step, checkpoint, reason, main
        super().__init__(f"stopped at step {step} ({reason}); checkpoint {checkpoint} is complete: continue the run "
                         f"with --resume auto (exit status {EXIT_STOPPED})")


def stop_file() -> Path | None:
    """The file whose appearance asks the run to stop (``LRX_STOP_FILE``; the SLURM templates set it)."""
    value = os.environ.get(STOP_FILE_ENV)
    return Path(value) if value else None


def _noop(signum, frame) -> None:
    """The Python-level handler: the watcher thread does the work (see the module docstring)."""


class StopRequest:
    """Signal handling for one run, installed by the runner around training.

    Args:
        signals: names of the signals that ask for a stop (``TERM``, ``SIGUSR1`` ...).
        grace_s: seconds after the first signal before the process exits at once (0 = no deadline).
    """

    def __init__(self, signals: list[str], grace_s: float = 0.0):
        self.signals = [signal_number(name) for name in signals]
        self.grace_s = grace_s
        self.first: float | None = None
        self.signum: int | None = None
        self._old: dict[int, object] = {}
        self._wakeup = None

    def reason(self, look: bool = True) -> str | None:
        """Why this process was asked to stop (None: it was not); ``look``: also whether the stop
        file exists (one process looks: a shared file system is asked once per step)."""
        if self.signum is not None:
            return signal.Signals(self.signum).name
        file = stop_file() if look else None
        return f"{file} appeared" if file is not None and file.exists() else None

    def install(self) -> "StopRequest":
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._old = {sig: signal.signal(sig, _noop) for sig in self.signals}
        self._wakeup = (write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
        threading.Thread(target=self._watch, args=(read,), name="lrx-stop", daemon=True).start()
        return self

    def uninstall(self) -> None:
        if self._wakeup is None:
            return
        write, old_fd = self._wakeup
        signal.set_wakeup_fd(old_fd)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        os.close(write)  # the watcher reads end-of-file and leaves
        self._wakeup = None

    def _watch(self, read: int) -> None:
        while True:
            wait = None if self.first is None or not self.grace_s else max(0.0, self.first + self.grace_s - time.monotonic())
            if not select.select([read], [], [], wait)[0]:
                self._exit_now(f"train.stop_grace_s={self.grace_s:g} s passed since {self.reason()}")
            data = os.read(read, 64)
            if not data:
                os.close(read)
                return
            for number in data:
                if number in self.signals:
                    self._signalled(number)

    def _signalled(self, number: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.signum = now, number
            log.warning("%s: stopping after this optimizer step with a complete checkpoint (a second signal exits "
                        "at once)", signal.Signals(number).name)
        elif now - self.first >= REPEAT_AFTER_S:
            self._exit_now(f"a second signal ({signal.Signals(number).name})")

    def _exit_now(self, why: str) -> None:
        sys.stderr.write(f"error: {why}: exiting at once; the newest complete checkpoint is intact: continue with "
                         "--resume auto\n")
        sys.stderr.flush()
        os._exit(128 + (self.signum or signal.SIGTERM))

    def agreed(self, backend) -> str | None:
        """Whether any process was asked to stop (collective: every process calls it after every
        step); the reason this process knows, or None."""
        reason = self.reason(look=backend.is_main)
        if backend.any_rank(reason is not None):
            return reason or "asked on another process"
        return None

    def record(self, stopped: Stopped) -> None:
        """After a stop: the stop file (if any) says so, for the SLURM template's requeue."""
        file = stop_file()
        if file is not None:
            file.write_text(f"stopped {stopped.step} {stopped.checkpoint}\n")


def signal_number(name: str) -> int:
    """``TERM``, ``SIGTERM`` or ``15`` -> 15; ValueError for anything else."""
    text = name.strip().upper()
    number = signal.Signals(int(text)) if text.isdigit() else signal.Signals["SIG" + text.removeprefix("SIG")]
    if number in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{number.name} cannot be caught")
    return int(number)
