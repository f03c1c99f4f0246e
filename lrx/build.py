"""Adapting a model while a backend builds it: the runner's ``LayerSetup``.

A backend calls ``wrap`` on the model it constructed (whole, or on the meta device), then
``init`` on each part whose base weights it has just made whole (the whole model, or one
transformer block at a time when it streams), and asks ``file_key`` / ``created`` how the
wrapped model's parameters relate to the base's files. ``Adapters`` answers for a method
and, when a run resumes, for its saved adapter: each adapted layer is then restored (adapter
tensors, edit log replayed onto W0) instead of initialised, while its base is whole. With
``model.quantize`` the same call quantizes the linears of that part right after (adapted
layers from their base plus the edits of their init, ``AdaptedLinear.quantize_base``): the
base is quantized one part at a time, never held whole in full precision once loaded.
Either way the method then places each layer's log (``Method.place_log``: under FSDP2 as
parameters that are sharded by rows with the base).

This order (initialise or restore, quantize, place the log) is written here only: a backend's
``build`` runs it through ``LayerSetup``, and a model that is already whole where it is (the
Python API's ``wrap``, ``load_adapter``, tests and tools) through ``Adapters.adapt``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrx.methods import AdaptedLinear, LocalWeights, Method, WeightAccess

if TYPE_CHECKING:
    from lrx.adapter import SavedAdapter
    from lrx.quant import Quantizer


class Adapters:
    """The ``lrx.distributed.LayerSetup`` of one run.

    Args:
        method: the method that adapts the model.
        seed: adapter initialisation is seeded (every process gets the same adapters); None
            leaves the random state as the caller set it.
        saved: the adapter to restore instead of initialising (a resumed run), or None.
        quantizer: quantizes the base's linears (``model.quantize``), or None.
        load: writes a saved whole value into a (possibly sharded) parameter (``Backend.load_whole``):
            a saved adapter's modules_to_save are restored with it when ``init`` is given the
            whole model, the build's last call.
    """

    def __init__(self, method: Method, seed: int | None = None, saved: SavedAdapter | None = None,
                 quantizer: Quantizer | None = None, load=None):
        self.method, self.seed, self.saved, self.quantizer, self.load = method, seed, saved, quantizer, load
        self._done: set[int] = set()
        self._created: set[int] = set()
        self._root: nn.Module | None = None
        self._where: dict[int, tuple[int, str]] = {}  # id(layer) -> (index, name), from method.layers

    def adapt(self, model: nn.Module, weights: WeightAccess | None = None) -> list[str]:
        """Wrap and initialise (or restore) a model that is already whole where it is: what a
        backend's build does between loading and placing, for one process (``weights``: how
        the base is read, default ``LocalWeights``; a model built under ``zero.Init``: ZeRO-3's).

        Returns:
            Qualified names of the adapted modules, in module order.
        """
        names = self.wrap(model)
        self.init(model, weights or LocalWeights())
        return names

    def wrap(self, model: nn.Module) -> list[str]:
        self._root = model
        if self.seed is not None:
            torch.manual_seed(self.seed)
        names = self.method.wrap(model)
        self._where = {}
        self._created = {id(p) for layer in self.method.layers.values() for p in layer.adapter_params().values()}
        if self.quantizer is not None:
            self.quantizer.plan(model, self.method.saved_modules)
        return names

    def init(self, root: nn.Module, weights: WeightAccess) -> None:
        fresh = []
        for module in root.modules():
            if not isinstance(module, AdaptedLinear) or id(module) in self._done:
                continue
            self._done.add(id(module))
            fresh.append(module)
            index, name = self._locate(module)
            module.restore_buffers()  # data buffers (EigenLoRAx's bases) of a layer built on meta
            if self.saved is None:
                with weights.gathered(module), self._full_base(module):
                    self.method.init_layer(name, index, module, weights)
            else:  # a restored log is replayed onto the base only where it is folded
                with weights.gathered(module) if module.fold_edits else contextlib.nullcontext():
                    self.saved.restore_layer(name, module)
            if self.quantizer is not None and not self.quantizer.bakes:  # stored codes: one layer dequantized at a time
                self.quantizer.apply(module, weights.gathered)
        if self.quantizer is not None:  # from the base plus the init's edits, while the log is whole
            self.quantizer.apply(root, weights.gathered)
        for module in fresh:
            self.method.place_log(module, weights)  # FSDP2: the log's rows are split with the base
        if self.saved is not None and root is self._root:  # modules_to_save, into their shards
            self.saved.restore_modules(root, self.method, self.load)

    def one_layer(self, name: str, layer: AdaptedLinear) -> AdaptedLinear:
        """Build one adapted layer that lives outside any model (the streaming export's
        one-layer copy of ``name``, on its base W0) as ``init`` builds each layer of a model:
        restored from ``saved`` (or initialised as layer 0), its base quantized (the quantizer
        planned on the layer), its log placed (whole: one process)."""
        self._done.discard(id(layer))  # a new layer: an id here was a freed layer's
        self._where[id(layer)] = (0, name)
        if self.quantizer is not None:
            self.quantizer.plan(layer, [])
        self.init(layer, LocalWeights())
        return layer

    def _locate(self, layer: AdaptedLinear) -> tuple[int, str]:
        """``(index, name)`` of an adapted layer of the wrapped model, for ``init_layer``."""
        if id(layer) not in self._where:
            self._where.update({id(lay): (i, n) for i, (n, lay) in enumerate(self.method.layers.items())})
        return self._where[id(layer)]

    def _full_base(self, module: AdaptedLinear):
        """The layer's base weight in full precision for its init (a stored quantized base dequantized)."""
        return self.quantizer.dequantized_base(module) if self.quantizer is not None else contextlib.nullcontext()

    def file_key(self, name: str) -> str:
        """Adapted layers hold the original linear as ``.base``: drop that part of the name (and,
        for fused experts, the ``.weight`` their base holds the original parameter as)."""
        parts = name.split(".")
        key = ".".join(p for i, p in enumerate(parts) if not (p == "base" and ".".join(parts[:i]) in self.method.layers))
        layer = self.method.layers.get(key.removesuffix(".weight"))
        return key.removesuffix(".weight") if getattr(layer, "fused", False) else key

    def created(self, param: torch.Tensor) -> bool:
        """Adapter tensors, and weights a quantizer makes from codes stored quantized (``Quantizer.replaces``)."""
        return id(param) in self._created or (self.quantizer is not None and self.quantizer.replaces(param))
