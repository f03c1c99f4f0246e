"""The Python API: adapt a model you already have, save, load and merge its adapter.

    adapter = lrx.wrap(model, "srlora", r=8, r_target=24)   # model adapted in place
    ...                                                      # train adapter.model (lrx.hf.LrxCallback)
    adapter.save("out/adapter", peft="out/adapter_peft")    # lrx format, and a peft LoRA export
    adapter = lrx.load("out/adapter", fresh_base_model)     # back, with the method state
    merged = adapter.merge()                                 # plain transformers model

``wrap`` builds the adapters as a one-process ``lrx.distributed`` build does (``lrx.build.Adapters``:
the same seeding, the same initialisation); a model that ``accelerate`` shards afterwards (FSDP2,
ZeRO-3) is found by the callback, which hands the method its shards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrx.adapter import load_adapter, read_adapter_config
from lrx.build import Adapters
from lrx.checkpoint import save_final_adapter
from lrx.distributed.found import find_placement, init_weights
from lrx.errors import ConfigError, LrxError
from lrx.merge import merge_into_linears
from lrx.methods import Method, MethodConfig, build_method, get_method_class
from lrx.quant import QUANT_TYPES, Quantizer, QuantSettings, bitsandbytes

HANDLE_ATTR = "lrx_adapter"  # the attribute of a wrapped model that holds its Adapter


def method_config(method: str, **settings: Any) -> MethodConfig:
    """The typed config of ``method`` with ``settings`` (the keys of its ``method.*`` section).

    Raises:
        ConfigError: an unknown method or setting (the message lists the valid ones), or a bad value.
    """
    cls = get_method_class(method).config_cls
    known = {f.name for f in dataclasses.fields(cls)} - {"name"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{method} has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}")
    try:
        return cls(name=method, **settings)
    except ValueError as e:
        raise ConfigError(f"{method}: {e}") from None


def needs_training_hooks(method: Method) -> bool:
    """Whether ``method`` does something around the optimizer step (SRLoRA's importance and
    events): a model it adapted trains as the method intends only with its hooks called
    (``lrx.hf.LrxCallback``). Read from the hooks the class overrides, not from its name."""
    hooks = ("after_backward", "after_optimizer_step", "on_train_start")
    return any(getattr(type(method), h) is not getattr(Method, h) for h in hooks)


class Adapter:
    """A model adapted by an lrx method, and what can be done with its adapter.

    Attributes:
        model: the adapted model (the object given to ``wrap`` or ``load``, changed in place).
        method: the method, with its layers (``method.layers``) and state.
        hooked: set by whoever calls the method's training hooks (``lrx.hf.LrxCallback``); a
            training forward of a model whose method needs hooks is refused without it.
    """

    def __init__(self, model: nn.Module, method: Method, quantize: dict[str, Any] | None = None):
        self.model, self.method = model, method
        self.quantize = quantize  # the base's quantization (QuantSettings.to_dict()), or None
        self.hooked = False
        model.__dict__[HANDLE_ATTR] = self  # not a submodule: kept out of state_dict and module traversal
        self._check = model.register_forward_pre_hook(self._check_hooked) if needs_training_hooks(method) else None

    def _check_hooked(self, module: nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled() and not self.hooked:
            raise LrxError(f"{self.method.name} is training without its hooks (what it does around the optimizer step would silently not happen); "
                           "add callbacks=[lrx.hf.LrxCallback()] to the Trainer, or call the method's hooks yourself "
                           "and set adapter.hooked = True")

    def meta(self) -> dict[str, Any]:
        """What the adapter file records about the base (as the command line's ``adapter_meta``)."""
        config = getattr(self.model, "config", None)
        kind = type(self.model).__name__
        task = "causal_lm" if kind.endswith("ForCausalLM") else \
            ("regression" if getattr(config, "num_labels", 2) == 1 else "classification") \
            if kind.endswith("ForSequenceClassification") else None
        floats = (p.dtype for layer in self.method.layers.values() for p in (layer.base.weight,) if p.is_floating_point())
        dtype = next(floats, None) or next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        return {"base_model": getattr(config, "_name_or_path", None) or None, "gguf_file": None, "tokenizer": None,
                "task": task, "num_labels": getattr(config, "num_labels", None) if task != "causal_lm" else 0,
                "label_names": None, "model_dtype": str(dtype).removeprefix("torch."), "quantize": self.quantize}

    def save(self, path: str | Path, *, peft: str | Path | None = None) -> Path:
        """Write the adapter in lrx's format (adapter tensors, edit log, method state) and, with
        ``peft``, its total change as a peft LoRA adapter there too (``PeftModel.from_pretrained``).
        Of a model sharded over several processes (FSDP2, ZeRO-3) every process must call it (the
        tensors are gathered whole, adapter-sized); the first process writes.

        Args:
            path: the lrx adapter folder (written atomically).
            peft: the folder of the peft export, or None for none.
        Returns:
            ``path``.
        """
        placement = find_placement(self.model)
        return save_final_adapter(path, self.model, self.method, self.meta(), placement.gather, placement.rank == 0,
                                  peft=peft)  # the run's final save too

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold every adapter and edit into its base and put plain linears back (peft's
        ``merge_and_unload``): the model a plain transformers checkpoint holds. One process, or
        each of several holding whole copies (DDP); a sharded model (FSDP2, ZeRO-3) is refused
        in one line, before anything changes: save the adapter and merge it onto a whole base.

        Raises:
            ConfigError: the model is sharded over several processes.
        """
        placement = find_placement(self.model)
        if placement.sharded:
            raise ConfigError(f"merge() needs the whole model in one process, and this one is sharded ({placement.kind}, "
                              f"{placement.world_size} processes); save the adapter (adapter.save(path), every process) "
                              "and merge it in one process: lrx.load(path, base_model).merge()")

        merge_into_linears(self.model)
        self.model.__dict__.pop(HANDLE_ATTR, None)
        if self._check is not None:
            self._check.remove()
        return self.model


def wrap(model: nn.Module, method: str = "lora", *, seed: int = 0, quantize: str = "none",
         double_quant: bool = True, **settings: Any) -> Adapter:
    """Adapt ``model`` in place with ``method`` and ``settings`` (the method's config keys:
    ``r``, ``alpha``, ``target_modules``, ``r_target`` ...), initialised as ``launch/train.py``
    initialises it on one device.

    Args:
        model: a ``PreTrainedModel`` (or any module with the target linears): whole, or built
            partitioned under DeepSpeed's ``zero.Init`` (then every process calls ``wrap``).
        method: a registered method name (``lrx.methods.available_methods()``).
        seed: seeds the adapters' initialisation (the same on every process).
        quantize: ``nf4``, ``fp4`` or ``int8`` stores every frozen linear but the head quantized
            with bitsandbytes, as ``model.quantize`` does (QLoRA; PiSSA/SRLoRA quantize their
            residual and keep later edits exact beside it); ``none`` keeps the base as it is.
        double_quant: 4-bit: quantize the block scales too (``model.double_quant``).
    Returns:
        The ``Adapter``; ``adapter.model`` is ``model``.
    Raises:
        ConfigError: unknown method or setting, bad value, no target module found, or a
            quantization that cannot work (an unknown kind, ``fuse="fold"``, a partitioned model).
    """
    if HANDLE_ATTR in model.__dict__:
        raise ConfigError("this model is already adapted by lrx; wrap the original base model")
    built = build_method(method_config(method, **settings))
    quantizer = _quantizer(model, built, quantize, double_quant)
    Adapters(built, seed, None, quantizer).adapt(model, init_weights(model))
    return Adapter(model, built, quantizer.settings.to_dict() if quantizer is not None else None)


def _quantizer(model: nn.Module, method: Method, kind: str, double_quant: bool) -> Quantizer | None:
    """The ``Quantizer`` of ``wrap(quantize=kind)``, or None; one-line errors for what cannot work."""
    if kind == "none":
        return None
    if kind not in QUANT_TYPES:
        raise ConfigError(f"quantize={kind!r} is not one of {', '.join(QUANT_TYPES)}")
    if getattr(method.config, "fuse", None) == "fold":
        raise ConfigError(f"fuse='fold' cannot fold edits into a {kind} base (each fold would be rounded away); "
                          "leave fuse at 'auto' (edits stay exact in the log beside it)")
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ConfigError(f"quantize={kind!r} needs the model whole in each process, and this one was built partitioned "
                          "(DeepSpeed zero.Init: zero3_init_flag); set zero3_init_flag: false, or wrap without quantize")
    bitsandbytes()  # missing: one line naming the fix
    return Quantizer(QuantSettings(kind, double_quant))


def load(path: str | Path, model: nn.Module) -> Adapter:
    """Adapt ``model`` (the base model the adapter was trained on) and load the lrx adapter at
    ``path`` into it: adapter tensors, the edit log replayed onto the base, the method state.

    Raises:
        LrxError: missing or corrupt files, or an adapter made for another model.
    """
    return Adapter(model, load_adapter(path, model), read_adapter_config(path).get("quantize"))
