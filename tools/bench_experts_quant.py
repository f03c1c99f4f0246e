"""Quantized fused MoE experts (``model.quantize``) on one tiny Qwen3-MoE: stored bytes and step time.

    python tools/bench_experts_quant.py --experts 8 --hidden 256 --moe-intermediate 128 --r 8

The same random bf16 model, LoRA at rank ``--r`` on every fused experts weight, built as a run
builds it (``Adapters`` with a ``Quantizer``) for ``--quantize`` none (the experts in bf16), nf4
(double quantization, blocks of 64) and int8. Reported: the experts' stored bytes (bf16: the
parameters; quantized: codes plus statistics, every buffer of their ``QuantizedExperts``
included), their ratio to bf16, and the time of one training step (forward + backward over
``--tokens`` tokens in bf16 on the CPU, median of ``--steps`` after one warm-up step) and, of
it, the time to dequantize every experts weight once (what a step's forward does).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from bench_experts import shape_arguments, step_time, tiny_qwen3_moe

from lrx.build import Adapters
from lrx.config import load_config
from lrx.methods import LocalShards, build_method
from lrx.methods.experts import AdaptedExperts
from lrx.quant import Quantizer, QuantSettings


def experts_bytes(model) -> int:
    """Bytes the adapted experts' bases store: parameters and buffers of every ``layer.base``."""
    total = 0
    for layer in (m for m in model.modules() if isinstance(m, AdaptedExperts)):
        tensors = [*layer.base.parameters(), *layer.base.buffers()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def dequantize_time(model, steps: int) -> float:
    """Median time to dequantize every quantized experts weight once (what one step's forward
    does; 0 for bf16 experts)."""
    bases = [m.base for m in model.modules() if isinstance(m, AdaptedExperts) and m.quantized]
    times = []
    for _ in range(steps if bases else 0):
        t = time.perf_counter()
        for base in bases:
            base.dequantize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) if times else 0.0


def main() -> None:
    ap = shape_arguments(__doc__)
    ap.add_argument("--quantize", nargs="+", default=["none", "nf4", "int8"])
    args = ap.parse_args()

    base, ids = tiny_qwen3_moe(args)
    base = base.to(torch.bfloat16)
    reference = None
    for kind in args.quantize:
        model = copy.deepcopy(base)
        method = build_method(load_config(None, ["method.target_modules=[experts]", f"method.r={args.r}"]).method)
        quantizer = None if kind == "none" else Quantizer(QuantSettings(kind))
        Adapters(method, quantizer=quantizer).adapt(model)
        method.attach(model, LocalShards())
        params = [p for _, p in method.trainable_parameters(model)]
        step_time(model, params, ids, 1)  # warm-up
        took = step_time(model, params, ids, args.steps)
        stored = experts_bytes(model)
        reference = reference or stored
        print(f"{kind:>4}: experts stored {stored:,} bytes ({stored / reference:.3f} of the first), "
              f"training step ({args.tokens} tokens, bf16) {took * 1e3:.1f} ms, "
              f"of which the experts' weights dequantized {dequantize_time(model, args.steps) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
