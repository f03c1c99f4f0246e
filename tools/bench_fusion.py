"""Fusion fidelity of SRLoRA events per base dtype and edit mode, against float64 references.

    python tools/bench_fusion.py --dim 1024 --events 10

One d x d layer (weights N(0, 0.02)) goes through ``--events`` recompositions; before each,
the adapter moves by ``relative_update * ||W0||``. Reported: the error of the applied edits
against the intended total edit, and against the net training update (stricter: the big
PiSSA subtractions cancel out of it), plus the edit log's size against the adapter's.
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.config import load_config  # noqa: E402
from lrx.methods import LocalShards, adapted_layers, build_method  # noqa: E402
from lrx.quant import Quantizer, QuantSettings  # noqa: E402


def run(dtype: torch.dtype, fuse: str, relative_update: float, events: int, d: int, r: int,
        quantize: str = "none") -> dict:
    """One row; ``quantize`` (nf4, fp4, int8): the base is quantized after the PiSSA init, as
    ``model.quantize`` does, and W0 is then the dequantized base training starts from."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.02)
    model = model.to(dtype)
    W0 = model[0].weight.detach().double().clone()
    swap = r // 2
    cfg = load_config(None, [f"method.r={r}", f"method.r_target={r + swap * events}", "method.target_modules=0",
                             f"method.fuse={fuse}", "method.svd=randomized"], method="srlora").method
    method = build_method(cfg)
    method.apply(model)
    layer = dict(adapted_layers(model))["0"]
    if quantize != "none":
        quantizer = Quantizer(QuantSettings(quantize))
        quantizer.plan(model, [])
        quantizer.apply(model)
        W0 = layer.base.dequantize().double()  # the quantized residual: what training starts from
        codes = layer.base.weight.detach().clone()
    method.attach(model, LocalShards())
    g = torch.Generator().manual_seed(1)
    net = torch.zeros(d, d, dtype=torch.float64)

    def adapter64() -> torch.Tensor:  # s * B @ A in float64: the reference must not round
        return (layer.lora_B.detach().double() @ layer.lora_A.detach().double()) * layer.scale

    # The effective weight training starts from is W0 (the PiSSA pairs cancel their residual
    # edit), or on a quantized base the dequantized residual plus the initial pairs.
    start = adapter64() if quantize != "none" else 0

    for step in range(1, events + 1):
        with torch.no_grad():
            before = adapter64()
            direction = torch.randn(layer.lora_B.shape, generator=g)
            change = (direction @ layer.lora_A.detach()).double() * layer.scale
            layer.lora_B.add_(direction * (relative_update * W0.norm() / change.norm()).item())
            net += adapter64() - before
        for value in method.importance.pieces["0"].values():
            value.uniform_(0, 1, generator=g)
        method.recompose(None, step)
    U, V = layer.edit_factors()
    U, V = U[:, layer.baked :], V[layer.baked :]  # the edits of the events (a quantized base holds the rest)
    intended = U.double() @ V.double()
    base_now = layer.base.dequantize() if layer.quantized else layer.base.weight
    applied = base_now.double() - W0 + (0 if layer.fold_edits else intended)
    effective = W0 + applied + adapter64() - start
    if layer.quantized and not torch.equal(layer.base.weight, codes):
        raise AssertionError("an event changed the quantized base")
    log_bytes = (layer.edit_U.numel() + layer.edit_V.numel()) * 4
    adapter_bytes = (layer.lora_A.numel() + layer.lora_B.numel()) * 4
    return {
        "dtype": str(dtype).removeprefix("torch.") if quantize == "none" else quantize, "fuse": fuse, "mode": "fold" if layer.fold_edits else "log",
        "relative_update": relative_update,
        "error_vs_total_edit": ((applied - intended).norm() / intended.norm()).item(),
        "error_vs_net_update": ((effective - W0 - net).norm() / net.norm()).item(),
        "edit_rank": layer.edit_rank, "edit_log_bytes": log_bytes, "adapter_bytes": adapter_bytes,
        # Log mode applies the edit rank beside the adapter: extra multiply-adds per token.
        "extra_flops_vs_adapter": 0.0 if layer.fold_edits else layer.edit_rank / layer.r,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--out", default="runs/bench_fusion")
    args = parser.parse_args()
    rows = [run(dtype, fuse, rel, args.events, args.dim, args.r)
            for dtype in (torch.float32, torch.bfloat16) for fuse in ("auto", "fold", "log") for rel in (1e-2, 1e-4)]
    rows += [run(torch.float32, "auto", rel, args.events, args.dim, args.r, quantize=q)
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
