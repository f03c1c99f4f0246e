"""Pack the MiniLM base small enough to travel to a GPU machine, with every weight it uses exact.

all-MiniLM-L6-v2's ``model.safetensors`` is 90.9 MB in fp32, most of it the 30,522 x 384
word embedding. A GLUE run looks up only the rows of tokens that occur in its data, so

    python tools/minilm_pack.py pack OUT_FILE --glue-dir GLUE_DIR

keeps every tensor whole except the word embedding, of which it keeps the rows of the
tokens found in the GLUE files (train and dev of every task folder there, plus the special
tokens), byte-shuffles the fp32 data and compresses it with xz (stdlib ``lzma``). On the
other machine

    python tools/minilm_pack.py unpack OUT_FILE MODEL_DIR

writes a model folder (config, tokenizer, ``model.safetensors`` with the original keys and
dtypes) whose kept values are bit-identical to the original (checked against the sha256 of
every kept tensor recorded at packing) and whose dropped embedding rows are NaN: a run that
ever looked one up would fail on a NaN loss instead of training on a wrong weight. Point
``model.name_or_path`` at MODEL_DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import struct
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EMBEDDING = "embeddings.word_embeddings.weight"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAGIC = b"LRXPACK1"


def _minilm_dir() -> Path:
    from lrx.models import resolve_source

    return Path(resolve_source("minilm-l6").path)


def used_token_ids(glue_dir: Path, model_dir: Path) -> list[int]:
    """Ids of every token in the train/dev files of every GLUE task folder under ``glue_dir``."""
    from lrx.data import GLUE_TASKS, load_glue_file
    from lrx.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    used = set(tok.all_special_ids)
    folders = {"RTE": "rte", "MRPC": "mrpc", "STS-B": "sts-b", "CoLA": "cola", "WNLI": "wnli",
               "SST-2": "sst-2", "QNLI": "qnli"}
    for folder, task in folders.items():
        for split in ("train", "dev"):
            path = glue_dir / folder / f"{split}.tsv"
            if not path.is_file() or task not in GLUE_TASKS:
                continue
            ds = load_glue_file(path, task)
            for col in ("text_a", "text_b"):
                if col in ds.column_names:
                    for ids in tok(list(ds[col]), add_special_tokens=False)["input_ids"]:
                        used.update(ids)
    return sorted(used)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _shuffle(a: np.ndarray) -> bytes:
    """Byte planes of a numeric array (all first bytes, then all second bytes, ...)."""
    raw = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
    return raw.T.tobytes()


def _unshuffle(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


def pack(out: Path, glue_dir: Path | None, model_dir: Path | None = None, used: list[int] | None = None) -> dict:
    """Write the packed model; ``used`` (token ids to keep) defaults to those of ``glue_dir``."""
    from safetensors.numpy import load_file

    model_dir = model_dir or _minilm_dir()
    tensors = load_file(str(model_dir / "model.safetensors"))
    used = sorted(set(used)) if used is not None else used_token_ids(glue_dir, model_dir)
    header = {"tensors": [], "used_ids": used, "vocab_rows": int(tensors[EMBEDDING].shape[0]), "files": {}}
    payload = io.BytesIO()
    for name in sorted(tensors):
        a = tensors[name]
        if name == EMBEDDING:
            a = a[np.asarray(used)]
        blob = _shuffle(a)
        header["tensors"].append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                                  "offset": payload.tell(), "nbytes": len(blob), "sha256": _sha(a)})
        payload.write(blob)
    for fname in SIDE_FILES:
        if (model_dir / fname).is_file():
            data = (model_dir / fname).read_bytes()
            header["files"][fname] = {"offset": payload.tell(), "nbytes": len(data)}
            payload.write(data)
    head = json.dumps(header).encode()
    body = lzma.compress(payload.getvalue(), preset=6)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(MAGIC + struct.pack("<Q", len(head)) + head + body)
    return {"used_tokens": len(used), "vocab": header["vocab_rows"], "bytes": out.stat().st_size}


def unpack(packed: Path, model_dir: Path) -> dict:
    from safetensors.numpy import save_file

    data = packed.read_bytes()
    if data[:8] != MAGIC:
        raise SystemExit(f"{packed}: not a minilm_pack file")
    (n,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16 : 16 + n])
    payload = lzma.decompress(data[16 + n :])
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for t in header["tensors"]:
        a = _unshuffle(payload[t["offset"] : t["offset"] + t["nbytes"]], np.dtype(t["dtype"]), tuple(t["shape"]))
        if _sha(a) != t["sha256"]:
            raise SystemExit(f"{t['name']}: sha256 mismatch after unpacking")
        if t["name"] == EMBEDDING:
            full = np.full((header["vocab_rows"], a.shape[1]), np.nan, dtype=a.dtype)
            full[np.asarray(header["used_ids"])] = a
            a = full
        tensors[t["name"]] = a
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    for fname, where in header["files"].items():
        (model_dir / fname).write_bytes(payload[where["offset"] : where["offset"] + where["nbytes"]])
    return {"tensors": len(tensors), "used_tokens": len(header["used_ids"]), "dir": str(model_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out", type=Path)
    p.add_argument("--glue-dir", type=Path, required=True)
    p.add_argument("--model-dir", type=Path, default=None, help="default: the minilm-l6 package's folder")
    u = sub.add_parser("unpack")
    u.add_argument("packed", type=Path)
    u.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        print(json.dumps(pack(args.out, args.glue_dir, args.model_dir)))
    else:
        print(json.dumps(unpack(args.packed, args.model_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
