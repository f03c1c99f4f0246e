"""One variant of ``tools/bench_throughput.py``, in its own process: build, warm up, time.

lrx goes through what ``launch/train.py`` runs (``load_config``, the backend's ``build`` with
the runner's ``Adapters`` and ``prepare_for_training``, ``Trainer.fit``); the peft baselines
are written here as the issue that asked for them describes them.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch
from bench_throughput import PROJECTIONS, flops_per_token, model_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Times the repeats: marks after the warm-up and after each repeat's last step; then, with
    ``profile`` > 0, profiles that many more steps (after the timed ones, so they are not slowed)."""

    def __init__(self, device: torch.device, warmup: int, steps: int, repeats: int, profile: int = 0):
        self.device, self.marks = device, {warmup + k * steps for k in range(repeats + 1)}
        self.times: list[float] = []
        self.profile_steps, self.profiler, self.profile = profile, None, None
        self.last = warmup + steps * repeats

    def __call__(self, step: int) -> None:
        if step in self.marks:
            _sync(self.device)
            self.times.append(time.perf_counter())
        if self.profile_steps and step == self.last:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=acts)
            self.profiler.__enter__()
            self.t0 = time.perf_counter()
        elif self.profiler is not None and step == self.last + self.profile_steps:
            _sync(self.device)
            wall = time.perf_counter() - self.t0
            self.profiler.__exit__(None, None, None)
            self.profile = profile_summary(self.profiler, self.profile_steps, wall)
            self.profiler = None


KINDS = [("gemm", ("gemm", "nvjet", "sm90", "cutlass", "cublas", "matmul", "splitk")),
         ("attention", ("flash", "fmha", "attention", "cudnn")),
         ("copy/cast", ("copy", "cast", "memcpy", "memset", "cat", "fill")),
         ("optimizer", ("adam", "foreach", "multi_tensor")),
         ("loss", ("cross_entropy", "liger", "softmax", "log_softmax", "nll")),
         ("nccl", ("nccl",))]


