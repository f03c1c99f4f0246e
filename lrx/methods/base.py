"""The method protocol: what a LoRA-family method provides to the trainer.

A method is one class registered under a name (see ``lrx.methods.register_method``) with a
``@dataclass(kw_only=True)`` config. The trainer talks to it only through the hooks below,
which all have defaults, so it never branches on a method's name. Methods are pure torch:
base weights are reached through the seam of ``lrx.methods.seam`` (``WeightAccess`` at
initialisation, ``Shards`` in training), which the distributed backends implement, never by
inspecting how a backend stores them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.methods.editlog import log_storage
from lrx.methods.experts import AdaptedExperts, ExpertWeights, adapt_experts, is_experts_weight
from lrx.methods.layer import AdaptedLinear
from lrx.methods.seam import LocalShards, Shards, WeightAccess

log = logging.getLogger(__name__)

# Heads that sequence-classification models create fresh (BERT: classifier, Llama: score).
TASK_HEADS = ("classifier", "score")
# Never adapted by target_modules=[all-linear], nor the linears inside them (RoBERTa's
# classifier.dense, classifier.out_proj): output heads map to vocab/labels.
OUTPUT_HEADS = ("lm_head", "classifier", "score", "pooler.dense")


@dataclass(kw_only=True)
class MethodConfig:
    name: str = "lora"
    """Method to train (see --help for the registered ones)."""
    r: int = 8
    """Adapter rank: number of (B column, A row) pairs per adapted matrix."""
    alpha: float = 16.0
    """Adapter scale numerator: the product B A is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers to adapt: module-name suffixes (q_proj), regexes (.*attention.*query) or all-linear."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter; None = a fresh classification head if present."""

    # Settings that name files (EigenLoRAx's basis): recorded absolute in adapter files and, in
    # older files, resolved from the adapter's folder.
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()
    # Settings the method fills in when it is built, from their defaults (EigenLoRAx: the basis's
    # sha256 and modules): a checkpoint records them filled; a resumed run has them at the default
    # until its method is built (``unfilled``).
    FILLED_WHEN_BUILT: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one linear layer, e.g. [q_proj, v_proj]")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def folds(self, weight_dtype: torch.dtype) -> bool:
        """Whether edits of a base stored in ``weight_dtype`` are folded into it; a method that
        never edits its base has nothing to fold (``EditingConfig`` decides for those that do)."""
        return True

    def offloads_edit_log(self, compute_dtype: torch.dtype | None) -> bool:
        """Whether unfolded edit logs move to host memory when the forward runs in
        ``compute_dtype`` (None: no autocast); never for methods that keep no log."""
        return False


@dataclass(kw_only=True)
class EditingConfig(MethodConfig):
    """The settings of methods that edit the frozen base (PiSSA's residual, SRLoRA's events):
    where the edits live, and how the base's principal directions are computed."""

    fuse: Literal["auto", "fold", "log"] = "auto"
    """Where frozen edits of the base live: fold = added into the base weight in place; log = fp32
    low-rank factors applied beside the adapter (lossless on bf16 bases); auto = fold for fp32 bases."""
    edit_log: Literal["auto", "device"] = "auto"
    """Where the exact fp32 log of unfolded edits lives: device, or (auto) in pinned host memory when
    the forward runs in bf16 on a GPU, with only its bf16 copy on the device: the same training,
    half the log's GPU memory, for 4 bytes x log rank x (in + out) of host memory per adapted
    layer and process (--dry-run prints the total). Under FSDP2 over several processes neither: each
    process holds its rows of the fp32 log on the device (row-sharded with the base)."""

    svd: Literal["exact", "randomized"] = "exact"
    """SVD of the base weight: exact, or randomized (seeded subspace iteration; fast on large matrices)."""
    svd_niter: int = 4
    """Power iterations of the randomized SVD."""
    svd_oversample: int = 16
    """Extra sketch columns of the randomized SVD."""
    svd_seed: int = 0
    """Seed of the randomized SVD sketch (layer i uses svd_seed + i)."""

    def folds(self, weight_dtype: torch.dtype) -> bool:
        """Whether edits of a base stored in ``weight_dtype`` are folded into it (``fuse``)."""
        return self.fuse == "fold" or (self.fuse == "auto" and weight_dtype == torch.float32)

    def offloads_edit_log(self, compute_dtype: torch.dtype | None) -> bool:
        """Whether unfolded edit logs move to host memory when the forward runs in
        ``compute_dtype`` (None: no autocast) (``edit_log``)."""
        return compute_dtype not in (None, torch.float32) and self.edit_log == "auto"


