"""Disk space: one-line errors for a full disk or quota, and the warning before a run starts.

A checkpoint or an adapter is written into a temporary folder and renamed once complete
(``lrx.checkpoint.save_checkpoint``, ``lrx.fileio.atomic_dir``); when a write fails with
``ENOSPC`` or ``EDQUOT`` the temporary folder is removed and the error names the folder, the
bytes the write needed and the bytes free, so the previous complete checkpoint stays the one
``--resume auto`` takes.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import torch

from lrx.errors import LrxError

log = logging.getLogger(__name__)

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(LrxError):
    """A write ran out of space; ``error`` is the ``OSError`` it met."""

    def __init__(self, message: str, error: OSError):
        super().__init__(message)
        self.error = error


def is_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that ran out of space (or hit a quota)."""
    return isinstance(error, OSError) and error.errno in FULL


def tensor_bytes(*groups) -> int:
    """Bytes of the tensors in dicts of tensors (what a file of them takes, headers aside)."""
    return sum(t.numel() * t.element_size() for group in groups for t in group.values() if isinstance(t, torch.Tensor))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.2f} {unit}"
        n /= 1000
    return ""


def full_error(folder: Path, needed: int, error: OSError, intact: str) -> DiskFull:
    """The one line for a write into ``folder`` that ran out of space; ``intact``: what is left as it was."""
    return DiskFull(f"{folder}: {error.strerror or 'no space left'}: the write needs about {size(needed)} and "
                     f"{size(free_bytes(folder))} are free; its partial files were removed and {intact}; free space "
                     "(or raise the quota) or write elsewhere, then run again", error)


def warn_if_short(folder: Path, needed: int) -> bool:
    """Warn (once, on the calling process) when ``folder``'s disk has less than ``needed`` bytes free."""
    free = free_bytes(folder)
    if free >= needed:
        return False
    log.warning("%s has %s free, less than one checkpoint plus the adapter (about %s): the run will fail when "
                "it writes them; free space or set logging.output_dir on another disk", folder, size(free), size(needed))
    return True
