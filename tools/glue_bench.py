"""GLUE benchmark: train methods x tasks x seeds with launch/train.py and tabulate dev metrics.

Every run is a separate ``launch/train.py`` process (the same path users take) with the
settings of ``configs/minilm/rte.yaml`` (the peft reference in docs/ARCHITECTURE.md) and the task's
epochs; ``--jobs`` runs several at once (useful on a GPU, which one small model leaves idle).

    python tools/glue_bench.py --glue-dir GLUE_DIR --methods lora pissa \\
        --tasks rte mrpc stsb cola --seeds 0 1 2 --jobs 3 --out runs/glue_bench

Prints a table (mean +- sample sd over seeds of the task's main dev metric, after the last
epoch) and writes ``results.json`` with every run's summary into ``--out``. For learning rates
picked per method on a held-out validation split, dev curves against steps and the EigenLoRAx
leave-one-out, see its successor ``tools/glue_study.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# task: (folder, epochs, main metric) as in the reference table of docs/ARCHITECTURE.md.
TASKS = {
    "rte": ("RTE", 20, "accuracy"),
    "mrpc": ("MRPC", 10, "f1"),
    "stsb": ("STS-B", 10, "pearson"),
    "cola": ("CoLA", 10, "matthews"),
    "wnli": ("WNLI", 10, "accuracy"),
}
REFERENCE = {  # peft 0.21 LoRA, docs/ARCHITECTURE.md (H100, seeds 0-2): mean, sd
    "rte": (60.7, 2.7), "mrpc": (86.2, 1.2), "stsb": (84.9, 0.5), "cola": (27.2, 0.9),
}


def run_one(args, spec: str, task: str, seed: int) -> dict:
    """One run; ``spec`` is a method name, optionally with overrides: srlora+method.gamma=0.25."""
    method, *method_overrides = spec.split("+")
    folder, epochs, metric = TASKS[task]
    label = spec.replace("method.", "").replace("=", "-").replace("+", "_").replace("/", "_")
    if len(label) > 60:  # long overrides (paths): keep the folder name short and unique
        label = f"{label[:40]}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
    out = Path(args.out) / f"{task}-{label}-s{seed}"
    cmd = [
        sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / args.config),
        "--method", method, "--overwrite",
        f"data.glue_task={task}",
        f"data.train_path={Path(args.glue_dir) / folder / 'train.tsv'}",
        f"data.eval_path={Path(args.glue_dir) / folder / 'dev.tsv'}",
        f"train.epochs={args.epochs or epochs}", f"train.seed={seed}",
        "train.eval_at_start=false", "logging.progress=false", f"logging.output_dir={out}",
        *args.overrides, *method_overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"[{task} {spec} seed {seed}] FAILED:\n{tail}", flush=True)
        return {"task": task, "method": spec, "seed": seed, "error": tail}
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["train_loss"] = [[r["step"], r["loss"]] for r in records if r["split"] == "train"]
    value = 100 * summary["eval"][metric]
    print(f"[{task} {spec} seed {seed}] {metric} {value:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"task": task, "method": spec, "seed": seed, "metric": metric, "value": value, "summary": summary}


def table(results: list[dict]) -> str:
    rows = ["| task | method | metric | mean +- sd | seeds | trainable params | peft reference |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["method"]) for r in results}, key=lambda k: (list(TASKS).index(k[0]), k[1]))
    for task, method in keys:
        ok = [r for r in results if (r["task"], r["method"]) == (task, method) and "value" in r]
        if not ok:
            rows.append(f"| {task} | {method} | - | failed | - | - | - |")
            continue
        values = [r["value"] for r in ok]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        ref = REFERENCE.get(task)
        rows.append(
            f"| {task} | {method} | {ok[0]['metric']} | {statistics.mean(values):.1f} +- {sd:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in values)} | {ok[0]['summary']['trainable_parameters']:,} | "
            f"{f'{ref[0]} +- {ref[1]}' if ref else '-'} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", required=True, help="folder with <TASK>/{train,dev}.tsv")
    parser.add_argument("--config", default="configs/minilm/rte.yaml", help="base run config")
    parser.add_argument("--methods", nargs="+", default=["lora"],
                        help="method names, each optionally with +SECTION.KEY=VALUE overrides")
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "stsb", "cola"], choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=None, help="override every task's epochs (smoke runs)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--out", default="runs/glue_bench")
    parser.add_argument("overrides", nargs="*", help="extra SECTION.KEY=VALUE for every run")
    args = parser.parse_args()
    if not Path(args.glue_dir).is_dir():
        parser.error(f"--glue-dir {args.glue_dir} is not a folder")
    jobs = [(m, t, s) for t in args.tasks for m in args.methods for s in args.seeds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_one(args, *j), jobs))
    text = table(results)
    print(text)
    print(f"total wall time {time.perf_counter() - t0:.0f} s for {len(jobs)} runs")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"command": sys.argv, "results": results, "table": text}, indent=1))
    return 0 if all("value" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
