"""The causal-LM loss: summed next-token cross-entropy, with or without the full logits.

``token_ce_sum`` is the plain loss on a ``(batch, seq, vocab)`` logits tensor. The fused
paths never materialise those logits (at seq 2048 and a 128k vocabulary they are 2 GiB per
sequence in fp32, and their softmax as much again): the head's matmul and the cross-entropy
run over chunks of rows, and the gradients of the hidden states (and of the head, where it is
trained) are computed in the forward, chunk by chunk, as liger-kernel's fused linear
cross-entropy does. ``liger`` is liger-kernel's Triton kernel (CUDA); ``chunked`` is the same
computation in torch (``ChunkedLinearCE``: any device, and the fallback where liger-kernel is
not installed).

The fused loss reaches the model through its own forward, ``install_fused_ce``: the model's
forward takes ``ce_labels=`` and then calls its decoder (``model.base_model``) and its output
head *through the head module*, whose forward computes the loss. So the sharding hooks of
both run as they do for logits: FSDP2 unshards the root's parameters (the head is one of
them) for the root's forward, ZeRO-3 gathers the head's weight for the head's forward.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from lrx.data import IGNORE_INDEX

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk of rows (64 MiB in fp32): 128 rows at a 128k vocabulary, as liger-kernel picks."""

HEAD_SCALES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
"""Config attributes of models whose logits are not the head's plain output (Gemma-2's soft cap,
Cohere's and Granite's scales): the fused loss would be wrong for them, so they keep logits."""


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The tokens a causal LM is scored on: every label but the first, unless masked."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy over ``label_tokens`` (fp32, as transformers computes it)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the positions that predict them (position t predicts label t + 1),
    flattened; the last position of every row predicts nothing. The hidden states stay as
    they are (``hidden.flatten(0, 1)`` is a view: no copy of the largest activation)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()


def _chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on (as for the plain head), else the weight's."""
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _chunk_loss(hc, weight, bias, lc, grads: bool):
    """One chunk: the summed loss (fp32) and, if ``grads``, d(loss)/d(logits) in the matmul's dtype."""
    logits = F.linear(hc.to(weight.dtype), weight, bias)
    z = logits.float()
    valid = lc != IGNORE_INDEX
    target = lc.clamp_min(0)
    lse = torch.logsumexp(z, dim=-1)
    loss = ((lse - z.gather(1, target[:, None]).squeeze(1)) * valid).sum()
    if not grads:
        return loss, None
    g = torch.exp(z - lse[:, None])
    g[torch.arange(len(lc), device=lc.device), target] -= 1.0
    g *= valid[:, None]
    return loss, g.to(logits.dtype)


class ChunkedLinearCE(torch.autograd.Function):
    """``sum CE(hidden @ weight.T + bias, labels)`` over chunks of rows, gradients computed in
    the forward (one chunk of logits alive at a time; the backward only scales them). The
    matmuls run in ``compute_dtype`` (the weight is cast once, not per chunk); the loss, the
    softmax and the head's gradient accumulate in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int):
        need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        dtype = compute_dtype(weight)
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        gh = torch.empty_like(hidden) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need[2] else None
        for start in range(0, hidden.shape[0], rows):
            hc, lc = hidden[start : start + rows].to(dtype), labels[start : start + rows]
            part, g = _chunk_loss(hc, w, b, lc, any(need))
            loss += part
            if gh is not None:
                gh[start : start + rows] = g @ w
            if gw is not None:
                gw += (g.t() @ hc).float()
            if gb is not None:
                gb += g.float().sum(0)
        ctx.save_for_backward(*(t for t in (gh, gw, gb) if t is not None))
        ctx.need, ctx.dtypes = need, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if n else None for n, dtype in zip(ctx.need, ctx.dtypes)]
        return *grads, None, None


def chunked_ce_sum(hidden, weight, bias, labels, rows: int | None = None) -> torch.Tensor:
    """Summed CE of ``hidden (n, d) @ weight.T (+ bias)`` against ``labels (n,)`` (``IGNORE_INDEX``
    skipped), never holding more than ``rows`` rows of logits."""
    rows = rows or _chunk_rows(weight.shape[0])
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if tracked:
        return ChunkedLinearCE.apply(hidden, weight, bias, labels, rows)
    dtype = compute_dtype(weight)
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    return sum((_chunk_loss(hidden[s : s + rows], w, b, labels[s : s + rows], False)[0]
                for s in range(0, hidden.shape[0], rows)), torch.zeros((), device=hidden.device))


def liger_ce_sum(hidden, weight, bias, labels) -> torch.Tensor:
    """liger-kernel's fused linear cross-entropy (Triton, CUDA), summed; fp32 accumulation of
    the head's gradient where it is trained."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dtype = compute_dtype(weight)  # the plain head runs its matmul in one dtype (autocast's)
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return liger_fused_linear_cross_entropy(hidden, weight, labels, bias, ignore_index=IGNORE_INDEX,
                                            reduction="sum", accum_dtype=torch.float32).float()


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:  # not installed, or no Triton (CPU-only torch)
        return False
    return True