# Keys every method config had before only the editing methods kept them (files written then
# still load: a key at this value is dropped where the method has no such setting).
RETIRED_KEYS = {"fuse": "auto", "edit_log": "auto"}


def without_retired_keys(config_cls: type[MethodConfig], values: dict) -> dict:
    """``values`` of a method config without the retired keys ``config_cls`` no longer has,
    where they hold the value every run had (any other value stays, to be refused as unknown)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in values.items() if k in known or RETIRED_KEYS.get(k, object()) != v}


def unfilled(config_cls: type[MethodConfig], saved: dict, given: dict) -> dict:
    """``saved`` (a checkpoint's method settings) with the settings ``config_cls`` fills in when
    built put back to what ``given`` holds, where ``given`` holds their default."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config_cls) if f.name in config_cls.FILLED_WHEN_BUILT}
    return {**saved, **{k: given[k] for k, v in defaults.items() if k in given and given[k] == v}}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def find_targets(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module | nn.Parameter]]:
    """Linear modules and fused experts weights whose qualified name matches any pattern (suffix,
    regex or all-linear): ``(name, linear)``, or ``(name, parameter)`` for an experts weight
    (``lrx.methods.experts``; a pattern naming the experts module targets all of its weights).

    Raises:
        ConfigError: when nothing matches, or a pattern matches a module that is not linear.
    """
    wrapped = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}
    everything = "all-linear" in patterns
    found = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear) or name in wrapped:
            continue
        experts = [(f"{name}.{pname}", p) for pname, p in module.named_parameters(recurse=False)
                   if is_experts_weight(module, p)]
        whole = everything or any(_matches(name, p) for p in patterns)
        found += [(n, p) for n, p in experts if whole or any(_matches(n, pat) for pat in patterns)]
        if everything:
            hit = isinstance(module, nn.Linear) and not any(f".{h}." in f".{name}." for h in OUTPUT_HEADS)
        else:
            hit = whole and not experts
        if not hit:
            continue
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"target_modules matches '{name}', a {type(module).__name__}, not a linear layer; "
                "narrow method.target_modules"
            )
        found.append((name, module))
    if everything:
        _warn_fused_weights(model)
    if not found:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        conv = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"})
        if conv:  # GPT-2's x @ W + b layers (transformers.pytorch_utils.Conv1D)
            raise ConfigError(f"this model's linear maps are Conv1D layers ({', '.join(conv)}), which lrx does not "
                              "adapt (it adapts nn.Linear and fused MoE experts); use peft for GPT-2-style models")
        raise ConfigError(
            f"method.target_modules {patterns} matches no linear layer; this model's linear layers "
            f"are named {linear} (or use all-linear)"
        )
    return found


def _warn_fused_weights(model: nn.Module) -> None:
    """One warning naming the weights ``all-linear`` leaves alone although they may be matrices
    of linear maps: parameters of 3 or more dims outside ``nn.Linear`` modules that are not
    fused experts weights (``is_experts_weight``, adapted)."""
    fused: dict[tuple[str, str, tuple[int, ...]], int] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, AdaptedLinear)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 3 and not is_experts_weight(module, p):
                key = (re.sub(r"\.\d+\.", ".*.", f"{name}.{pname}"), type(module).__name__, tuple(p.shape))
                fused[key] = fused.get(key, 0) + 1
    if fused:
        what = ", ".join(f"{pattern} ({kind}, {'x'.join(map(str, shape))})" for (pattern, kind, shape) in fused)
        log.warning("all-linear: %d weights of 3 or more dims (%s) are not linear layers or fused experts and are "
                    "not adapted", sum(fused.values()), what)


def layer_counts(names) -> str:
    """``q_proj 2, k_proj 2, ...``: adapted layers per module type (the last part of the name),
    in module order."""
    return ", ".join(f"{kind} {n}" for kind, n in Counter(name.rsplit(".", 1)[-1] for name in names).items())


