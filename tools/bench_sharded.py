"""Throughput, memory and SRLoRA event cost of sharded training (FSDP2 or ZeRO-3).

    torchrun --nproc_per_node 2 tools/bench_sharded.py --backend fsdp2 --out runs/bench_fsdp2.json
    deepspeed --num_gpus 2 tools/bench_sharded.py --backend zero3 --out runs/bench_zero3.json

Trains an 8B Llama-3-shaped model (random init, built directly on the GPU; seq 2048,
micro-batch 2, r=16 on all linear layers) for each ``--runs`` entry, ``METHOD:STORAGE:CKPT``:
METHOD lora or srlora, STORAGE the base weights' dtype (bf16: SRLoRA's edits go to the exact
fp32 log; fp32: folded into fp32 shards, with bf16 compute through FSDP2's mixed precision;
nf4 / int8: the bf16 base quantized as ``model.quantize`` does while it is built, QLoRA),
CKPT ``ckpt`` (activation checkpointing) or ``nockpt``. SRLoRA runs its whole schedule of
recomposition events (4 with the defaults), one training step after each, between the warm-up
and the timed steps, so its timed steps run with the full edit log (bf16 storage) and its peak
covers every stage of the schedule.
It reports, per run: tokens/s per GPU over the timed steps, model FLOPs utilisation (4 x matmul parameters + 6 L d n_layers per token,
against ``--peak-tflops``, as the peft references in docs/ARCHITECTURE.md), peak memory while training (after
the model is sharded: building it whole first is not counted; ``stage_peak_gib`` splits it into
warm-up, each SRLoRA event with the step after it, and the timed steps), the adapter's
initialisation time (SRLoRA: the per-row-block pool SVD of every matrix plus PiSSA init), and
for SRLoRA the time of each event over all layers (``event_s``: the median) and the bytes
all-reduced for it.
Rank 0 prints a table and appends the results to the JSON list in ``--out``.

``--sharded-build`` never builds the model whole on a GPU (for 70B shapes,
``--model-config configs/models/llama3-70b-shape``): FSDP2 fills it one block at a time from
the meta device with seeded random weights, ZeRO-3 builds it under ``zero.Init``.

Give each run its own launch when comparing memory: a DeepSpeed engine is not fully released
within the process, so a second ZeRO-3 run in one process carries the first one's memory.
``tools/bench_sharded.sh`` launches every run of the matrix separately and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import zlib
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from lrx.build import Adapters
from lrx.config import load_config
from lrx.distributed import ModelSpec, build_backend
from lrx.methods import adapted_layers, build_method
from lrx.methods.layer import LOG_PRODUCTS
from lrx.quant import Quantizer, QuantSettings

REFERENCES = {  # docs/ARCHITECTURE.md: peft LoRA r=16 on 2x H200, tokens/s per GPU
    ("fsdp2", "ckpt"): 7107, ("fsdp2", "nockpt"): 9953, ("zero3", "ckpt"): 1996, ("zero3", "nockpt"): 2566,
}


def model_config(path: str):
    if path == "tiny":  # CPU smoke test of the script
        return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    return AutoConfig.from_pretrained(path)


def flops_per_token(cfg, seq: int) -> float:
    d, layers, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    matmul = layers * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * cfg.vocab_size  # + lm_head
    return 4 * matmul + 6 * seq * d * layers


class RandomWeights:
    """Seeded random base weights by checkpoint key (the same on every rank), for building
    models too big to create whole: 2-D weights N(0, 0.02), 1-D (norms) ones."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if len(shape) == 1:
            return torch.ones(shape)
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        return torch.randn(shape, generator=g) * 0.02


def gib(n: int) -> float:
    return n / 2**30