def resolve_fused_ce(setting: str, model: nn.Module, device_type: str) -> str:
    """Which loss ``train.fused_loss`` gives this model on this device: ``liger``, ``chunked`` or ``off``.

    ``auto``: liger-kernel on CUDA when it is installed, else the chunked torch loss; ``off`` for a
    model whose logits are not its head's plain output (``HEAD_SCALES``) or whose head is not a
    plain ``nn.Linear`` (an adapted head). An explicit ``liger`` falls back to ``chunked`` (with
    a warning) where liger-kernel cannot run.
    """
    if setting == "off":
        return "off"
    head, config = model.get_output_embeddings(), getattr(model, "config", None)
    scaled = [a for a in HEAD_SCALES if getattr(config, a, None) not in (None, 1, 1.0)]
    if type(head) is not nn.Linear or getattr(model, "base_model", model) is model or scaled:
        why = f"its config sets {scaled[0]}" if scaled else "its output head is not a plain linear layer"
        log.warning("train.fused_loss=%s: %s keeps full logits (%s)", setting, type(model).__name__, why)
        return "off"
    if setting in ("auto", "liger") and device_type == "cuda" and liger_available():
        return "liger"
    if setting == "liger":
        log.warning("train.fused_loss=liger: liger-kernel %s; using the chunked torch loss",
                    "runs on CUDA only" if device_type != "cuda" else "is not installed (pip install liger-kernel)")
    return "chunked"


def install_fused_ce(model: nn.Module, impl: str) -> None:
    """Give ``model`` a forward that takes ``ce_labels=`` and returns the summed next-token loss
    in ``.loss`` without logits (``impl``: ``liger`` or ``chunked``); without ``ce_labels`` it
    is the model's own forward (evaluation, generation). Before sharding: the hooks FSDP2 and
    ZeRO-3 add run around these forwards."""
    head = model.get_output_embeddings()
    plain_forward, plain_head = model.forward, head.forward
    loss_fn = liger_ce_sum if impl == "liger" else chunked_ce_sum

    def head_forward(self, hidden, labels=None):
        if labels is None:
            return plain_head(hidden)
        return loss_fn(hidden.flatten(0, 1), self.weight, self.bias, labels)

    def forward(self, *args, ce_labels=None, **kwargs):
        if ce_labels is None:
            return plain_forward(*args, **kwargs)
        hidden = self.base_model(*args, use_cache=False, **kwargs).last_hidden_state
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(loss=self.get_output_embeddings()(hidden, shifted(ce_labels)))

    head.forward = types.MethodType(head_forward, head)
    model.forward = types.MethodType(forward, model)
    model.lrx_fused_ce = impl


def causal_lm_ce_sum(model, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed label-token cross-entropy of a batch, through ``model`` (what runs batches: the
    module itself, or DeepSpeed's engine around ``module``), fused where ``install_fused_ce``
    gave ``module`` the fused forward."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(module, "lrx_fused_ce", "off") != "off":
        return model(**inputs, ce_labels=batch["labels"]).loss
    return token_ce_sum(model(**inputs).logits, batch["labels"])