def log_rows(layer: AdaptedLinear, shards: int = 1) -> int:
    """Rows of a layer's edit log (U's out + V's in) one process holds with its rows split over
    ``shards`` processes (the most any of them holds)."""
    per_matrix = -(-layer.out_features // shards) + -(-layer.in_features // shards)
    return per_matrix * getattr(layer, "num_experts", 1)  # fused experts: one log per expert


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    """All adapted layers of a model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


class Method:
    """Base class of LoRA-family methods; subclasses override ``init_layer`` and the hooks.

    Args:
        config: the method's config dataclass.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    preserves_output_at_init: ClassVar[bool] = True
    """Whether the adapted model computes exactly the base model's function at init."""
    adapts_experts: ClassVar[bool] = False
    """Whether the method adapts fused MoE experts weights (``lrx.methods.experts``)."""

    def __init__(self, config: MethodConfig):
        self.config = config
        self.saved_modules: list[str] = []
        self.layers: dict[str, AdaptedLinear] = {}  # name -> adapted layer, in module order (wrap)
        self.shards: Shards = LocalShards()

    # ---- building -------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> list[str]:
        """Replace the target linears by adapted layers and freeze everything else; reads no
        weight (works on a model built on the meta device). The layers are then initialised by
        ``init_layer`` or loaded from an adapter.

        Returns:
            Qualified names of the adapted modules, in module order (``self.layers``).
        """
        cfg = self.config
        self.load_resources()
        self.layers = {}
        model.requires_grad_(False)
        for name, target in find_targets(model, cfg.target_modules):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if isinstance(target, nn.Parameter):
                self.layers[name] = self.make_experts_layer(name, owner, child, cfg.folds(target.dtype))
                continue
            layer = self.make_layer(name, target, cfg.folds(target.weight.dtype))
            setattr(owner, child, layer)
            self.layers[name] = layer
        self.saved_modules = self._resolve_modules_to_save(model)
        for _, p in self.trainable_parameters(model):
            p.requires_grad_(True)
        return list(self.layers)

    def load_resources(self) -> None:
        """Load what ``make_layer`` needs besides the model (EigenLoRAx: its basis); ``wrap``
        calls it, and so does the streaming export, which builds one layer at a time."""

    def make_layer(self, name: str, linear: nn.Linear, fold_edits: bool) -> AdaptedLinear:
        """The adapted layer that replaces ``linear`` (a subclass for other parametrisations)."""
        cfg = self.config
        return AdaptedLinear(linear, cfg.r, cfg.scale, cfg.dropout, fold_edits=fold_edits)

    def make_experts_layer(self, name: str, experts: nn.Module, param: str, fold_edits: bool) -> AdaptedExperts:
        """The adapted layer that takes the place of the fused experts weight ``experts.<param>``
        (``lrx.methods.experts``); refused for methods that do not adapt experts."""
        cfg = self.config
        if not self.adapts_experts:
            raise ConfigError(f"{self.name} does not adapt fused MoE experts ({name}) yet; use lora, pissa, srlora or eigenlorax, or "
                              "leave the experts out of method.target_modules (e.g. [q_proj, k_proj, v_proj, o_proj])")
        if cfg.dropout:
            raise ConfigError(f"{name}: fused experts take no adapter dropout (the adapter is added to the weight, "
                              "not applied to an input); set method.dropout=0 or leave the experts out")
        return adapt_experts(experts, param, lambda base: self.make_experts(name, base, fold_edits))

    def make_experts(self, name: str, base: ExpertWeights, fold_edits: bool) -> AdaptedExperts:
        """The adapted layer on the fused experts weight ``base`` (a subclass for other parametrisations)."""
        return AdaptedExperts(base, self.config.r, self.config.scale, fold_edits)

    def place_log(self, layer: AdaptedLinear, weights: WeightAccess) -> None:
        """Once a layer is initialised or restored, before it is sharded: where the backend will
        split every parameter by rows (``weights.shards_rows``, FSDP2), hold its edit log as
        frozen parameters of rank ``edit_rank_bound`` that are split with the base
        (``lrx.methods.editlog.RowLog``), so each process keeps its rows only. Methods that
        bound no rank (or keep no log) keep it whole. The host storage is chosen at ``attach``,
        once the compute dtype is known (``log_storage``)."""
        bound = self.edit_rank_bound()
        storage = log_storage(shards_rows=weights.shards_rows, bound=bound, logged=not layer.fold_edits, offloads=False)
        layer.place_log(storage, bound, world_size=weights.world_size)

    def init_layer(self, name: str, index: int, layer: AdaptedLinear, weights: WeightAccess) -> None:
        """Initialise one adapted layer's A, B (and edits). Default: LoRA (A random, B zero)."""
        for A in layer.lora_A if layer.lora_A.dim() == 3 else [layer.lora_A]:  # per expert: r x in
            nn.init.kaiming_uniform_(A, a=5**0.5)
        nn.init.zeros_(layer.lora_B)

    def _resolve_modules_to_save(self, model: nn.Module) -> list[str]:
        wanted = self.config.modules_to_save
        names = dict(model.named_modules())
        if wanted is None:
            return [n for n in TASK_HEADS if n in names]
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ConfigError(f"method.modules_to_save names {missing}, which this model does not have")
        return list(wanted)

    def trainable_parameters(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs the optimizer trains: adapter pairs and modules_to_save."""
        for name, layer in adapted_layers(model):
            for key, p in layer.adapter_params().items():
                yield f"{name}.{key}", p
        for mod_name in self.saved_modules:
            for pname, p in model.get_submodule(mod_name).named_parameters():
                yield f"{mod_name}.{pname}", p

    # ---- trainer hooks (defaults: nothing to do) --------------------------------------------

    def attach(self, model: nn.Module, shards: Shards, compute_dtype: torch.dtype | None = None) -> None:
        """Called once the model is placed or sharded, before training: how this rank reaches
        its pieces of the parameters. Edits of the base then touch only the local piece.

        ``compute_dtype`` is the dtype the forward's products run in (bf16 under autocast on a
        GPU); below fp32 the layers' edit logs move to host memory (``method.edit_log``)."""
        self.shards = shards
        offload = self.config.offloads_edit_log(compute_dtype)
        checks = isinstance(self.config, EditingConfig) and self.config.fuse == "auto"
        for name, layer in adapted_layers(model):
            stored = layer.base.weight.dtype  # as placed: an engine may have cast it
            if checks and layer.fold_edits and stored != torch.float32:
                # The fold was chosen for an fp32 weight, but the backend keeps this one in a lower
                # precision: an in-place add would lose most of every edit (bf16: 71 % of a
                # 1e-3-relative one), silently.
                raise ConfigError(
                    f"{name}: the backend stores this base weight in {str(stored).removeprefix('torch.')}, so edits "
                    "folded into it would be lossy; keep model.dtype and the engine's dtype the same, or set "
                    "method.fuse=log (edits applied exactly beside the adapter)")
            layer.shards = shards
            storage = log_storage(shards_rows=layer.edit_log.storage == "rows", bound=self.edit_rank_bound(),
                                  logged=not layer.fold_edits, offloads=offload)
            layer.place_log(storage, self.edit_rank_bound(), compute_dtype)

    def edit_rank_bound(self) -> int | None:
        """The largest edit-log rank a layer reaches in training, if the method knows it."""
        return None

    def check_schedule(self, total_steps: int) -> None:
        """Raise ConfigError if the method cannot run in ``total_steps`` optimizer steps; called
        before anything is written, once the run's length is known."""

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        """Called once before the first step (or after a resume), with the run's length."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Called when a step's gradients are complete (after the last micro-batch's backward),
        before clipping and the optimizer step. Must not synchronise with the host."""

    def after_optimizer_step(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int
    ) -> list[dict] | None:
        """Called after every optimizer step; ``step`` counts completed optimizer steps.

        Returns:
            Records to log (written to ``method_events.jsonl``), or None.
        """
        return None

    def on_train_end(self, model: nn.Module, run_dir: Path) -> None:
        """Called after the last step; a method may write reports (plots) into ``run_dir``."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Method state beyond adapter tensors (importance statistics, pointers ...)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"method {self.name} has no state, got keys {sorted(state)[:5]}")

    def state_bytes(self, layer: AdaptedLinear, world_size: int = 1, log_bytes: int = 4, log_shards: int = 1) -> int:
        """Bytes of method state one adapted layer holds at most during training, per process
        (for plans), with ``log_bytes`` per edit-log value on the device (2: offloaded, bf16)
        and the log's rows split over ``log_shards`` processes (a row-sharded log, ``place_log``).

        Default: its buffers (bases), plus an edit log of rank ``edit_rank_bound``; methods
        whose state grows otherwise override this.
        """
        log = {id(t) for t in layer.edit_log.held()}
        buffers = sum(b.numel() * b.element_size() for b in layer.buffers() if id(b) not in log)
        return buffers + log_bytes * (self.edit_rank_bound() or 0) * log_rows(layer, log_shards)

    # ---- export -----------------------------------------------------------------------------

    def delta_factors(self, layer: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors ``(B_eff, A_eff)`` of the layer's total change from W0, for export."""
        return layer.delta_factors()
