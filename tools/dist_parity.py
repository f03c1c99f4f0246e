"""Loss parity of one process, FSDP2 (torchrun) and ZeRO-3 (deepspeed launcher), same global batch.

    python tools/dist_parity.py --nproc 2 --method lora --steps 10 model.name_or_path=tiny-llama ...

Runs ``launch/train.py`` three times with the same seed and global batch (``--batch`` per
process, ``--batch * --nproc`` for the single process), then prints the training loss of every
step side by side and the largest difference, and writes ``parity.json`` into ``--out``.
Works on CPU (gloo) and GPUs (NCCL).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch per process")
    parser.add_argument("--out", default="runs/dist_parity")
    parser.add_argument("--backends", nargs="+", default=["single", "fsdp2", "zero3"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    script = str(REPO / "launch" / "train.py")
    common = ["--method", args.method, "--overwrite", f"train.max_steps={args.steps}", "train.log_every=1",
              "train.eval_at_start=false", "logging.progress=false", "logging.tensorboard=false", *args.overrides]
    launchers = {
        "single": [sys.executable, script, f"train.batch_size={args.batch * args.nproc}"],
        "fsdp2": [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                  f"--master_port={port()}", script, f"train.batch_size={args.batch}", "distributed.backend=fsdp2"],
        "zero3": [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={args.nproc}",
                  f"--master_port={port()}", script, f"train.batch_size={args.batch}", "distributed.backend=zero3"],
    }
    losses, times = {}, {}
    for name in args.backends:
        out = Path(args.out) / name
        t0 = time.perf_counter()
        run = subprocess.run([*launchers[name], *common, f"logging.output_dir={out}"], capture_output=True, text=True)
        times[name] = round(time.perf_counter() - t0, 1)
        if run.returncode != 0:
            print(f"{name} FAILED:\n" + "\n".join(run.stderr.splitlines()[-15:]))
            return 1
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if r["split"] == "train"]
    ref = losses[args.backends[0]]
    print("| step | " + " | ".join(args.backends) + " |")
    print("|---|" + "---|" * len(args.backends))
    for i in range(len(ref)):
        print(f"| {i + 1} | " + " | ".join(f"{losses[b][i]:.6f}" for b in args.backends) + " |")
    diffs = {b: max(abs(x - y) for x, y in zip(losses[b], ref)) for b in args.backends}
    print("max |loss - " + args.backends[0] + "|: " + ", ".join(f"{b} {d:.2e}" for b, d in diffs.items()))
    print("wall seconds: " + ", ".join(f"{b} {t}" for b, t in times.items()))
    (Path(args.out) / "parity.json").write_text(json.dumps(
        {"command": sys.argv, "losses": losses, "max_abs_diff": diffs, "wall_s": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
