"""EigenLoRAx (arXiv 2502.04700): train only loadings on a principal basis of existing adapters.

Per adapted matrix: ``A = (C_A alpha_A)^T``, ``B = C_B alpha_B`` with frozen bases ``C_A``
(in x K), ``C_B`` (out x K) built by ``tools/build_eigenbasis.py`` and held as buffers (so
FSDP2/ZeRO-3 never shard them: every rank holds the whole, small basis), and trainable
loadings ``alpha_A``, ``alpha_B`` (K x r): ``2 K r`` parameters per matrix.

Initialisation (``method.init``): ``uniform`` U(-init_range, init_range) for both loadings,
as the official code does (the output moves at step 0); ``zero_b`` (alpha_B = 0, output
unchanged at init); ``project`` (warm start from a peft LoRA: ``alpha_A = C_A^T A^T``,
``alpha_B = C_B^T B``). The official code applies no alpha / r scaling; ``use_scaling``
turns it on. The lrx adapter of an EigenLoRAx run holds only the loadings and names the
basis by path and sha256: the compact per-task artifact for serving many tasks on one base.

Fused MoE experts weights (``lrx.methods.experts``) take a basis per expert (``C_A`` experts
x in x K, ``C_B`` experts x out x K: ``lrx.eigenbasis`` says why per expert) and train loadings
per expert (experts x K x r each): ``EigenExperts``, the stacked A and B computed by one batched
matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from lrx.eigenbasis import SourceAdapter, load_basis
from lrx.errors import ConfigError
from lrx.methods import register_method
from lrx.methods.base import Method, MethodConfig, WeightAccess
from lrx.methods.experts import AdaptedExperts, ExpertWeights
from lrx.methods.layer import AdaptedLinear


@dataclass(kw_only=True)
class EigenLoRAxConfig(MethodConfig):
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("basis", "project_from")
    FILLED_WHEN_BUILT: ClassVar[tuple[str, ...]] = ("basis_sha256", "target_modules")

    target_modules: list[str] = field(default_factory=lambda: ["basis"])
    """Linear layers to adapt; the default [basis] takes every module the basis covers."""
    basis: str = ""
    """Basis folder written by tools/build_eigenbasis.py (required)."""
    basis_sha256: str | None = None
    """sha256 of the basis weights; filled in at training time and checked when the adapter is loaded."""
    init: Literal["uniform", "zero_b", "project"] = "uniform"
    """Loadings init: uniform (official), zero_b (output unchanged at init) or project (from project_from)."""
    init_range: float = 0.5
    """Half-width of the uniform init of the loadings."""
    project_from: str | None = None
    """init=project: a peft LoRA adapter folder to project onto the basis."""
    use_scaling: bool = False
    """Multiply the adapter by alpha / r (the official code does not)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.basis:
            raise ValueError("eigenlorax needs method.basis=FOLDER (build one with tools/build_eigenbasis.py)")
        if self.init == "project" and not self.project_from:
            raise ValueError("init=project needs method.project_from=ADAPTER_FOLDER")

    @property
    def scale(self) -> float:
        return self.alpha / self.r if self.use_scaling else 1.0


class EigenLinear(AdaptedLinear):
    """``AdaptedLinear`` whose A and B are loadings on frozen bases (buffers); bases and
    loadings may carry leading dims (fused experts: one basis and loadings per expert)."""

    def __init__(self, base: nn.Linear, r: int, scale: float, dropout: float, fold_edits: bool,
                 C_A: torch.Tensor, C_B: torch.Tensor):
        object.__setattr__(self, "_pending_bases", (C_A, C_B))
        super().__init__(base, r, scale, dropout, fold_edits)

    def _init_adapter(self, r: int, in_features: int, out_features: int, device: torch.device) -> None:
        C_A, C_B = self._pending_bases
        object.__delattr__(self, "_pending_bases")
        lead = self._shape()[:-2]  # (experts,) for fused experts
        if tuple(C_A.shape[:-1]) != (*lead, in_features) or tuple(C_B.shape[:-1]) != (*lead, out_features):
            what = f"{lead[0]} experts of " if lead else ""
            raise ConfigError(f"basis shapes {tuple(C_A.shape)}, {tuple(C_B.shape)} do not fit {what}a linear layer "
                              f"with in={in_features}, out={out_features}; the basis is for another model")
        self.register_buffer("C_A", C_A.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("C_B", C_B.to(device=device, dtype=torch.float32), persistent=False)
        object.__setattr__(self, "_bases", (C_A, C_B))  # the source, for restore_buffers
        self.alpha_A = nn.Parameter(torch.zeros(*lead, C_A.shape[-1], r, device=device))
        self.alpha_B = nn.Parameter(torch.zeros(*lead, C_B.shape[-1], r, device=device))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"alpha_A": self.alpha_A, "alpha_B": self.alpha_B}

    @torch.no_grad()
    def restore_buffers(self) -> None:
        self.C_A.copy_(self._bases[0])
        self.C_B.copy_(self._bases[1])

    @property
    def lora_A(self) -> torch.Tensor:  # r x in (experts x r x in)
        return (self.C_A @ self.alpha_A).transpose(-1, -2)

    @property
    def lora_B(self) -> torch.Tensor:  # out x r (experts x out x r)
        return self.C_B @ self.alpha_B


