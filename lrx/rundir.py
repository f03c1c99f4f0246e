"""Ownership of the folders lrx writes: runs, exports, bases.

lrx deletes or replaces only what it wrote itself, in a folder it recognises as its own.
A folder lrx writes carries a marker, ``.lrx.json``, naming its kind (``run``, ``peft``) and
the entries lrx owns in it. ``--overwrite`` removes exactly those entries (a user's own files
in the folder stay); a folder without the marker is never emptied. A run folder is checked
(``check_run_dir``: writes nothing) before any slow loading and claimed (``claim_run_dir``:
old run removed, marker written) only when the runner is about to write its first file, so a
rejected config never costs the previous run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lrx.errors import LrxError

MARKER = ".lrx.json"
FORMAT = "lrx-owned"
# Every entry a run writes into its folder (the runner, trainer, checkpoints, method reports).
RUN_ENTRIES = (
    "config.yaml", "metrics.jsonl", "method_events.jsonl", "summary.json", "loss.png", "tb", "adapter",
    "adapter_peft", "checkpoints", "srlora_lifetimes.json", "srlora_lifetimes.png",
)
# What ``write_peft`` writes (tools' ``export --peft``).
PEFT_ENTRIES = ("adapter_config.json", "adapter_model.safetensors")


def read_marker(path: Path) -> dict | None:
    """The marker of an lrx folder, or None if it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def write_marker(path: Path, kind: str, entries: tuple[str, ...]) -> None:
    (Path(path) / MARKER).write_text(json.dumps({"format": FORMAT, "kind": kind, "owned": list(entries)}, indent=2))


def check_writable(path: Path, key: str) -> None:
    """Refuse an output path that is a file, lies under a file, or cannot be written.

    Raises:
        LrxError: naming ``key`` (the setting or argument) and the fix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LrxError(f"{key}={path} is a file; choose a folder")
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise LrxError(f"{key}={path}: {existing} is a broken symbolic link; choose another folder")
        existing = existing.parent
    if not existing.is_dir():
        raise LrxError(f"{key}={path} lies under the file {existing}; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LrxError(f"{key}={path}: no permission to write in {existing}; choose a folder you can write")


def _present(path: Path, owned: tuple[str, ...]) -> list[str]:
    """The entries of ``path`` that have names lrx writes."""
    return sorted(name for name in owned if (path / name).exists() or (path / name).is_symlink())


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds a run: lrx's marker, or any entry a run writes."""
    path = Path(path)
    if not path.is_dir():
        return False
    marker = read_marker(path)
    return (marker is not None and marker.get("kind") == "run") or bool(_present(path, RUN_ENTRIES))


def ended_early(path: Path) -> bool:
    """Whether ``path`` holds a run lrx marked as its own that has no outputs yet (no adapter,
    no summary.json). Of such a run without a complete checkpoint (one that stopped before its
    first) nothing is lost when ``--resume auto`` starts it again from step 0."""
    marker = read_marker(path) if Path(path).is_dir() else None
    return marker is not None and marker.get("kind") == "run" and \
        not any((Path(path) / name).exists() for name in ("adapter", "summary.json"))


def checkpoint_run(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``RUN/checkpoints/step-N`` -> ``RUN``)."""
    return Path(checkpoint).resolve().parent.parent


def check_run_dir(path: str | Path, overwrite: bool, resume: Path | None = None) -> None:
    """Check that a run may write into ``path``; writes nothing.

    Args:
        path: ``logging.output_dir``.
        overwrite: ``--overwrite``: replace a run lrx wrote there.
        resume: the checkpoint being resumed, if any.

    Raises:
        LrxError: the folder cannot be written, holds another run (without ``overwrite``), or
            holds files lrx did not mark as its own where ``overwrite`` would delete.
    """
    path = Path(path)
    check_writable(path, "logging.output_dir")
    if resume is not None and checkpoint_run(resume) == path.resolve():
        return  # continuing the run in its own folder
    if not holds_run(path):
        return
    if resume is not None and not overwrite:
        raise LrxError(
            f"--resume {resume} continues the run in {checkpoint_run(resume)}, but logging.output_dir={path} holds "
            f"another run; set logging.output_dir={checkpoint_run(resume)}, a new folder, or pass --overwrite "
            f"to replace the run in {path}"
        )
    if not overwrite:
        raise LrxError(f"{path} already holds a run; pass --overwrite to replace it or set logging.output_dir=NEW_DIR")
    marker = read_marker(path)
    if marker is None or marker.get("kind") != "run":
        found = _present(path, RUN_ENTRIES)
        raise LrxError(
            f"--overwrite: {path} holds {', '.join(found)} but no {MARKER} marker, so lrx did not write it and "
            f"deletes nothing there; remove those entries yourself or set logging.output_dir=NEW_DIR"
        )


def _remove_owned(path: Path, marker: dict, allowed: tuple[str, ...]) -> None:
    """Delete the entries the marker lists, limited to names lrx writes (a hand-edited marker
    cannot point elsewhere)."""
    for name in marker.get("owned", []):
        if name not in allowed:
            continue
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()


def claim_run_dir(path: str | Path, overwrite: bool, resume: Path | None = None) -> Path:
    """Make ``path`` this run's folder, as the runner is about to write its first file: the
    checks of ``check_run_dir`` again, then the old run's entries removed (``overwrite``), the
    folder created and marked.

    Returns:
        The run folder.

    Raises:
        LrxError: as ``check_run_dir``.
    """
    path = Path(path)
    check_run_dir(path, overwrite, resume)
    own = resume is not None and checkpoint_run(resume) == path.resolve()
    marker = read_marker(path) if path.is_dir() else None
    if marker is not None and marker.get("kind") == "run" and not own:
        _remove_owned(path, marker, RUN_ENTRIES)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, "run", RUN_ENTRIES)
    return path


def check_output_dir(path: str | Path, key: str, kind: str | None = None) -> None:
    """Check a tool's output folder: not a file, writable, and empty unless it is an lrx
    folder of ``kind`` (which the tool then replaces); writes nothing.

    Raises:
        LrxError: naming ``key`` and the fix.
    """
    path = Path(path)
    check_writable(path, key)
    if not path.is_dir() or not any(path.iterdir()):
        return
    marker = read_marker(path)
    owned = set(marker.get("owned", [])) if marker is not None and marker.get("kind") == kind else set()
    foreign = sorted(p.name for p in path.iterdir() if p.name != MARKER and p.name not in owned)
    if kind is not None and marker is not None and not foreign:
        return  # lrx's own output of this kind, and nothing else: replaced
    raise LrxError(f"{key}={path} holds files lrx did not write there ({', '.join(foreign[:3])}); lrx deletes "
                   "nothing it did not write: choose a new or empty folder")


def claim_output_dir(path: str | Path, key: str, kind: str, entries: tuple[str, ...]) -> Path:
    """``check_output_dir``, then the previous lrx output of ``kind`` there removed and the
    folder created and marked as holding ``entries``."""
    path = Path(path)
    check_output_dir(path, key, kind)
    marker = read_marker(path) if path.is_dir() else None
    if marker is not None:
        _remove_owned(path, marker, entries)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind, entries)
    return path
