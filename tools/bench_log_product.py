"""Forward + backward time of an adapted layer's low-rank path in log mode: the adapter (rank r)
and the frozen edit log (rank k) as one product, with autograd through the concatenation
(``cat``: weight gradients for all r + k pairs, the log's thrown away) or through
``LowRankWithFrozenTail`` (``function``: weight gradients for the r trained pairs only); beside
them the adapter alone (``lora``, no log: the floor) and two separate products (``split``).

    python tools/bench_log_product.py --out runs/bench_log_product.json [--device cuda --dtype bfloat16]

Prints a table (median of ``--repeats`` timings of ``--iters`` iterations, interleaved) and
appends the rows to the JSON list in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lrx.methods.layer import LowRankWithFrozenTail


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024, help="in features")
    parser.add_argument("--out-dim", type=int, default=None, help="out features (default: --dim)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank r")
    parser.add_argument("--log-ranks", type=int, nargs="+", default=[16, 48, 80], help="edit log ranks k")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype, dev = getattr(torch, args.dtype), args.device
    g = torch.Generator().manual_seed(0)

    def make(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(dev, dtype).requires_grad_(grad)

    rows = []
    for k in args.log_ranks:
        d_out = args.out_dim or args.dim
        x, A, B = make(args.tokens, args.dim, grad=True), make(args.rank, args.dim, grad=True), make(d_out, args.rank, grad=True)
        V, U, grad_out = make(k, args.dim), make(d_out, k), make(args.tokens, d_out)
        paths = {
            "lora": lambda: ((x @ A.t()) @ B.t()).backward(grad_out),  # the adapter alone: the floor
            "split": lambda: ((x @ A.t()) @ B.t() + (x @ V.t()) @ U.t()).backward(grad_out),
            "cat": lambda: ((x @ torch.cat([A, V]).t()) @ torch.cat([B, U], dim=1).t()).backward(grad_out),
            "function": lambda: LowRankWithFrozenTail.apply(x, A, B, V, U).backward(grad_out),
        }
        times = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, step in paths.items():
                for _ in range(2):
                    step()
                sync(dev)
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    step()
                sync(dev)
                times[name].append((time.perf_counter() - t0) / args.iters * 1e3)
        row = {"tokens": args.tokens, "dim": args.dim, "out_dim": d_out, "r": args.rank, "log_rank": k, "device": dev,
               "dtype": args.dtype, **{f"{name}_ms": statistics.median(v) for name, v in times.items()}}
        rows.append(row)
    print(f"{args.dim} -> {d_out}, {args.tokens} tokens, r={args.rank}, {args.dtype} on {dev}")
    print(f"{'log rank':>8} {'lora ms':>8} {'split ms':>8} {'cat ms':>8} {'function ms':>11} {'cat/function':>12}")
    for row in rows:
        print(f"{row['log_rank']:8d} {row['lora_ms']:8.3f} {row['split_ms']:8.3f} {row['cat_ms']:8.3f} {row['function_ms']:11.3f} "
              f"{row['cat_ms'] / row['function_ms']:11.2f}x")
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old + rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
