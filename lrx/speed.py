"""What makes a training step fast, applied to the adapted model before it is placed or sharded.

``prepare_for_training`` is the one place the runner (and so ``launch/train.py`` under one
process, torchrun/FSDP2 and deepspeed alike) and ``tools/bench_throughput.py`` turn on the
``train`` settings that change how a step runs, not what it computes: activation
checkpointing (``apply_checkpointing``), the fused causal-LM loss (``lrx.loss``) and
compiled transformer blocks (``compile_blocks``). The order is torchtitan's
(``parallelize_llama``): checkpointing, then compile, then (in the backend) ``fully_shard``.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.loss import install_fused_ce, resolve_fused_ce

log = logging.getLogger(__name__)

COMPILE_BACKEND = "inductor"
"""``torch.compile``'s backend for ``train.compile`` (tests use aot_eager: inductor's CPU code takes
a minute and a half to compile a tiny model here)."""


def _matmuls() -> set:
    aten = torch.ops.aten
    return {aten.mm.default, aten.addmm.default, aten.bmm.default}


def _selective_policy(matmuls, ctx, op, *args, **kwargs):
    """Keep the output of a matmul whose input is at least twice as wide as its output (a dense
    MLP's down projection, LoRA's A): the most recompute saved per byte kept (a matmul's flops per
    output element are its input width; a down projection's 3.5x an attention projection's at
    Llama's shapes). Recompute everything else, attention included."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in matmuls and args[-2].shape[-1] >= 2 * args[-1].shape[-1]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str) -> dict:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for a checkpointing mode."""
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        policy = functools.partial(_selective_policy, _matmuls())
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return kwargs


def apply_checkpointing(model: nn.Module, mode: str, name: str, blocks: list[nn.Module]) -> None:
    """``train.activation_checkpointing``: none, full (every block), selective (every block,
    the outputs of the matmuls that narrow their input kept: ``_selective_policy``) or every2 (full on blocks 0, 2, 4 ...), through the
    model's own (HF) checkpointing of its blocks, so parameter names do not change.

    Raises:
        ConfigError: the model does not support activation checkpointing.
    """
    if mode == "none":
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{name} does not support activation checkpointing; set train.activation_checkpointing=none")
    kwargs = checkpoint_kwargs(mode)
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "every2":
        for index, block in enumerate(blocks):
            if index % 2 and hasattr(block, "gradient_checkpointing"):
                block.gradient_checkpointing = False


def compile_blocks(blocks: list[nn.Module], backend: str | None = None) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``: names and
    parameters unchanged; the blocks' adapted layers are part of the compiled code). Before
    ``fully_shard``, as torchtitan's ``apply_compile``."""
    # One compiled frame serves every block (2 graphs in transformers 5.25: the first block's input
    # needs no gradient); a model whose blocks guard on their index (older transformers read
    # layer_idx) recompiles per block, and dynamo falls back to eager past its recompile limit (8).
    conf = torch._dynamo.config
    limit = "recompile_limit" if hasattr(conf, "recompile_limit") else "cache_size_limit"
    setattr(conf, limit, max(getattr(conf, limit), 2 * len(blocks) + 8))
    # transformers 5.25 checkpoints a block's forward inside the compiled call, so dynamo traces
    # the checkpoint; HF's output-capturing hooks set a context variable in it, a side effect
    # dynamo refuses to trace (one graph break: the whole block ran eager) unless it may skip
    # replaying it in the recompute, which only collects outputs a training step never asks for.
    if hasattr(conf, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        conf.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks:
        block.compile(backend=backend or COMPILE_BACKEND)


def keep_dequantized_weights(model: nn.Module) -> int:
    """Let the quantized linears of every checkpointed block (HF's ``gradient_checkpointing``)
    keep their dequantized weight for their backward (``QuantizedLinear.keeps_weight``): the
    checkpoint frees it after the forward and its recompute makes it again, so a step
    dequantizes each weight twice instead of three times, and holds one block's weights
    dequantized during that block's backward. Called once the model is built and quantized
    (``Trainer``); returns how many layers keep it."""
    from lrx.distributed.fsdp2 import transformer_blocks
    from lrx.quant import QuantizedExperts, QuantizedLinear

    count = 0
    for block in transformer_blocks(model):
        if not getattr(block, "gradient_checkpointing", False):
            continue
        for module in block.modules():
            if isinstance(module, QuantizedLinear) and not isinstance(module, QuantizedExperts):
                module.keeps_weight, count = True, count + 1
    return count


def compiles(setting, device_type: str, quantized: bool, hooked: bool = False) -> bool:
    """Whether ``train.compile`` (True, False or "auto") compiles the blocks: auto compiles on CUDA
    for an unquantized base, where it was measured to pay off (``benchmarks/throughput-1gpu.json``),
    unless the backend gathers parameters by module hooks (``Layout.gather_hooks``: ZeRO-3)."""
    if setting == "auto":
        return device_type == "cuda" and not quantized and not hooked
    return bool(setting)


def prepare_for_training(model: nn.Module, tc, task: str, device_type: str, name: str, quantized: bool = False,
                         hooked: bool = False) -> str:
    """Apply the ``train`` speed settings to an adapted model before it is placed or sharded.

    Args:
        model: the adapted model (HF).
        tc: ``TrainConfig``: ``activation_checkpointing``, ``fused_loss``, ``compile``.
        task: ``causal_lm`` gets the fused loss; other heads keep their logits.
        device_type: where it will train (``cuda`` picks liger-kernel where installed).
        name: the model's name, for messages.
        quantized, hooked: the base is (or will be) quantized; the backend gathers parameters by
            module hooks (either way ``train.compile=auto`` leaves the blocks eager).

    Returns:
        The loss the model computes: ``liger``, ``chunked`` or ``off`` (full logits).
    """
    from lrx.distributed.fsdp2 import transformer_blocks

    blocks = transformer_blocks(model)
    if task == "causal_lm" and getattr(model, "config", None) is not None:
        # No KV cache in training: it costs memory, and transformers derives the per-example
        # masks of packed rows from position_ids only where there is no cache.
        model.config.use_cache = False
    apply_checkpointing(model, tc.activation_checkpointing, name, blocks)
    fused = resolve_fused_ce(tc.fused_loss, model, device_type) if task == "causal_lm" else "off"
    if fused != "off":
        install_fused_ce(model, fused)
    compiled = compiles(tc.compile, device_type, quantized, hooked)
    if compiled:
        compile_blocks(blocks)
    log.info("training: activation checkpointing %s, loss %s, compiled blocks %s", tc.activation_checkpointing,
             "full logits" if fused == "off" else f"fused ({fused})", len(blocks) if compiled else "none")
    return fused
