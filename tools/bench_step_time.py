"""Step time of methods on one model and the same data, in one process (events included).

    python tools/bench_step_time.py --model smollm2-135m --methods lora srlora --steps 32 --reps 2

Each repetition trains every method for ``--steps`` optimizer steps with lrx's Trainer on the
same random token batches (fixed seed), from a fresh copy of the base model; methods are
interleaved (A B A B) so that machine drift hits them alike. SRLoRA's events are spread over
the run as in training (``end_fraction``), so its time is amortised over them. Prints a table
and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrx.build import Adapters
from lrx.config import load_config
from lrx.data import Collator
from lrx.methods import build_method
from lrx.models import load_model, load_tokenizer
from lrx.trainer import Trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", nargs="+", default=["lora", "srlora"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base weight dtype")
    parser.add_argument("--out", default="runs/bench_step_time")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE for every method (e.g. method.r=16)")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    base = load_model(args.model, task="causal_lm", vocab_size=len(tokenizer), dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + 1)
    ids = torch.randint(0, len(tokenizer), (n, args.seq), generator=g)
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    collate = Collator(tokenizer.pad_token_id, "causal_lm")

    times: dict[str, list[float]] = {m: [] for m in args.methods}
    peak_gib: dict[str, float] = {}
    events: dict[str, int] = {}
    for rep in range(args.reps):
        for name in args.methods:
            cfg = load_config(None, [
                "method.target_modules=all-linear", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                "train.log_every=1000000", "logging.progress=false", "logging.tensorboard=false",
                f"train.device={device}", *args.overrides,
            ], method=name)
            model = copy.deepcopy(base)
            method = build_method(cfg.method)
            torch.manual_seed(0)
            Adapters(method).adapt(model)
            model.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = Trainer(cfg, model, method, data, None, collate, "causal_lm", [], device, Path(run_dir))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainer.fit()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
            times[name].append(elapsed / args.steps)
            if device.type == "cuda":
                peak_gib[name] = torch.cuda.max_memory_allocated() / 2**30
            events[name] = getattr(method, "events_done", 0)
            print(f"rep {rep} {name}: {1000 * elapsed / args.steps:.1f} ms/step ({events[name]} events)", flush=True)
            del model, trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ref = statistics.median(times[args.methods[0]])
    rows = [f"| method | ms/step (median of {args.reps}) | all reps | events | vs {args.methods[0]} | peak GiB |",
            "|---|---|---|---|---|---|"]
    for name in args.methods:
        med = statistics.median(times[name])
        rows.append(f"| {name} | {1000 * med:.1f} | {', '.join(f'{1000 * t:.1f}' for t in times[name])} | "
                    f"{events[name]} | {med / ref:.3f}x | {peak_gib.get(name, float('nan')):.2f} |")
    table = "\n".join(rows)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "step_time.json").write_text(json.dumps(
        {"command": sys.argv, "device": str(device), "seconds_per_step": times, "events": events,
         "peak_gib": peak_gib, "table": table},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
