"""Fusion fidelity of SRLoRA events per base dtype and edit mode, against float64 references.

    python tools/bench_fusion.py --dim 1024 --events 10

One d x d layer (weights N(0, 0.02)) goes through ``--events`` recompositions; before each,
the adapter moves by ``relative_update * ||W0||``. Reported: the error of the applied edits
against the intended total edit, and against the net training update (stricter: the big
PiSSA subtractions cancel out of it), plus the edit log's size against the adapter's.
Prints a table of ``lrx.fidelity.fusion_fidelity`` rows and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lrx.fidelity import fusion_fidelity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--out", default="runs/bench_fusion")
    args = parser.parse_args()
    rows = [fusion_fidelity(dtype, fuse, rel, args.events, args.dim, args.r)
            for dtype in (torch.float32, torch.bfloat16) for fuse in ("auto", "fold", "log") for rel in (1e-2, 1e-4)]
    rows += [fusion_fidelity(torch.float32, "auto", rel, args.events, args.dim, args.r, quantize=q)
             for q in ("nf4", "int8") for rel in (1e-2, 1e-4)]
    lines = ["| base | fuse | mode | update/||W0|| | err vs total edit | err vs net update | edit rank | "
             "log / adapter bytes | extra adapter FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['dtype']} | {x['fuse']} | {x['mode']} | {x['relative_update']:.0e} | "
                     f"{x['error_vs_total_edit']:.1e} | {x['error_vs_net_update']:.1e} | {x['edit_rank']} | "
                     f"{x['edit_log_bytes'] / x['adapter_bytes']:.1f}x | {x['extra_flops_vs_adapter']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fusion.json").write_text(json.dumps({"command": sys.argv, "rows": rows, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