def sync(backend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    backend.barrier()


def profiler(backend) -> torch.profiler.profile:
    """A profiler of the host and, on GPUs, the device (tables sorted by ``time_column``)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if backend.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def time_column(backend) -> str:
    return "cuda_time_total" if backend.device.type == "cuda" else "cpu_time_total"


def one_run(args, backend, spec: str) -> dict:
    method_name, storage, ckpt = spec.split(":")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "nf4": torch.bfloat16, "int8": torch.bfloat16}[storage]
    quantizer = Quantizer(QuantSettings(storage), backend.device) if storage in ("nf4", "int8") else None
    cfg = model_config(args.model_config)
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(backend.device)
    torch.manual_seed(0)
    run_cfg = load_config(None, [f"method.r={args.rank}", f"method.alpha={2 * args.rank}", "method.target_modules=[all-linear]",
                                 *(["method.fusion_check=false"] if method_name == "srlora" else [])],
                          method=method_name)
    method = build_method(run_cfg.method)
    fill = None
    if args.sharded_build:  # FSDP2 fills the model block by block from seeded random weights; ZeRO-3: zero.Init
        shapes = {}
        with init_empty_weights(include_buffers=False):
            shapes = {name: tuple(p.shape) for name, p in AutoModelForCausalLM.from_config(cfg, dtype=dtype).named_parameters()}
        fill = RandomWeights(shapes)

    def construct(meta: bool):
        if meta:
            with init_empty_weights(include_buffers=False):
                return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        with contextlib.nullcontext() if args.sharded_build else backend.device:
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype)

    def before_sharding(model) -> None:
        if ckpt == "ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    model_spec = ModelSpec(construct, reader=fill, source="seeded random weights", dtype=dtype, before_sharding=before_sharding)
    sync(backend)
    t0 = time.perf_counter()
    model = backend.build(model_spec, Adapters(method, seed=0, quantizer=quantizer))  # construct, init (block by block), shard
    sync(backend)
    init_s = time.perf_counter() - t0
    names = list(method.layers)
    for layer in method.layers.values():
        layer.log_product = args.log_product
    built_partitioned = sum(backend.partitioned(p) for p in model.parameters()) if backend.layout.backend == "zero3" else 0  # zero.Init
    assert len(names) == len(list(adapted_layers(model)))
    params = [p for _, p in method.trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runner = backend.setup(model, optimizer, scheduler, micro_batch=args.micro_batch, grad_accum=1, max_grad_norm=1.0)
    method.attach(model, backend.shards(), torch.bfloat16 if backend.device.type == "cuda" else None)
    method.on_train_start(model, optimizer, 10**6)
    if args.debug_memory and backend.is_main:
        live: dict[tuple, int] = {}
        for obj in gc.get_objects():
            if torch.is_tensor(obj) and obj.is_cuda:
                key = (tuple(obj.shape), str(obj.dtype), type(obj).__name__)
                live[key] = live.get(key, 0) + obj.untyped_storage().nbytes()
        for key, nbytes in sorted(live.items(), key=lambda kv: -kv[1])[:12]:
            print(f"[live] {key}: {nbytes / 2**20:.0f} MiB (storage)", flush=True)
    memory = {"after_setup_gib": gib(torch.cuda.memory_allocated(backend.device)) if backend.device.type == "cuda" else None}
    if backend.device.type == "cuda":  # the training peak, without building the whole model before sharding
        torch.cuda.reset_peak_memory_stats(backend.device)
    g = torch.Generator().manual_seed(backend.rank)
    batch = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=g).to(backend.device)
    autocast = torch.autocast(backend.device.type, dtype=torch.bfloat16, enabled=backend.device.type == "cuda")

    def train_step(step: int) -> torch.Tensor:
        with autocast:
            loss = runner(input_ids=batch, labels=batch).loss
        backend.backward(loss)
        method.after_backward(model, step)
        backend.step(optimizer, scheduler, params, 1.0)
        return loss.detach()

    event, stage_peaks = {}, {}

    def stage_done(name: str) -> None:  # the peak of each stage: warm-up, each event + its step, timed steps
        if backend.device.type == "cuda":
            stage_peaks[name] = gib(torch.cuda.max_memory_allocated(backend.device))
            torch.cuda.reset_peak_memory_stats(backend.device)

    step = 0
    for _ in range(args.warmup):
        train_step(step)
        step += 1
    stage_done("warmup")
    if method_name == "srlora":  # the whole schedule: every event over all layers, a step after each
        n_events = method.config.n_events
        row_logs = all(lay.edit_log.storage == "rows" for lay in method.layers.values())
        for k in range(1, n_events + 1):
            prof = profiler(backend) if args.profile_event and k == 2 and backend.is_main else None
            sync(backend)
            t0 = time.perf_counter()
            with prof or contextlib.nullcontext():
                records = method.recompose(optimizer, step)
                sync(backend)
            event[f"event{k}_s"] = time.perf_counter() - t0
            if prof is not None:
                print(prof.key_averages().table(sort_by=time_column(backend), row_limit=15), flush=True)
            t0 = time.perf_counter()
            train_step(step)
            sync(backend)
            event[f"event{k}_step_s"] = time.perf_counter() - t0  # one step with the log this event left
            step += 1
            stage_done(f"event{k}")
        times = sorted(event[f"event{k}_s"] for k in range(1, n_events + 1))
        event.update({"event_s": times[len(times) // 2], "events": n_events,
                      # the event factors all-reduced (fp32): fused A rows, and unless every process
                      # has its own rows of the logs (FSDP2's row-sharded logs), fused B columns and loaded U rows
                      "event_allreduce_bytes": 4 * method.config.swap * sum(
                          lay.in_features + (0 if row_logs else 2 * lay.out_features) for lay in method.layers.values()),
                      "row_sharded_logs": row_logs,
                      "score_allreduce_bytes": len(method.layers) * method.config.r * 4,
                      "event_layers": len(records), "edit_log_rank": method.layers[next(iter(method.layers))].edit_log.rank})
    if backend.device.type == "cuda":
        memory["after_events_gib"] = gib(torch.cuda.memory_allocated(backend.device))
    sync(backend)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(step)
        step += 1
    sync(backend)
    elapsed = time.perf_counter() - t0
    stage_done("timed")
    if args.profile_step:  # every rank steps; rank 0 prints where one step's GPU time goes
        prof = profiler(backend) if backend.is_main else None
        with prof or contextlib.nullcontext():
            train_step(step)
            sync(backend)
        if prof is not None:
            print(f"[profile] {spec}: one timed step", flush=True)
            print(prof.key_averages(group_by_input_shape=args.profile_shapes).table(
                sort_by=time_column(backend), row_limit=30, max_name_column_width=60), flush=True)
    tokens_per_gpu = args.steps * args.micro_batch * args.seq / elapsed
    adapter_bytes = sum(getattr(p, "ds_numel", p.numel()) * 4 for _, p in method.trainable_parameters(model))
    result = {
        "run": spec, "backend": backend.layout.backend, "world_size": backend.world_size, "method": method_name,
        "storage": storage, "ckpt": ckpt == "ckpt", "log_product": args.log_product, "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": tokens_per_gpu * flops_per_token(cfg, args.seq) / (args.peak_tflops * 1e12),
        "step_s": elapsed / args.steps, "init_s": init_s, "final_loss": float(loss),
        "peak_gib": max(stage_peaks.values()) if stage_peaks else None, "stage_peak_gib": stage_peaks,
        **memory,
        "adapter_bytes_fp32": adapter_bytes, **event,
        "build": "meta, block by block" if args.sharded_build and not built_partitioned else f"zero.Init ({built_partitioned} parameters partitioned)"
        if built_partitioned else "whole on every GPU",
    }
    ref = REFERENCES.get((backend.layout.backend, ckpt))
    if ref and backend.world_size == 2 and args.model_config != "tiny":
        result["peft_reference_tokens_per_s_per_gpu"] = ref
    runner = model = optimizer = scheduler = params = method = None  # free the GPU for the next run
    backend.engine = None  # ZeRO-3's engine holds the model (the other backends keep no engine)
    gc.collect()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["fsdp2", "zero3"], required=True)
    parser.add_argument("--model-config", default=str(Path(__file__).resolve().parents[1] / "configs" / "models" / "llama3-8b-shape"),
                        help="HF config folder, or 'tiny' for a CPU smoke test")
    parser.add_argument("--runs", nargs="+", default=["lora:bf16:ckpt", "srlora:bf16:ckpt", "lora:bf16:nockpt", "srlora:bf16:nockpt"])
    parser.add_argument("--rank", type=int, default=16, help="adapter rank r")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100/H200: 989)")
    parser.add_argument("--sharded-build", action="store_true",
                        help="never build the model whole on a GPU: FSDP2 fills it block by block from the meta "
                             "device (seeded random weights), ZeRO-3 builds it under zero.Init (for 70B shapes)")
    parser.add_argument("--debug-memory", action="store_true", help="list the largest live CUDA tensors after setup")
    parser.add_argument("--profile-event", action="store_true", help="print a torch.profiler table of the second event")
    parser.add_argument("--log-product", choices=list(LOG_PRODUCTS), default="auto",
                        help="how SRLoRA's bf16 layers compute adapter + edit log (AdaptedLinear.log_product)")
    parser.add_argument("--profile-step", action="store_true", help="print a torch.profiler table of one step after the timed ones")
    parser.add_argument("--profile-shapes", action="store_true", help="group that table by input shapes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench_sharded.json")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    args = parser.parse_args()

    backend = build_backend(args.backend, args.device, bf16=True)
    results = []
    try:
        for spec in args.runs:
            results.append(one_run(args, backend, spec))
            if backend.is_main:
                r = results[-1]
                print(f"[bench] {spec}: {r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, step {r['step_s']:.3f} s, "
                      f"peak {r['peak_gib']} GiB, init {r['init_s']:.2f} s, event {r.get('event_s')}", flush=True)
    finally:
        if backend.is_main and results:
            header = f"{'run':22} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>9} {'init s':>7} {'event s':>8} {'event MB':>9} {'peft ref':>9}"
            print(header)
            for r in results:
                peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
                ev = f"{r['event_s']:.3f}" if "event_s" in r else "-"
                mb = f"{r['event_allreduce_bytes'] / 2**20:.1f}" if "event_s" in r else "-"
                print(f"{r['run']:22} {r['tokens_per_s_per_gpu']:10.0f} {100 * r['mfu']:5.1f}% {peak:>9} "
                      f"{r['init_s']:7.2f} {ev:>8} {mb:>9} {r.get('peft_reference_tokens_per_s_per_gpu', '-'):>9}")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            earlier = json.loads(out.read_text()) if out.is_file() else []  # one launch per run appends
            out.write_text(json.dumps(earlier + results, indent=2))
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
