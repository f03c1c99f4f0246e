"""Full-precision against quantized bases on the quick-start: step time, peak memory, quality.

    python tools/bench_quantized.py --steps 20 --out benchmarks/quantized-smollm2-cpu.json

Trains SmolLM2-135M-Instruct on the quick-start instruction set (configs/smollm2/lora.yaml's
settings) with ``lora``, ``pissa`` and ``srlora`` on an fp32 and an nf4 base (``--quantize``
to change), the same steps each, one process per run. Reported per run: the median time of an
optimizer step (metrics.jsonl's step_s, the first left out), the peak resident memory of the process
(``wait4``'s ru_maxrss), and the eval loss before and after training. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(method: str, quantize: str, steps: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{method}-{quantize}"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs/smollm2/lora.yaml"),
           "--method", method, f"model.quantize={quantize}", f"train.max_steps={steps}", "train.log_every=1",
           "train.eval_at_start=true", f"train.eval_every={steps}", "train.sample_prompt=null", "train.save_every=0",
           "logging.progress=false", "logging.tensorboard=false", f"logging.output_dir={run_dir}", "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} on {quantize} failed:\n{err[-3000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    step_s = [r["step_s"] for r in train_rows[1:]]  # the first step warms up
    return {"method": method, "quantize": quantize, "steps": len(train_rows),
            "step_s_median": statistics.median(step_s) if step_s else None,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "eval_loss_before": evals[0]["eval_loss"],
            "eval_loss_after": evals[-1]["eval_loss"], "final_train_loss": train_rows[-1]["loss"], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["lora", "pissa", "srlora"])
    parser.add_argument("--quantize", nargs="+", default=["none", "nf4"])
    parser.add_argument("--work", default="runs/bench_quantized")
    parser.add_argument("--out", default="benchmarks/quantized-smollm2-cpu.json")
    parser.add_argument("extra", nargs="*", help="config overrides for every run (key=value)")
    args = parser.parse_args(argv)
    rows = []
    for method in args.methods:
        for quantize in args.quantize:
            rows.append(train(method, quantize, args.steps, Path(args.work), args.extra))
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| method | base | step (s, median) | peak RSS (GiB) | eval loss before | eval loss after |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        base = "fp32" if r["quantize"] == "none" else r["quantize"]
        lines.append(f"| {r['method']} | {base} | {r['step_s_median']:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['eval_loss_before']:.4f} | {r['eval_loss_after']:.4f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": ["python", "tools/bench_quantized.py", *(argv or sys.argv[1:])],
                                          "steps": args.steps, "rows": rows, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