def profile_summary(prof, steps: int, wall: float) -> dict:
    """Where a step's device time goes: busy fraction of the wall time, time per kernel kind,
    the 15 kernels taking the most (ms per step)."""
    events = [e for e in prof.key_averages()
              if getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) > 0
              and "cuda" in str(getattr(e, "device_type", "")).lower()]
    ms = lambda e: getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 1e3 / steps  # noqa: E731
    kinds: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, words in KINDS if any(w in name for w in words)), "other (elementwise, norms)")
        kinds[kind] = kinds.get(kind, 0.0) + ms(e)
    busy = sum(kinds.values())
    top = sorted(events, key=ms, reverse=True)[:15]
    return {"step_ms": 1e3 * wall / steps, "device_busy_ms": busy, "by_kind_ms": {k: round(v, 2) for k, v in
            sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [[e.key[:90], round(ms(e), 2), e.count // steps] for e in top]}


def _random_model(cfg, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:  # built where it trains: an 8B random init on the host would take minutes
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _lrx(args, v: dict, cfg, device: torch.device, clock_args) -> tuple[Clock, float]:
    import datasets

    from lrx.build import Adapters
    from lrx.config import load_config
    from lrx.data import Collator
    from lrx.distributed import ModelSpec, build_backend
    from lrx.methods import build_method
    from lrx.quant import Quantizer, QuantSettings
    from lrx.speed import compiles, prepare_for_training
    from lrx.trainer import Trainer

    settings = dict(v["settings"])
    backend_name = settings.pop("backend", "single" if v["quantize"] == "nf4" or device.type == "cpu" else "fsdp2")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    adapter = [f"method.r={args.rank}", f"method.alpha={2 * args.rank}", "method.target_modules=[all-linear]"]
    events = getattr(load_config(None, adapter, method=v["method"]).method, "n_events", 0)
    # SRLoRA's whole schedule first (interval 1: an event after each of the first steps), so the
    # timed steps carry its full edit log
    warmup = args.warmup + events
    total = warmup + args.steps * args.repeats + args.profile
    overrides = [*adapter, f"model.dtype={dtype}", f"model.quantize={v['quantize']}", f"train.device={device.type}",
                 f"train.activation_checkpointing={v['checkpointing']}", f"train.batch_size={args.micro_batch}",
                 f"train.max_steps={total}", f"train.log_every={total}", "train.eval_at_start=false",
                 "data.eval_path=none", "logging.tensorboard=false", "logging.progress=false",
                 f"distributed.backend={backend_name}", *(["method.interval=1"] if events else []),
                 *(f"train.{k}={val}" for k, val in settings.items())]
    config = load_config(None, overrides, method=v["method"])
    backend = build_backend(config.distributed.backend, config.train.device, bf16=True)
    method = build_method(config.method)
    quantizer = Quantizer(QuantSettings(v["quantize"]), backend.device) if v["quantize"] != "none" else None
    def before_sharding(model) -> None:
        hooked = backend.layout.gather_hooks
        v["settings"]["loss"] = prepare_for_training(model, config.train, "causal_lm", device.type, "bench",
                                                     quantized=v["quantize"] != "none", hooked=hooked)
        v["settings"]["compile"] = str(compiles(config.train.compile, device.type, v["quantize"] != "none",
                                                hooked)).lower()

    v["settings"]["backend"] = backend_name
    spec = ModelSpec(lambda meta: _random_model(cfg, getattr(torch, dtype), device), dtype=getattr(torch, dtype),
                     before_sharding=before_sharding)
    model = backend.build(spec, Adapters(method, config.train.seed, None, quantizer))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch * total, args.seq), generator=g).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    clock = Clock(device, warmup, *clock_args, args.profile)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, model, method, data, None, Collator(0, "causal_lm"), "causal_lm", [], backend.device,
                          run_dir=Path(run_dir), backend=backend,
                          callbacks=[lambda t: clock(t.step)])
        method.check_schedule(trainer.total_steps)
        if device.type == "cuda":  # the training peak (warm-up, SRLoRA's events, timed steps), not the build's
            torch.cuda.reset_peak_memory_stats(device)
        trainer.fit()
        loss = trainer.history[-1]["loss"]
    backend.close()
    return clock, loss


def _peft_model(v: dict, cfg, device: torch.device, rank: int):
    """The peft baselines' model: bf16 (or nf4 linears), LoRA on the 7 projections."""
    from peft import LoraConfig, get_peft_model

    if v["impl"] == "peft+liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _random_model(cfg, dtype, device)
    model.config.use_cache = False
    if v["quantize"] == "nf4":
        _to_linear4bit(model, device)
        from peft import prepare_model_for_kbit_training

        model.is_loaded_in_4bit = True  # as from_pretrained(quantization_config=...) marks it
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=v["checkpointing"] == "full",
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif v["checkpointing"] == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _to_linear4bit(model, device: torch.device) -> None:
    """Every decoder linear a bitsandbytes ``Linear4bit``: nf4, double quantization, bf16 compute."""
    import bitsandbytes as bnb

    for block in model.model.layers:
        for name, module in list(block.named_modules()):
            if type(module) is torch.nn.Linear:
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                      device="meta")
                q.weight = bnb.nn.Params4bit(module.weight.data.to("cpu" if device.type == "cpu" else device),
                                             requires_grad=False, quant_type="nf4", compress_statistics=True)
                q.weight = q.weight.to(device) if device.type == "cuda" else q.weight._quantize(device)
                setattr(parent, name.rpartition(".")[2], q)


def _peft(args, v: dict, cfg, device: torch.device, clock_args) -> tuple[Clock, float]:
    model = _peft_model(v, cfg, device, args.rank)
    if v["quantize"] == "none":  # FSDP2 on one GPU, as the baseline was run
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for block in model.base_model.model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and v["quantize"] == "nf4" \
        else contextlib.nullcontext()
    clock = Clock(device, args.warmup, *clock_args, args.profile)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, args.warmup + args.steps * args.repeats + args.profile + 1):
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock(step)
    return clock, float(loss)


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_variant(args, v: dict) -> dict:
    """Build, warm up and time one variant; its row of the benchmark's JSON."""
    cfg = model_config(args.model_config)
    device = torch.device(args.device)
    clock_args = (args.steps, args.repeats)
    clock, loss = (_lrx if v["impl"] == "lrx" else _peft)(args, v, cfg, device, clock_args)
    tokens = args.steps * args.micro_batch * args.seq
    repeats = [tokens / (b - a) for a, b in zip(clock.times, clock.times[1:])]
    tok_s = sum(repeats) / len(repeats)
    cuda = device.type == "cuda"
    return {
        **v, "tok_s": tok_s, "repeats_tok_s": repeats, "mfu": tok_s * flops_per_token(cfg, args.seq) / (args.peak_tflops * 1e12),
        # the device's peak over warm-up and timed steps (CUDA), or the process's peak resident memory (CPU)
        "peak_gib": round((torch.cuda.max_memory_allocated(device) if cuda else _max_rss()) / 2**30, 2),
        "card": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
        "final_loss": loss, "seq": args.seq, "micro_batch": args.micro_batch, "rank": args.rank,
        "model": args.model_config.rstrip("/").rsplit("/", 1)[-1],
        **({"profile": clock.profile} if clock.profile else {}),
    }
