"""``--dry-run``: resolve the config, build the model on the meta device, print the plan.

No weights are read and nothing is allocated: the model is constructed from its config under
``torch.device("meta")`` and wrapped by the method without initialisation, so an 8B-shaped
plan takes seconds on a CPU. The memory estimate counts parameters, gradients, Adam moments
and method state per process (with the edit log, row-sharded under FSDP2), and the pinned
host memory of an offloaded edit log; activations and the blocks FSDP2 all-gathers for a
forward are not estimated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lrx.config import RunConfig
from lrx.distributed import Layout, plan_layout
from lrx.methods import adapted_layers, build_method
from lrx.methods.editlog import log_storage
from lrx.models import load_model, resolve_task, take_stored_quantization
from lrx.quant import QuantSettings, quantized_linears

GIB = 2**30


def meta_model(config: RunConfig):
    """The model of ``config`` built on the meta device (no weights read or allocated), with
    the head the run would give it."""
    mc = config.model
    task = resolve_task(mc.task, "causal_lm" if config.data.format == "instruct" else "classification")
    return load_model(mc.name_or_path, task=task, dtype=mc.dtype, gguf_file=mc.gguf_file, meta=True)


def plan(config: RunConfig, world_size: int | None = None) -> str:
    """A human-readable plan: world size, sharding, per-process memory estimate.

    Args:
        config: the resolved run config.
        world_size: processes to plan for; default WORLD_SIZE from the launcher, else 1.
    """
    take_stored_quantization(config.model)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    layout = plan_layout(config.distributed.backend, world, config.distributed.replicate)
    model = meta_model(config)
    method = build_method(config.method)
    method.wrap(model)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(model))
    base = sum(p.numel() for p in model.parameters()) - trainable
    layers = list(adapted_layers(model))
    shard = layout.shard_size
    base_bytes, stats_bytes = _base_bytes(model, config, method, world)
    storage = run_log_storage(config, method, layout)
    row_log, offload = storage == "rows", storage == "host"
    state = sum(method.state_bytes(layer, shard, 2 if offload else 4, shard if row_log else 1) for _, layer in layers)
    host_log = 4 * (method.edit_rank_bound() or 0) * sum(lay.in_features + lay.out_features for _, lay in layers) if offload else 0
    # Trainable parameters are fp32, with fp32 gradients and two fp32 Adam moments: 16 bytes.
    rows = [
        ("base weights (frozen)", layout.held(base_bytes)),
        *([(f"{config.model.quantize} statistics (whole)", stats_bytes)] if stats_bytes else []),
        ("adapters (fp32)", layout.held(4 * trainable)),
        ("adapter gradients (fp32)", layout.held(4 * trainable)),
        ("Adam moments (2 x fp32)", layout.held(8 * trainable)),
        ("method state (peak, est.)", state),
    ]
    quantized = f", {config.model.quantize} base" if config.model.quantize != "none" else ""
    lines = [
        f"plan: {config.model.name_or_path} ({config.model.dtype}{quantized}), method {method.name}, backend {layout.backend}, "
        f"world size {world}",
        f"  parameters: base {base:,}, trainable {trainable:,} ({100 * trainable / max(base, 1):.3f} %), "
        f"adapted linear layers {len(layers)}",
        f"  sharding: {'none' if shard == 1 else f'parameters, gradients and optimizer state over {world} processes'}"
        + (f" ({layout.how})" if layout.how else ""),
        "  per-process memory estimate (activations not included):",
    ]
    lines += [f"    {name:28s} {value / GIB:8.2f} GiB" for name, value in rows]
    lines.append(f"    {'total':28s} {sum(v for _, v in rows) / GIB:8.2f} GiB")
    if host_log:
        lines.append(f"  host memory per process: exact fp32 edit log {host_log / GIB:.2f} GiB (pinned; "
                     "method.edit_log=device keeps it on the GPU instead)")
    elif row_log:
        lines.append(f"  host memory per process: none (the exact fp32 edit log is in method state, its rows "
                     f"split over the {shard} processes of a shard group with the base)")
    lines.append(f"  run directory: {Path(config.logging.output_dir)}")
    return "\n".join(lines)


def run_log_storage(config: RunConfig, method, layout: Layout) -> str:
    """Where the run keeps its layers' edit logs, as training will place them
    (``lrx.methods.editlog.log_storage``, the one chooser, which ``Method.place_log`` and
    ``Method.attach`` ask too): ``rows`` where the layout splits rows and the method bounds the
    log's rank, ``host`` for an unfolded log while the forward runs in bf16 (as the trainer
    decides it; a plan assumes a GPU unless train.device=cpu), else ``device``."""
    tc, mcfg = config.train, config.method
    compute_dtype = torch.bfloat16 if tc.bf16 and tc.device != "cpu" else None
    logged = config.model.quantize != "none" or not mcfg.folds(getattr(torch, config.model.dtype))  # a quantized base takes no folds
    return log_storage(shards_rows=layout.splits_rows, bound=method.edit_rank_bound(), logged=logged,
                       offloads=mcfg.offloads_edit_log(compute_dtype))


def _base_bytes(model, config: RunConfig, method, world: int = 1) -> tuple[int, int]:
    """Bytes of the frozen base: ``(sharded, whole)``. Linears ``model.quantize`` stores
    quantized count their codes (sharded) and statistics (kept whole on every process), adapted
    fused experts weights too, on any number of processes (``QuantSettings.for_processes``)."""
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    stats = 0
    if config.model.quantize != "none":
        settings = QuantSettings.for_processes(config.model.quantize, config.model.double_quant, world)
        linears = dict(model.named_modules())
        for name in quantized_linears(model, method.saved_modules, settings.experts).values():
            weight = linears[name].weight
            frozen.pop(id(weight), None)
            shape = (weight.shape[:-1].numel(), weight.shape[-1])  # fused experts: (experts * rows) x cols
            stats += settings.stat_bytes(*shape)
            frozen[id(weight)] = torch.empty(settings.code_bytes(*shape), dtype=torch.uint8, device="meta")
    return sum(p.numel() * p.element_size() for p in frozen.values()), stats
