"""lrx's adapted MoE experts against peft's ``target_parameters`` on one tiny Qwen3-MoE.

    python tools/bench_experts.py --experts 8 --hidden 256 --moe-intermediate 128 --r 8

Both adapt every fused experts weight (``experts.gate_up_proj``, ``experts.down_proj``) at rank
``--r`` on the same random model; reported: trainable parameters and the time of one training
step (forward + backward, fp32, on the CPU, median of ``--steps``). That both compute the same
function for the same adapter is tested (``tests/test_experts.py``: lrx's peft export loaded
by peft).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from lrx.build import Adapters
from lrx.config import load_config
from lrx.methods import build_method


def step_time(model, params, ids, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - t)
        for p in params:
            p.grad = None
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    import peft

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=1000, hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
                            intermediate_size=4 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts,
                            num_experts_per_tok=2)
    base = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 1000, (1, args.tokens))
    lrx_model = copy.deepcopy(base)
    method = build_method(load_config(None, ["method.target_modules=[experts]", f"method.r={args.r}"]).method)
    Adapters(method).adapt(lrx_model)
    lrx_params = [p for _, p in method.trainable_parameters(lrx_model)]
    with torch.no_grad():
        for p in lrx_params:
            p.normal_(std=0.02)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    print(f"trainable parameters: lrx {sum(p.numel() for p in lrx_params):,}, peft {sum(p.numel() for p in peft_params):,}")
    print(f"training step ({args.tokens} tokens): lrx {step_time(lrx_model, lrx_params, ids, args.steps) * 1e3:.1f} ms, "
          f"peft {step_time(peft_model, peft_params, ids, args.steps) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
