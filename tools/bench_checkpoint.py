"""Checkpoint size, save and load time, and streaming merged export time and peak memory.

    python tools/bench_checkpoint.py --model-config configs/models/llama3-8b-shape --work /tmp/ckbench

One process: builds the model (random init; on the GPU when there is one), saves it as the
base (safetensors), applies the method (SRLoRA: pool SVD + PiSSA), trains one step and runs
one recomposition event, then times ``lrx.checkpoint.save_checkpoint`` (size on disk), the
restore of that checkpoint into a fresh copy of the base (adapter + edit log replay +
optimizer state), and ``tools/export_merged.py`` on the checkpoint in a child process (wall
time and the child's peak resident memory). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lrx import checkpoint
from lrx.adapter import restore_adapter
from lrx.build import Adapters
from lrx.config import load_config
from lrx.distributed import ModelSpec, SingleDevice
from lrx.methods import build_method


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", required=True, help="HF config folder (architecture only is fine)")
    parser.add_argument("--method", default="srlora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder written beside the export")
    parser.add_argument("--work", default="runs/bench_checkpoint")
    parser.add_argument("--out", default=None, help="JSON results (default: WORK/results.json)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    backend = SingleDevice("auto")
    dtype = getattr(torch, args.dtype)
    cfg = AutoConfig.from_pretrained(args.model_config)
    result: dict = {"model_config": args.model_config, "method": args.method, "dtype": args.dtype, "device": str(backend.device)}

    torch.manual_seed(0)
    with backend.device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    base_dir = work / "base"
    t0 = time.perf_counter()
    model.save_pretrained(base_dir, max_shard_size="5GB")
    result["base_save_s"] = time.perf_counter() - t0
    result["base_bytes"] = du(base_dir)

    run_cfg = load_config(None, [f"method.r={args.rank}", f"method.alpha={2 * args.rank}",
                                 "method.target_modules=[all-linear]"], method=args.method)
    method = build_method(run_cfg.method)
    t0 = time.perf_counter()
    model = backend.build(ModelSpec(lambda meta, built=model: built), Adapters(method))  # whole: wrap, init, place
    result["method_init_s"] = time.perf_counter() - t0
    named = list(method.trainable_parameters(model))
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-5)
    method.attach(model, backend.shards())
    method.on_train_start(model, optimizer, 100)
    batch = torch.randint(0, cfg.vocab_size, (1, args.seq), device=backend.device)
    with torch.autocast(backend.device.type, dtype=torch.bfloat16, enabled=backend.device.type == "cuda"):
        model(input_ids=batch, labels=batch).loss.backward()
    method.after_backward(model, 0)
    optimizer.step()
    if hasattr(method, "recompose"):
        method.recompose(optimizer, 1)

    run_dir = work / "run"
    state = {"step": 1, "micro": 1, "global_micro_batch": 1, "scheduler": {}, "config": {}}
    meta = {"base_model": str(base_dir), "tokenizer": args.tokenizer, "task": "causal_lm", "num_labels": 0}
    t0 = time.perf_counter()
    path = checkpoint.save_checkpoint(
        run_dir, 1, backend=backend, adapter=checkpoint.AdapterSnapshot.take(model, method, backend.gather),
        progress=checkpoint.TrainingProgress(**state), moments=backend.optimizer_state(named, optimizer),
        rng=checkpoint.RandomState(backend.device).state_dict(), meta=meta, keep=2)
    result["checkpoint_save_s"] = time.perf_counter() - t0
    result["checkpoint_bytes"] = du(path)
    result["checkpoint_files"] = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    expected = {k: p.detach().float().cpu() for k, p in named}
    del model, optimizer, named
    torch.cuda.empty_cache() if backend.device.type == "cuda" else None

    with backend.device:
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    method2 = build_method(run_cfg.method)
    method2.wrap(fresh)
    named2 = list(method2.trainable_parameters(fresh))
    optimizer2 = torch.optim.AdamW([p for _, p in named2], lr=1e-5)
    t0 = time.perf_counter()
    restore_adapter(checkpoint.adapter_dir(path), fresh, method2)
    backend.load_optimizer_state(named2, optimizer2, checkpoint.read_optimizer(path), 1)
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
    result["checkpoint_load_s"] = time.perf_counter() - t0
    result["restored_equal"] = all(torch.equal(p.detach().float().cpu(), expected[k]) for k, p in named2)
    del fresh, optimizer2, named2

    export = work / "merged"
    code = ("import resource, time; from lrx.export import export_merged; "
            "t = time.perf_counter(); export_merged(%r, %r, dtype=%r, max_shard_size='5GB'); "
            "print('EXPORT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
            % (str(path), str(export), args.dtype))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if child.returncode:
        print(child.stderr[-3000:], file=sys.stderr)
        return 1
    _, seconds, rss_kib = child.stdout.strip().splitlines()[-1].split()
    result.update({"export_s": float(seconds), "export_peak_rss_gib": int(rss_kib) / 2**20,
                   "export_bytes": du(export)})
    out = Path(args.out) if args.out else work / "results.json"
    out.write_text(json.dumps(result, indent=2))
    for key in ("method_init_s", "checkpoint_bytes", "checkpoint_save_s", "checkpoint_load_s", "restored_equal",
                "base_bytes", "export_s", "export_peak_rss_gib", "export_bytes"):
        value = result[key]
        shown = f"{value / 2**30:.2f} GiB" if key.endswith("bytes") else (f"{value:.2f}" if isinstance(value, float) else value)
        print(f"{key:24} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