class EigenExperts(EigenLinear, AdaptedExperts):
    """A fused experts weight (``AdaptedExperts``) whose stacked A and B are per-expert loadings
    on per-expert frozen bases (``EigenLinear``'s parametrisation with a leading experts dim)."""

    def __init__(self, base: ExpertWeights, r: int, scale: float, fold_edits: bool, C_A: torch.Tensor,
                 C_B: torch.Tensor):
        object.__setattr__(self, "_pending_bases", (C_A, C_B))
        AdaptedExperts.__init__(self, base, r, scale, fold_edits)


@register_method("eigenlorax")
class EigenLoRAx(Method):
    config_cls = EigenLoRAxConfig
    adapts_experts = True  # a basis and loadings per expert (``EigenExperts``)

    def __init__(self, config: EigenLoRAxConfig):
        super().__init__(config)
        self.preserves_output_at_init = config.init != "uniform"
        self.meta: dict = {}
        self.bases: dict[str, torch.Tensor] = {}
        self.source: SourceAdapter | None = None

    def load_resources(self) -> None:
        cfg = self.config
        if self.bases:
            return
        self.meta, self.bases = load_basis(cfg.basis, expected_sha256=cfg.basis_sha256)
        cfg.basis_sha256 = self.meta["sha256"]
        if cfg.target_modules == ["basis"]:
            cfg.target_modules = list(self.meta["target_modules"])  # full module names match exactly

    def make_layer(self, name: str, linear: nn.Linear, fold_edits: bool) -> AdaptedLinear:
        cfg = self.config
        return EigenLinear(linear, cfg.r, cfg.scale, cfg.dropout, fold_edits, *self._bases_of(name))

    def make_experts(self, name: str, base: ExpertWeights, fold_edits: bool) -> AdaptedExperts:
        return EigenExperts(base, self.config.r, self.config.scale, fold_edits, *self._bases_of(name))

    def _bases_of(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if f"{name}.C_A" not in self.bases:
            raise ConfigError(f"module {name} is not in the basis {self.config.basis} (it covers "
                              f"{self.meta['target_modules'][:3]}...); narrow method.target_modules")
        return self.bases[f"{name}.C_A"], self.bases[f"{name}.C_B"]

    def init_layer(self, name: str, index: int, layer: AdaptedLinear, weights: WeightAccess) -> None:
        cfg = self.config
        with torch.no_grad():
            if cfg.init == "project":
                if self.source is None:
                    self.source = SourceAdapter.open(cfg.project_from)
                if name not in self.source.modules:
                    raise ConfigError(f"{self.source.weights} has no adapter for {name}")
                At, B = self.source.read(name)
                if At.shape[-1] != cfg.r:
                    raise ConfigError(f"{self.source.weights}: rank {At.shape[-1]} != method.r={cfg.r}; set method.r={At.shape[-1]}")
                src = self.source.config
                src_scale = src.get("lora_alpha", src.get("r", 1)) / src.get("r", 1)
                src_rank = src.get("rank_pattern", {}).get(name)
                if src_rank:
                    src_scale = src.get("alpha_pattern", {}).get(name, src_rank) / src_rank
                layer.alpha_A.copy_(layer.C_A.double().transpose(-1, -2) @ At)
                layer.alpha_B.copy_(layer.C_B.double().transpose(-1, -2) @ B * (src_scale / layer.scale))
                return
            nn.init.uniform_(layer.alpha_A, -cfg.init_range, cfg.init_range)
            if cfg.init == "uniform":
                nn.init.uniform_(layer.alpha_B, -cfg.init_range, cfg.init_range)
            else:
                nn.init.zeros_(layer.alpha_B)
