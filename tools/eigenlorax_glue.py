"""EigenLoRAx leave-one-out on GLUE: LoRA on three tasks -> basis -> loadings on the fourth.

    python tools/eigenlorax_glue.py --glue-dir GLUE_DIR --k 12 --r 4 --seeds 0 1 2 --jobs 12

1. Train ``lora`` (configs/minilm/rte.yaml settings) on every task with seed 0; each run
   writes its peft export (``adapter_peft/``).
2. For each held-out task, build a basis from the other tasks' peft adapters
   (``tools/build_eigenbasis.py``) and train ``eigenlorax`` on it with every seed.
3. Tabulate the held-out metric against LoRA on that task, trainable parameters (adapter
   only; both train the same classification head) and the bytes one extra task costs when
   serving all tasks on one base (LoRA: its peft adapter; EigenLoRAx: the loadings-only lrx
   adapter, the basis being shared). Writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from glue_bench import TASKS, run_one  # beside this script (its folder is the first on sys.path)
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def tensor_bytes(file: Path, skip: str = "classifier") -> tuple[int, int]:
    """(parameters, bytes) of the adapter tensors in a safetensors file, heads excluded."""
    n = size = 0
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            if skip in key or ".edit_" in key:
                continue
            t = f.get_slice(key)
            count = 1
            for d in t.get_shape():
                count *= d
            n += count
            size += count * 4
    return n, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", required=True)
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "stsb", "cola"])
    parser.add_argument("--k", type=int, default=12)
    parser.add_argument("--augment", type=int, default=0)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--out", default="runs/eigenlorax_glue")
    parser.add_argument("overrides", nargs="*", help="SECTION.KEY=VALUE for every run")
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    bench = SimpleNamespace(out=str(out / "lora"), config="configs/minilm/rte.yaml", glue_dir=args.glue_dir,
                            epochs=None, overrides=args.overrides)
    with ThreadPoolExecutor(args.jobs) as pool:
        lora = {r["task"]: r for r in pool.map(lambda t: run_one(bench, "lora", t, 0), args.tasks)}
    if any("value" not in r for r in lora.values()):
        return 1
    adapters = {t: Path(r["summary"]["run_dir"]) / "adapter_peft" for t, r in lora.items()}
    for held in args.tasks:
        cmd = [sys.executable, str(REPO / "tools" / "build_eigenbasis.py"), str(out / f"basis-no-{held}"),
               *[str(adapters[t]) for t in args.tasks if t != held], "--k", str(args.k), "--augment", str(args.augment)]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout, flush=True)

    def eigen(job):
        held, seed = job
        spec = (f"eigenlorax+method.basis={out / f'basis-no-{held}'}+method.r={args.r}+train.lr={args.lr}")
        run = SimpleNamespace(**{**vars(bench), "out": str(out / "eigen")})
        return run_one(run, spec, held, seed)

    with ThreadPoolExecutor(args.jobs) as pool:
        eig = list(pool.map(eigen, [(t, s) for t in args.tasks for s in args.seeds]))

    rows = ["| held-out task | metric | LoRA (seed 0) | EigenLoRAx (mean +- sd) | ratio | LoRA adapter params | "
            "EigenLoRAx params | share | bytes per extra task: LoRA / EigenLoRAx |", "|---|---|---|---|---|---|---|---|---|"]
    report = []
    for task in args.tasks:
        values = [r["value"] for r in eig if r["task"] == task and "value" in r]
        if not values:
            rows.append(f"| {task} | failed |")
            continue
        ref = lora[task]["value"]
        lora_n, lora_b = tensor_bytes(adapters[task] / "adapter_model.safetensors")
        run_dir = Path(next(r for r in eig if r["task"] == task and "value" in r)["summary"]["run_dir"])
        eig_n, eig_b = tensor_bytes(run_dir / "adapter" / "adapter_model.safetensors")
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(f"| {task} | {TASKS[task][2]} | {ref:.1f} | {mean:.1f} +- {sd:.1f} | {mean / ref:.3f} | "
                    f"{lora_n:,} | {eig_n:,} | {eig_n / lora_n:.2%} | {lora_b:,} / {eig_b:,} |")
        report.append({"task": task, "lora": ref, "eigenlorax": values, "lora_params": lora_n, "eigen_params": eig_n,
                       "lora_bytes": lora_b, "eigen_bytes": eig_b})
    table = "\n".join(rows)
    print(table)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    (out / "results.json").write_text(json.dumps({"command": sys.argv, "report": report, "table": table,
                                                  "eigen_runs": eig, "lora_runs": list(lora.values())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
