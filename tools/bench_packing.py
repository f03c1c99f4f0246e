"""Packed against padded batches: real tokens per second of ``launch/train.py`` on the
quick-start data (issue 25: packing without cross-example attention).

    python tools/bench_packing.py --model FOLDER --out benchmarks/packing-1gpu.json

FOLDER holds a causal-LM ``config.json`` and tokenizer files; without weights, a random model
of that shape is saved first (bf16 on a GPU), so only the tokenizer and config need to travel.
Two runs of the same command line, one process each: padded (``train.batch_size`` rows, each
batch padded to its longest example) and packed (``data.packing=true``: examples concatenated
into ``data.max_length`` rows with per-example position ids, so no example attends to
another). tokens/s is ``summary.json``'s (the median logging interval), which counts real
tokens only (the padded run's attention mask).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data" / "quickstart" / "train.jsonl"


def with_weights(folder: Path, work: Path, dtype: str) -> Path:
    """``folder`` if it has weights, else a copy with random weights of its config's shape."""
    if any(folder.glob("*.safetensors")):
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = work / "model"
    shutil.copytree(folder, target)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=getattr(torch, dtype))
    model.save_pretrained(target)
    return target


def run(name: str, model: Path, work: Path, args, extra: list[str]) -> dict:
    out = work / name
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "smollm2" / "lora.yaml"),
           f"model.name_or_path={model}", f"model.dtype={args.dtype}", f"train.device={args.device}",
           f"data.train_path={DATA}", "data.eval_path=none", f"data.max_length={args.max_length}",
           f"train.max_steps={args.steps}", "train.log_every=5", "train.eval_at_start=false", "train.epochs=100",
           "train.sample_prompt=null", "logging.tensorboard=false", "logging.progress=false",
           f"logging.output_dir={out}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    if proc.returncode:
        return {"run": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    summary = json.loads((out / "summary.json").read_text())
    return {"run": name, "tokens_per_s": summary["tokens_per_s"], "settings": extra,
            "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder: config.json + tokenizer files (+ weights)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--padded-batch", type=int, default=8)
    parser.add_argument("--packed-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = with_weights(Path(args.model), work, args.dtype)
        rows = [run("padded", model, work, args, [f"train.batch_size={args.padded_batch}"]),
                run("packed", model, work, args, [f"train.batch_size={args.packed_batch}", "data.packing=true"])]
    print("| run | settings | real tokens/s | peak GiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {' '.join(r.get('settings', []))} | {r.get('tokens_per_s', r.get('error'))} | "
              f"{r.get('peak_gpu_memory_gib')} |")
    if args.out:
        Path(args.out).write_text(json.dumps([{**r, "max_length": args.max_length, "model": Path(args.model).name}
                                              for r in rows], indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
