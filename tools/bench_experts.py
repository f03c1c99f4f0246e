"""lrx's adapted MoE experts against peft's ``target_parameters`` on one tiny Qwen3-MoE.

    python tools/bench_experts.py --experts 8 --hidden 256 --moe-intermediate 128 --r 8
    python tools/bench_experts.py --srlora    # SRLoRA's events on the experts instead

``--srlora``: SRLoRA (r_target = 3 r, gamma 0.5: 4 events) on the experts weights only, fp32 (the
edits folded into the base); after one training step (importance statistics from its backward),
every event is timed (``method.recompose``: scores, per-expert choice, fused edit, new slots;
reported per event and per expert of one weight), with its fusion error (each expert's relative
``||applied - intended||`` of the folded edit, in float64; the largest) and the relative change
of the logits it makes.

``--srlora --backend fsdp2`` (or ``zero3``), under ``torchrun --nproc_per_node 2`` (CPU: gloo): the same over
several processes, built and sharded by the backend,
each process scoring and editing its own pieces of the experts (one training step first, its
statistics from its backward); times and errors as above, the fusion error summed over the
processes' pieces, the logits change from a forward of all processes (rank 0 prints).

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
from lrx.methods import LocalShards, build_method


def step_time(model, params, ids, steps: int) -> float:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - t)
        for p in params:
            p.grad = None
    return statistics.median(times)


def srlora_events(base, ids, args) -> None:
    model = copy.deepcopy(base)
    overrides = ["method.target_modules=[experts]", f"method.r={args.r}", "method.svd=exact"]
    method = build_method(load_config(None, overrides, method="srlora").method)
    t = time.perf_counter()
    Adapters(method).adapt(model)
    print(f"srlora init (an SVD per expert, {len(method.layers)} weights x {args.experts} experts): "
          f"{time.perf_counter() - t:.2f} s")
    method.attach(model, LocalShards())
    model(input_ids=ids, labels=ids).loss.backward()
    method.after_backward(model, 0)
    model.eval()
    weights = len(method.layers) * args.experts
    for event in range(method.config.n_events):
        with torch.no_grad():
            before = model(input_ids=ids).logits.double()
        t = time.perf_counter()
        records = method.recompose(None, event + 1)
        took = time.perf_counter() - t
        with torch.no_grad():
            change = (model(input_ids=ids).logits.double() - before).norm() / before.norm()
        error = max(max(rec["expert_fusion_errors"]) for rec in records)
        print(f"event {event + 1}: {took * 1e3:.1f} ms ({took / weights * 1e6:.0f} us per expert weight), "
              f"fusion error max {error:.1e}, logits change {change:.1e}")


def srlora_sharded(base, ids, args) -> None:
    """``--srlora`` over the processes of ``--backend`` (see the module doc)."""
    from lrx.distributed import ModelSpec, build_backend

    backend = build_backend(args.backend, "cpu")
    overrides = ["method.target_modules=[experts]", f"method.r={args.r}", "method.svd=exact"]
    method = build_method(load_config(None, overrides, method="srlora").method)
    t = time.perf_counter()
    model = backend.build(ModelSpec(lambda meta: base), Adapters(method, seed=0))
    init = time.perf_counter() - t
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = backend.setup(model, optimizer, scheduler, micro_batch=1, grad_accum=1, max_grad_norm=0.0)
    method.attach(model, backend.shards())
    backend.backward(run(input_ids=ids, labels=ids).loss)
    method.after_backward(model, 0)
    backend.step(optimizer, scheduler, params, 0.0)
    say = print if backend.is_main else (lambda *a: None)
    weights = len(method.layers) * args.experts
    say(f"srlora over {backend.world_size} processes ({args.backend}): init and sharding {init:.2f} s")
    for event in range(method.config.n_events):
        before = run(input_ids=ids).logits.detach().double()  # grad enabled: FSDP2 reshards after it
        backend.barrier()
        t = time.perf_counter()
        records = method.recompose(optimizer, event + 1)
        took = time.perf_counter() - t
        change = (run(input_ids=ids).logits.detach().double() - before).norm() / before.norm()
        error = max(max(rec["expert_fusion_errors"]) for rec in records)
        say(f"event {event + 1}: {took * 1e3:.1f} ms ({took / weights * 1e6:.0f} us per expert weight), "
            f"fusion error max {error:.1e}, logits change {change:.1e}")
    backend.close()


def shape_arguments(doc: str) -> argparse.ArgumentParser:
    """The tiny Qwen3-MoE's shape and the run's length, as options (shared with bench_experts_quant)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-intermediate", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    return ap


def tiny_qwen3_moe(args) -> tuple[torch.nn.Module, torch.Tensor]:
    """A seeded random Qwen3-MoE of ``shape_arguments``' shape (fp32) and one row of token ids."""
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=1000, hidden_size=args.hidden, moe_intermediate_size=args.moe_intermediate,
                            intermediate_size=4 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts,
                            num_experts_per_tok=2)
    return AutoModelForCausalLM.from_config(config), torch.randint(0, 1000, (1, args.tokens))


def main() -> None:
    ap = shape_arguments(__doc__)
    ap.add_argument("--srlora", action="store_true", help="time SRLoRA's events on the experts instead")
    ap.add_argument("--backend", choices=["single", "fsdp2", "zero3"], default="single",
                    help="--srlora over torchrun's processes")
    args = ap.parse_args()

    base, ids = tiny_qwen3_moe(args)
    if args.srlora and args.backend != "single":
        return srlora_sharded(base, ids, args)
    if args.srlora:
        return srlora_events(base, ids, args)
    import peft

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
