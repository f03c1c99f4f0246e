"""``launch/train.py`` with fault injection, for the kill-and-resume tests.

    python tests/train_killed.py --kill-at-step N ARGS...   (or under torchrun / deepspeed)

Trains like ``launch/train.py ARGS...``, except that rank 0 sends itself SIGKILL right after
step N's logging, evaluation and checkpoint (a trainer callback, added by this script only, or
by ``tests/train_many.py`` for a run with ``"kill_at_step"``: ``killed_after``).
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx import cli, runner  # noqa: E402


@contextlib.contextmanager
def killed_after(step: int):
    """Runs started inside: rank 0 sends itself SIGKILL right after step ``step``."""

    def kill(trainer) -> None:
        if trainer.step == step and trainer.backend.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    class KilledTrainer(runner.Trainer):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, kill], **kwargs)

    plain = runner.Trainer
    runner.Trainer = KilledTrainer
    try:
        yield
    finally:
        runner.Trainer = plain


def main() -> int:
    argv = sys.argv[1:]
    at = argv.index("--kill-at-step")
    step = int(argv[at + 1])
    del argv[at : at + 2]
    with killed_after(step):
        return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
