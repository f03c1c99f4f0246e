"""SRLoRA: Subspace Recomposition in LoRA (arXiv 2505.12433), as specified in DESIGN.md.

Per adapted matrix W0 (out x in), rank r, pool size r_target, swap size r' = gamma * r:

1. Pool: the top r_target singular triplets of W0, computed once (seeded, signs fixed).
2. Init (PiSSA): the first r triplets become the pairs; the base becomes ``W0 - s B A``.
3. Importance after every step's backward (AdaLoRA sensitivity, Zhang et al. 2023, eq. 8-10):
   ``I = |w * g|``, ``I_bar = b1 I_bar + (1 - b1) I``, ``U_bar = b2 U_bar + (1 - b2) |I - I_bar|``;
   pair score ``S_k = mean_i I_bar U_bar (B[i, k]) + mean_j I_bar U_bar (A[k, j])``.
4. Schedule: N = (r_target - r) / r' events at steps interval, 2 interval, ..., N interval.
5. Event: the r' lowest-scoring pairs are fused into the base (an edit), the next r' pool
   triplets are loaded into the freed slots PiSSA-style and subtracted from the base (the
   same edit), so the model's output is unchanged. Importance statistics of the new slots
   restart from zero; their optimizer moments follow ``optimizer_state``.

Edits go through ``AdaptedLinear.add_edit``: folded into an fp32 base in place, or kept as an
exact fp32 low-rank log beside the adapter for bf16/quantized bases (``method.fuse``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.methods import register_method
from lrx.methods.base import Method, MethodConfig, WeightAccess, adapted_layers
from lrx.methods.layer import AdaptedLinear
from lrx.methods.pissa import principal_init
from lrx.spectral import top_singular

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SRLoRAConfig(MethodConfig):
    r_target: int | None = None
    """Pool size: principal directions of W0 that enter training over the run; None = 3 * r."""
    gamma: float = 0.5
    """Share of the r pairs replaced at each event; gamma * r must be a whole number."""
    beta1: float = 0.85
    """EMA factor of the importance I_bar (AdaLoRA's beta1)."""
    beta2: float = 0.85
    """EMA factor of the importance uncertainty U_bar (AdaLoRA's beta2)."""
    interval: int = 0
    """Optimizer steps between events; 0 = spread the events evenly over the first end_fraction of training."""
    end_fraction: float = 0.8
    """With a derived interval, the last event comes by this share of the training steps."""
    optimizer_state: Literal["keep", "reset_m", "reset"] = "reset_m"
    """Adam moments of replaced slots: keep both, zero the first moment (reset_m), or zero both (reset)."""
    svd: Literal["exact", "randomized"] = "randomized"
    """Pool SVD: exact, or randomized (seeded subspace iteration; fast on large matrices)."""
    svd_niter: int = 4
    """Power iterations of the randomized SVD."""
    svd_oversample: int = 16
    """Extra sketch columns of the randomized SVD."""
    svd_seed: int = 0
    """Seed of the randomized SVD sketch (layer i uses svd_seed + i)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r_target is None:
            self.r_target = 3 * self.r
        if self.r_target < self.r:
            raise ValueError(f"r_target ({self.r_target}) must be >= r ({self.r})")
        swap = self.gamma * self.r
        if not 0 < self.gamma <= 1 or abs(swap - round(swap)) > 1e-9:
            raise ValueError(
                f"gamma * r = {self.gamma} * {self.r} = {swap:g} is not a whole number of pairs in [1, r]; "
                f"choose gamma as a multiple of 1/{self.r}"
            )
        if (self.r_target - self.r) % self.swap:
            raise ValueError(
                f"r_target - r = {self.r_target - self.r} is not a multiple of the swap size gamma * r = {self.swap}; "
                f"use e.g. r_target = {self.r + self.swap * max(1, (self.r_target - self.r) // self.swap)}"
            )
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.interval < 0 or not 0 < self.end_fraction <= 1:
            raise ValueError("interval must be >= 0 and end_fraction in (0, 1]")

    @property
    def swap(self) -> int:
        """r': pairs replaced per event."""
        return round(self.gamma * self.r)

    @property
    def n_events(self) -> int:
        return (self.r_target - self.r) // self.swap


STAT_KEYS = ("A_ibar", "A_ubar", "B_ibar", "B_ubar")


@register_method("srlora")
class SRLoRA(Method):
    config_cls = SRLoRAConfig
    # Importance and events read full A/B rows; the shard-local versions are issue 5's work.
    supports_sharding = False

    def __init__(self, config: SRLoRAConfig):
        super().__init__(config)
        self.layers: dict[str, AdaptedLinear] = {}
        self.slot_pool: dict[str, torch.Tensor] = {}  # pool index held by each slot
        self.slot_start: dict[str, torch.Tensor] = {}  # step at which it was loaded
        self.lifetimes: list[tuple[int, int, int, int]] = []  # (layer, pool index, start, end)
        self.pointer = config.r
        self.events_done = 0
        self.interval = 0
        self.total_steps = 0

    # ---- building ------------------------------------------------------------------------

    def apply(self, model: nn.Module, weights: WeightAccess | None = None, init: bool = True) -> list[str]:
        names = super().apply(model, weights, init)
        r = self.config.r
        for name, layer in adapted_layers(model):
            self.layers[name] = layer
            # Method state lives in (non-persistent) buffers of the layer, so it follows the
            # layer through .to(device) and sharding; lrx's adapter files store it explicitly.
            for key in STAT_KEYS:
                like = layer.lora_A if key[0] == "A" else layer.lora_B
                layer.register_buffer(f"srlora_{key}", torch.zeros_like(like, requires_grad=False), persistent=False)
            self.slot_pool[name] = torch.arange(r)
            self.slot_start[name] = torch.zeros(r, dtype=torch.long)
        return names

    def init_layer(self, name: str, index: int, layer: AdaptedLinear, weights: WeightAccess) -> None:
        cfg = self.config
        U, S, V = top_singular(
            weights.full_weight(layer), cfg.r_target, method=cfg.svd, niter=cfg.svd_niter,
            oversample=cfg.svd_oversample, seed=cfg.svd_seed + index,
        )
        principal_init(layer, U[:, : cfg.r], S[: cfg.r], V[:, : cfg.r])
        # Keep only what later events need: the directions not loaded yet.
        self._set_pool(layer, {"U": U[:, cfg.r :], "S": S[cfg.r :], "V": V[:, cfg.r :]})

    @staticmethod
    def _set_pool(layer: AdaptedLinear, pool: dict[str, torch.Tensor]) -> None:
        for key, value in pool.items():
            layer.register_buffer(f"srlora_pool_{key}", value.to(layer.lora_A.device).contiguous(), persistent=False)

    @property
    def pool(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, the pool directions not loaded yet (U, S, V): indices pointer..r_target-1."""
        return {n: {k: getattr(layer, f"srlora_pool_{k}") for k in ("U", "S", "V")} for n, layer in self.layers.items()}

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, the importance statistics I_bar and U_bar of A and B."""
        return {n: {k: getattr(layer, f"srlora_{k}") for k in STAT_KEYS} for n, layer in self.layers.items()}

    def state_bytes(self, layer: AdaptedLinear) -> int:
        cfg = self.config
        io = layer.in_features + layer.out_features
        pool = (io + 1) * (cfg.r_target - cfg.r)
        stats = 2 * cfg.r * io  # I_bar and U_bar of A and B
        edit_log = (2 * cfg.r_target - cfg.r) * io  # PiSSA init + 2 r' per event, at the end
        return 4 * (pool + stats + edit_log)

    # ---- importance ----------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.events_done >= self.config.n_events:
            return  # the pool is exhausted: scores are never used again
        params, grads, ibars, ubars = [], [], [], []
        for layer in self.layers.values():
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B)):
                if p.grad is not None:
                    params.append(p.detach())
                    grads.append(p.grad)
                    ibars.append(getattr(layer, f"srlora_{key}_ibar"))
                    ubars.append(getattr(layer, f"srlora_{key}_ubar"))
        if not params:
            return
        b1, b2 = self.config.beta1, self.config.beta2
        # Fused multi-tensor ops: a handful of kernels for all layers, no host synchronisation.
        imp = torch._foreach_mul(params, grads)
        torch._foreach_abs_(imp)
        torch._foreach_mul_(ibars, b1)
        torch._foreach_add_(ibars, imp, alpha=1 - b1)
        torch._foreach_sub_(imp, ibars)
        torch._foreach_abs_(imp)
        torch._foreach_mul_(ubars, b2)
        torch._foreach_add_(ubars, imp, alpha=1 - b2)

    def pair_scores(self, name: str) -> torch.Tensor:
        """Score of every pair of a layer: mean sensitivity over B's column plus A's row."""
        layer = self.layers[name]
        st = {k: getattr(layer, f"srlora_{k}") for k in STAT_KEYS}
        return (st["B_ibar"] * st["B_ubar"]).mean(dim=0) + (st["A_ibar"] * st["A_ubar"]).mean(dim=1)

    # ---- schedule ------------------------------------------------------------------------

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        cfg = self.config
        if self.interval and self.total_steps == total_steps:
            return  # resumed: keep the schedule the run started with
        self.total_steps = total_steps
        n = cfg.n_events
        if n == 0:
            return
        if cfg.interval:
            self.interval = cfg.interval
            if n * cfg.interval > total_steps:
                log.warning(
                    "srlora: %d of %d recomposition events fit in %d steps with interval %d; the pool "
                    "will not be exhausted (lower method.interval or raise train.max_steps)",
                    total_steps // cfg.interval, n, total_steps, cfg.interval,
                )
        else:
            self.interval = int(cfg.end_fraction * total_steps) // n
            if self.interval < 1:
                raise ConfigError(
                    f"srlora needs at least {-(-n // cfg.end_fraction):.0f} training steps for its {n} "
                    f"recomposition events, the run has {total_steps}; raise train.max_steps/epochs or "
                    "lower method.r_target"
                )
        log.info("srlora: %d events, every %d steps from step %d", n, self.interval, self.interval)

    def event_steps(self) -> list[int]:
        return [k * self.interval for k in range(1, self.config.n_events + 1)] if self.interval else []

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int):
        if not self.interval or self.events_done >= self.config.n_events:
            return None
        if step < (self.events_done + 1) * self.interval:
            return None
        return self.recompose(optimizer, step)

    # ---- recomposition -------------------------------------------------------------------

    @torch.no_grad()
    def recompose(self, optimizer: torch.optim.Optimizer | None, step: int) -> list[dict]:
        """One event on every layer: fuse the lowest-scoring pairs, load the next pool directions.

        Returns:
            One record per layer: fused pair ids and scores, new pointer, fusion error.
        """
        cfg = self.config
        swap = cfg.swap
        records = []
        for index, (name, layer) in enumerate(self.layers.items()):
            scores = self.pair_scores(name)
            idx = torch.sort(scores, stable=True).indices[:swap]
            s = layer.scale
            pool = {k: getattr(layer, f"srlora_pool_{k}") for k in ("U", "S", "V")}
            root = torch.sqrt(pool["S"][:swap] / s)
            B_new = pool["U"][:, :swap] * root
            A_new = (pool["V"][:, :swap] * root).t()
            # One edit: + s B_k A_k of the fused pairs, - s B_new A_new of the loaded ones.
            edit_U = torch.cat([layer.lora_B[:, idx] * s, -s * B_new], dim=1)
            edit_V = torch.cat([layer.lora_A[idx], A_new], dim=0)
            before = layer.base.weight.double() if layer.fold_edits else None
            layer.add_edit(edit_U, edit_V)
            error = 0.0  # the log holds the intended factors exactly
            if before is not None:
                intended = edit_U.double() @ edit_V.double()
                error = ((layer.base.weight.double() - before - intended).norm() / intended.norm()).item()
            layer.lora_B[:, idx] = B_new
            layer.lora_A[idx] = A_new
            # Loaded directions leave the pool: it only ever holds what later events need.
            self._set_pool(layer, {"U": pool["U"][:, swap:], "S": pool["S"][swap:], "V": pool["V"][:, swap:]})
            self._reset_slots(name, layer, idx, optimizer)
            ids = idx.tolist()
            for slot in ids:
                self.lifetimes.append((index, int(self.slot_pool[name][slot]), int(self.slot_start[name][slot]), step))
            self.slot_pool[name][ids] = torch.arange(self.pointer, self.pointer + swap)
            self.slot_start[name][ids] = step
            records.append({"event": self.events_done + 1, "layer": name, "fused_pairs": ids,
                            "scores": scores[idx].tolist(), "pointer": self.pointer + swap, "fusion_error": error})
        self.pointer += swap
        self.events_done += 1
        errors = [r["fusion_error"] for r in records]
        log.info("srlora event %d/%d at step %d: pointer %d, fusion error max %.2e",
                 self.events_done, cfg.n_events, step, self.pointer, max(errors))
        return records

    def _reset_slots(self, name: str, layer: AdaptedLinear, idx: torch.Tensor, optimizer) -> None:
        for key in STAT_KEYS:
            t = getattr(layer, f"srlora_{key}")
            if key[0] == "A":
                t[idx] = 0
            else:
                t[:, idx] = 0
        if optimizer is None or self.config.optimizer_state == "keep":
            return
        # Zeroing only the first moment keeps Adam's per-element scale estimate, so the first
        # updates of a new slot are smaller than usual (a built-in warm-up); zeroing the second
        # moment too, under Adam's global step count, makes them ~1/sqrt(1 - beta2) too large.
        names = ("exp_avg",) if self.config.optimizer_state == "reset_m" else ("exp_avg", "exp_avg_sq")
        for p, sl in ((layer.lora_A, (idx,)), (layer.lora_B, (slice(None), idx))):
            state = optimizer.state.get(p, {})
            for key in names:
                if key in state:
                    state[key][sl] = 0

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {
            "pointer": torch.tensor(self.pointer), "events_done": torch.tensor(self.events_done),
            "interval": torch.tensor(self.interval), "total_steps": torch.tensor(self.total_steps),
            "lifetimes": torch.tensor(self.lifetimes, dtype=torch.long).reshape(-1, 4),
        }
        pool, stats = self.pool, self.stats
        for name in self.layers:
            for key, value in pool[name].items():
                out[f"pool.{name}.{key}"] = value
            for key, value in stats[name].items():
                out[f"stats.{name}.{key}"] = value
            out[f"slots.{name}.pool_index"] = self.slot_pool[name]
            out[f"slots.{name}.start"] = self.slot_start[name]
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        try:
            self.pointer = int(state.pop("pointer"))
            self.events_done = int(state.pop("events_done"))
            self.interval = int(state.pop("interval"))
            self.total_steps = int(state.pop("total_steps"))
            self.lifetimes = [tuple(row) for row in state.pop("lifetimes").tolist()]
            for name, layer in self.layers.items():
                self._set_pool(layer, {k: state.pop(f"pool.{name}.{k}") for k in ("U", "S", "V")})
                for key in STAT_KEYS:
                    getattr(layer, f"srlora_{key}").copy_(state.pop(f"stats.{name}.{key}"))
                self.slot_pool[name] = state.pop(f"slots.{name}.pool_index")
                self.slot_start[name] = state.pop(f"slots.{name}.start")
        except KeyError as e:
            raise ValueError(f"srlora state is missing {e}; the adapter file is incomplete") from None
        if state:
            raise ValueError(f"unexpected srlora state keys {sorted(state)[:5]}")

    # ---- reports ---------------------------------------------------------------------------

    def direction_lifetimes(self) -> dict[str, list[float]]:
        """Mean number of steps each pool direction stayed trainable, per layer type."""
        rows = list(self.lifetimes)
        names = list(self.layers)
        for index, name in enumerate(names):
            for slot in range(self.config.r):
                rows.append((index, int(self.slot_pool[name][slot]), int(self.slot_start[name][slot]), self.total_steps))
        per_type: dict[str, list[list[int]]] = {}
        for index, pool_index, start, end in rows:
            kind = names[index].rsplit(".", 1)[-1]
            per_type.setdefault(kind, [[] for _ in range(self.config.r_target)])[pool_index].append(end - start)
        return {k: [sum(v) / len(v) if v else 0.0 for v in lists] for k, lists in per_type.items()}

    def on_train_end(self, model: nn.Module, run_dir: Path) -> None:
        lifetimes = self.direction_lifetimes()
        (run_dir / "srlora_lifetimes.json").write_text(json.dumps(
            {"total_steps": self.total_steps, "event_steps": self.event_steps(), "mean_steps_trainable": lifetimes}))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, values in sorted(lifetimes.items()):
            ax.plot(range(len(values)), values, marker=".", label=kind)
        ax.axvline(self.config.r - 0.5, color="grey", linestyle=":", label="initial pairs | pool")
        ax.set_xlabel("pool direction (singular value rank)")
        ax.set_ylabel("steps trainable (mean over layers)")
        ax.set_title(f"SRLoRA direction lifetimes ({self.events_done} events, {self.total_steps} steps)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "srlora_lifetimes.png", dpi=100)
        plt.close(fig)
