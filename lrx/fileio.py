"""Reading the JSON and weight files lrx accepts (safetensors and JSON only, never pickle)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lrx.errors import LrxError

# Weight files that unpickle when loaded (and can run code): refused wherever lrx reads weights.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_json(file: Path, fix: str) -> dict[str, Any]:
    """Parse a JSON file; LrxError naming the file, the position and ``fix`` if it is corrupt."""
    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise LrxError(f"{file}: corrupt JSON ({e.msg} at line {e.lineno}); {fix}") from None


def pickle_files(folder: Path) -> list[str]:
    """Names of pickle weight files in ``folder`` (to name them when refusing)."""
    return sorted(p.name for p in Path(folder).glob("*") if p.suffix in PICKLE_SUFFIXES)


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse anything else (no pickle is ever unpickled)."""
    file = Path(file)
    if not file.is_file():
        pickles = pickle_files(file.parent)
        hint = f" (found {pickles}: pickle files are refused, convert them to safetensors)" if pickles else ""
        raise LrxError(f"{file} not found{hint}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise LrxError(f"{file} is not a valid safetensors file ({e}); it may be truncated or corrupt") from None


class WeightFiles:
    """The tensors of a set of safetensors files, by key, read one at a time (only headers are
    read up front)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self.where: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        self.where[key] = file
            except (SafetensorError, OSError) as e:
                raise LrxError(f"{file} is not a valid safetensors file ({str(e).splitlines()[0]}); it may be "
                               "truncated or corrupt: copy or save the model again") from None

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> list[int]:
        with self._open(str(self.where[key]), framework="pt") as f:
            return f.get_slice(key).get_shape()

    def get(self, key: str) -> torch.Tensor:
        with self._open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk."""
    for file in Path(root).rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def swap_in(tmp: Path, final: Path, remove=None) -> None:
    """Make the finished folder ``tmp`` the folder ``final`` with one rename: flushed first,
    an existing ``final`` moved aside and then removed (``remove``, default ``shutil.rmtree``),
    so a crash leaves either the old or the new folder, never a mix."""
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        (remove or (lambda p: shutil.rmtree(p, ignore_errors=True)))(old)


@contextlib.contextmanager
def atomic_dir(final: Path, needed: int = 0):
    """A temporary sibling folder to fill, made ``final`` on success (``swap_in``); on an error
    it is deleted and ``final`` stays as it was. A full disk (or quota) is a one-line
    ``LrxError`` naming the folder, ``needed`` bytes (at least what was written) and the bytes free."""
    from lrx import faults
    from lrx.diskspace import folder_bytes, full_error, is_full

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        faults.fire(f"write:{final.parent.name}/{final.name}")  # tests: the disk fills once the files are in the temporary folder
    except BaseException as e:
        written = folder_bytes(tmp) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if is_full(e):
            raise full_error(final.parent, max(needed, written), e, f"{final} is as it was") from None
        raise
    swap_in(tmp, final)


def recorded_path(value: str, json_file: Path, key: str, fix: str) -> str:
    """A file or folder named in an lrx JSON file: an absolute path as it is, a relative one
    from the folder holding the JSON, then (files written before paths were recorded absolute)
    from the working directory.

    Raises:
        LrxError: the path exists in none of these places; the message names the JSON file and ``fix``.
    """
    if Path(value).is_absolute():
        if not Path(value).exists():
            raise LrxError(f"{json_file}: {key} {value} not found; {fix}")
        return value
    beside = Path(json_file).parent / value
    if beside.exists():
        return str(beside)
    if Path(value).exists():
        return value
    raise LrxError(f"{json_file}: {key} {value!r} not found (looked beside the file, in {Path(json_file).parent}, "
                   f"and in the working directory); {fix}")

