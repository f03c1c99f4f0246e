"""SRLoRA: Subspace Recomposition in LoRA (arXiv 2505.12433).

Per adapted matrix W0 (out x in), rank r, pool size r_target, swap size r' = gamma * r:

1. Pool (``pool.py``): the top r_target singular triplets of W0, computed once (seeded, signs
   fixed; per block of rows when sharded).
2. Init (PiSSA): the first r triplets become the pairs; the base becomes ``W0 - s B A``.
3. Importance (``importance.py``) after every step's backward: AdaLoRA's sensitivity EMAs.
4. Schedule (``schedule.py``): N = (r_target - r) / r' events at interval, 2 interval, ...
5. Event (``event.py``): the r' lowest-scoring pairs are fused into the base, the next r'
   pool directions are loaded into the freed slots and subtracted from the base, so the
   output is unchanged; the new slots' statistics restart, their Adam moments follow
   ``optimizer_state``. ``report.py`` tracks how long each direction stayed trainable.

Fused MoE experts (``experts.py``): the same per expert, as stacked tensors (a pool from an SVD
per expert, scores E x r, each expert's own pairs fused and replaced); over several processes
each keeps the pool of its block of experts and edits its piece of the base.

Life cycle: ``wrap`` / ``init_layer`` (pool and initial pairs, before sharding), then
``attach`` (explicit: the statistics are created on this process's pieces), then the trainer
hooks; ``state_dict`` / ``load_state_dict`` need an attached method. Edits go through
``AdaptedLinear.add_edit``: folded into an fp32 base in place, or kept as an exact fp32
low-rank log beside the adapter (``method.fuse``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lrx.methods import register_method
from lrx.methods.base import EditingConfig, Method, Shards, WeightAccess, log_rows
from lrx.methods.experts import AdaptedExperts
from lrx.methods.layer import AdaptedLinear
from lrx.methods.pissa import principal_init
from lrx.methods.srlora.event import fuse_and_load, gather_factors, swap_slots
from lrx.methods.srlora.experts import expert_errors, expert_event, expert_factors, expert_scores, init_experts, write_expert_slots
from lrx.methods.srlora.importance import STAT_KEYS, Importance, pair_shape
from lrx.methods.srlora.pool import Pool
from lrx.methods.srlora.report import Lifetimes
from lrx.methods.srlora.schedule import Schedule
from lrx.spectral import randomized_svd_rows, top_singular

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SRLoRAConfig(EditingConfig):
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
    fusion_check: bool = True
    """Measure every event's fusion error into a folded base in float64 (an extra pass over the
    base piece; the log path is exact and needs none)."""

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


@register_method("srlora")
class SRLoRA(Method):
    config_cls = SRLoRAConfig
    adapts_experts = True  # ``srlora/experts.py``

    def __init__(self, config: SRLoRAConfig):
        super().__init__(config)
        self.pool = Pool()
        self.importance = Importance(config.r, config.beta1, config.beta2)
        self.schedule = Schedule(config.n_events, config.interval, config.end_fraction)
        self.lifetimes = Lifetimes(config.r, config.r_target)
        self.pointer = config.r
        self.events_done = 0
        self.attached = False
        self._saved_stats: dict[str, torch.Tensor] | None = None  # whole statistics loaded before attach

    # ---- building ------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> list[str]:
        names = super().wrap(model)
        for name, layer in self.layers.items():
            self.lifetimes.add_layer(name, layer.num_experts if isinstance(layer, AdaptedExperts) else 0)
        return names

    def init_layer(self, name: str, index: int, layer: AdaptedLinear, weights: WeightAccess) -> None:
        cfg = self.config
        if isinstance(layer, AdaptedExperts):  # a pool per expert, of this process's experts
            self.pool.keep(name, *init_experts(layer, weights, cfg, cfg.svd_seed + index), whole=weights.world_size == 1)
            return
        rows, first = weights.row_block(layer)
        if cfg.svd == "exact":
            U, S, V = top_singular(weights.full_weight(layer), cfg.r_target, method="exact")
            U = U[first : first + rows.shape[0]]
        else:  # per row block: only in x q matrices cross processes
            U, S, V = randomized_svd_rows(
                rows, cfg.r_target, all_reduce=weights.all_reduce, niter=cfg.svd_niter,
                oversample=cfg.svd_oversample, seed=cfg.svd_seed + index, n_rows=layer.out_features,
            )
        # The r initial pairs need all rows of U: assemble them (adapter-sized).
        U_r = U.new_zeros(layer.out_features, cfg.r)
        U_r[first : first + U.shape[0]] = U[:, : cfg.r]
        principal_init(layer, weights.all_reduce(U_r), S[: cfg.r], V[:, : cfg.r])
        # Keep only what later events need: the directions not loaded yet, U on own rows.
        self.pool.keep(name, U[:, cfg.r :], S[cfg.r :], V[:, cfg.r :], first, whole=weights.world_size == 1)

    def attach(self, model: nn.Module, shards: Shards, compute_dtype: torch.dtype | None = None) -> None:
        """Create the importance statistics on this process's pieces of A and B, keep only this
        process's rows of the pool, next to the adapter."""
        if self.attached and self._saved_stats is None and self.shards.world_size == 1:
            # Attached again (one process: the pieces are whole): keep the statistics so far.
            self._saved_stats = {f"{name}.{key}": t for name, layer in self.layers.items()
                                 for key, t in self.importance.whole(name, layer, self.shards)}
        super().attach(model, shards, compute_dtype)
        self.attached = True
        self.attach_state()

    def _require_attached(self) -> None:
        if not self.attached:
            raise RuntimeError("srlora: call method.attach(model, shards) once the model is placed, before "
                               "training hooks or state")

    @property
    def exhausted(self) -> bool:
        """Every event has run: the pool is empty and pair scores are never needed again."""
        return self.events_done >= self.config.n_events

    @property
    def interval(self) -> int:
        return self.schedule.interval

    def edit_rank_bound(self) -> int:
        cfg = self.config
        return 2 * cfg.r_target - cfg.r  # PiSSA init + 2 r' per event

    def state_bytes(self, layer: AdaptedLinear, world_size: int = 1, log_bytes: int = 4, log_shards: int = 1) -> int:
        """The most SRLoRA holds for one layer between events, per process: the pool (U on own
        rows; S, V whole), the statistics (sharded; freed after the last event) and the edit
        log (``log_bytes`` per value: replicated and growing by 2 r' per event, or with its rows
        split over ``log_shards`` > 1 processes at its full rank from the start, ``place_log``),
        after event k = 0 .. N. An estimate: the copies an event makes while it runs are not
        counted."""
        cfg = self.config
        out_f, in_f = layer.out_features, layer.in_features
        most, experts = 0, getattr(layer, "num_experts", 1)
        for k in range(cfg.n_events + 1):
            if isinstance(layer, AdaptedExperts):  # the pool of this process's experts (U, S, V whole per expert)
                pool = Pool.bytes_after(cfg.r_target - cfg.r - k * cfg.swap, out_f, in_f, 1) * -(-experts // world_size)
            else:
                pool = Pool.bytes_after(cfg.r_target - cfg.r - k * cfg.swap, out_f, in_f, world_size)
            stats = self.importance.bytes(out_f, in_f, world_size) * experts if k < cfg.n_events else 0
            rank = self.edit_rank_bound() if log_shards > 1 else cfg.r + 2 * k * cfg.swap
            edit_log = log_bytes * rank * log_rows(layer, log_shards)
            most = max(most, pool + stats + edit_log)
        return most

    # ---- training hooks ------------------------------------------------------------------

    def check_schedule(self, total_steps: int) -> None:
        self.schedule.check(total_steps)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        self.schedule.start(total_steps)

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.exhausted:
            return  # scores are never used again
        self._require_attached()
        self.importance.update(self.layers, self.shards)

    def after_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int):
        if not self.schedule.due(step, self.events_done):
            return None
        return self.recompose(optimizer, step)

    def event_steps(self) -> list[int]:
        return self.schedule.steps()

    # ---- recomposition -------------------------------------------------------------------

    def _groups(self) -> list[list[str]]:
        """Layers whose pieces have the same shapes: events and scores work on each group as
        stacked tensors, a few kernels per group instead of per layer."""
        groups: dict[tuple, list[str]] = {}
        for name, layer in self.layers.items():
            if isinstance(layer, AdaptedExperts):  # per expert, one layer at a time (``_expert_events``)
                continue
            key = (layer.out_features, layer.in_features, self.shards.span(layer.lora_A),
                   self.shards.span(layer.lora_B), self.pool.first[name], self.pool[name]["U"].shape[0])
            groups.setdefault(key, []).append(name)
        return list(groups.values())

    def all_pair_scores(self) -> dict[str, torch.Tensor]:
        """Score of every pair of every layer, identical on every process: local sums, then one
        small all-reduce for all layers."""
        if self.exhausted:
            raise RuntimeError("srlora: the pool is exhausted; pair scores are not kept after the last event")
        self._require_attached()
        local = {}
        for names in self._groups():
            local.update(zip(names, self.importance.local_scores(names, self.layers[names[0]], self.shards)))
        for name, layer in self.layers.items():
            if isinstance(layer, AdaptedExperts):  # E x r
                local[name] = expert_scores(self.importance.pieces[name], layer, self.shards)
        flat = self.shards.all_reduce(torch.cat([local[n].reshape(-1) for n in self.layers]))
        return {n: t.view(local[n].shape) for n, t in zip(self.layers, flat.split([local[n].numel() for n in self.layers]))}

    @torch.no_grad()
    def recompose(self, optimizer: torch.optim.Optimizer | None, step: int) -> list[dict]:
        """One event on every layer (collective when sharded: every process calls it at the same
        step): fuse the lowest-scoring pairs, load the next pool directions.

        Returns:
            One record per layer: fused pair ids and scores, new pointer, fusion error.
        """
        cfg, swap = self.config, self.config.swap
        scores = self.all_pair_scores()
        names = list(self.layers)
        chosen, ids_all, scores_all = _choose(scores, swap)
        moments = ()
        if optimizer is not None and cfg.optimizer_state != "keep":
            # Zeroing only the first moment keeps Adam's per-element scale estimate, so the first
            # updates of a new slot are smaller than usual (a built-in warm-up); zeroing the second
            # moment too, under Adam's global step count, makes them ~1/sqrt(1 - beta2) too large.
            moments = ("exp_avg",) if cfg.optimizer_state == "reset_m" else ("exp_avg", "exp_avg_sq")
        errors = {}
        for group in gather_factors(self._groups(), self.layers, chosen, self.pool, self.shards, cfg.r, swap):
            B_new, A_new, err = fuse_and_load(group, self.layers, self.shards, cfg.fusion_check)
            errors.update(err)
            swap_slots(group["names"], self.layers, group["idx"], B_new, A_new, self.shards, self.importance,
                       optimizer, moments, cfg.r)
        expert_errors = self._expert_events(chosen, optimizer, moments)
        records = {}
        for index, name in enumerate(names):
            self.pool.drop(name, swap)
            self.lifetimes.replace(index, name, ids_all[name], self.pointer, step)
            records[name] = {"event": self.events_done + 1, "layer": name, "fused_pairs": ids_all[name],
                             "scores": scores_all[name], "pointer": self.pointer + swap,
                             "fusion_error": 0.0}  # the log holds the intended factors exactly
            if name in expert_errors:  # fused experts: each expert's, and the worst as the layer's
                records[name].update(fusion_error=max(expert_errors[name]), expert_fusion_errors=expert_errors[name])
        if errors:
            err = self.shards.all_reduce(torch.stack(list(errors.values())))
            for name, (num, den) in zip(errors, err.tolist()):
                records[name]["fusion_error"] = (num / den) ** 0.5 if den > 0 else 0.0
        self.pointer += swap
        self.events_done += 1
        if self.exhausted:
            self.importance.release()
        log.info("srlora event %d/%d at step %d: pointer %d, fusion error max %.2e", self.events_done,
                 cfg.n_events, step, self.pointer, max(r["fusion_error"] for r in records.values()))
        return list(records.values())

    def _expert_events(self, chosen: dict[str, torch.Tensor], optimizer, moments: tuple[str, ...]) -> dict:
        """The event of every fused experts layer (``srlora/experts.py``): each expert's pairs
        ``chosen[name]`` (E x r') are fused and replaced (collective when sharded: two small
        all-reduces for all experts layers). Returns each expert's fusion error."""
        experts = {name: layer for name, layer in self.layers.items() if isinstance(layer, AdaptedExperts)}
        if not experts:
            return {}
        pairs = expert_factors(experts, chosen, self.pool, self.shards, self.config.swap)
        sums = {}
        for name, layer in experts.items():
            f = pairs[name]
            sums[name] = expert_event(layer, f, self.shards, self.config.fusion_check)
            keep = write_expert_slots(layer, chosen[name], f["B_new"], f["A_new"], self.shards, optimizer, moments)
            targets, factors = [], []
            for key in "AB":
                for t, k in self.importance.reset(name, key, keep[key]):
                    targets.append(t)
                    factors.append(k.to(t.device))
            torch._foreach_mul_(targets, factors)
        return expert_errors(sums, self.shards)

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's state with whole tensors (collective when sharded: call on every process)."""
        self._require_attached()
        out = {
            "pointer": torch.tensor(self.pointer), "events_done": torch.tensor(self.events_done),
            "interval": torch.tensor(self.schedule.interval), "total_steps": torch.tensor(self.schedule.total_steps),
            "lifetimes": torch.tensor(self.lifetimes.ended, dtype=torch.long).reshape(-1, 4),
        }
        wholes = []  # summed over processes in one all-reduce
        for name, layer in self.layers.items():
            split, replicated = self.pool.wholes(name, getattr(layer, "num_experts", layer.out_features))
            wholes += [(f"pool.{name}.{k}", t) for k, t in split.items()]
            out.update({f"pool.{name}.{k}": t for k, t in replicated.items()})
            if self.exhausted:  # released: saved as zeros, one file layout
                out.update({f"stats.{name}.{k}": torch.zeros(pair_shape(self.config.r, layer, k[0])) for k in STAT_KEYS})
            else:
                wholes += [(f"stats.{name}.{k}", t) for k, t in self.importance.whole(name, layer, self.shards)]
            out[f"slots.{name}.pool_index"] = torch.tensor(self.lifetimes.slot_pool[name], dtype=torch.long)
            out[f"slots.{name}.start"] = torch.tensor(self.lifetimes.slot_start[name], dtype=torch.long)
        if wholes:
            flat = self.shards.all_reduce(torch.cat([t.reshape(-1).float() for _, t in wholes]))
            offset = 0
            for key, t in wholes:
                out[key] = flat[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned (whole tensors; sliced into this process's
        pieces now if attached, else by ``attach``)."""
        state = dict(state)
        try:
            self.pointer = int(state.pop("pointer"))
            self.events_done = int(state.pop("events_done"))
            self.schedule.interval = int(state.pop("interval"))
            self.schedule.total_steps = int(state.pop("total_steps"))
            self.lifetimes.ended = [tuple(row) for row in state.pop("lifetimes").tolist()]
            stats = {}
            for name in self.layers:  # whole, on the host: attach keeps this process's part
                self.pool.keep(name, *(state.pop(f"pool.{name}.{k}") for k in ("U", "S", "V")), first=0, whole=True)
                for key in STAT_KEYS:
                    stats[f"{name}.{key}"] = state.pop(f"stats.{name}.{key}")
                self.lifetimes.slot_pool[name] = state.pop(f"slots.{name}.pool_index").tolist()
                self.lifetimes.slot_start[name] = state.pop(f"slots.{name}.start").tolist()
        except KeyError as e:
            raise ValueError(f"srlora state is missing {e}; the adapter file is incomplete") from None
        if state:
            raise ValueError(f"unexpected srlora state keys {sorted(state)[:5]}")
        self._saved_stats = stats
        if self.attached:
            self.attach_state()

    def attach_state(self) -> None:
        """Slice loaded (or new) state into this process's pieces."""
        self.importance.attach(self.layers, self.shards, self._saved_stats, released=self.exhausted)
        self._saved_stats = None
        for name, layer in self.layers.items():
            self.pool.place(name, layer.out_features, self.shards, layer.lora_A.device)

    # ---- reports ---------------------------------------------------------------------------

    def direction_lifetimes(self) -> dict[str, list[float]]:
        """Mean number of steps each pool direction stayed trainable, per layer type."""
        return self.lifetimes.mean_steps(self.schedule.total_steps)

    def on_train_end(self, model: nn.Module, run_dir: Path) -> None:
        self.lifetimes.write(run_dir, self.schedule.total_steps, self.event_steps(), self.events_done)


def _choose(scores: dict[str, torch.Tensor], swap: int) -> tuple[dict, dict, dict]:
    """The ``swap`` lowest-scoring pairs of every layer (fused experts: of every expert, E x
    swap), as tensors and as lists (ids and scores) for the event records."""
    flat = [n for n, t in scores.items() if t.dim() == 1]
    chosen, ids_all, scores_all = {}, {}, {}
    if flat:
        order = torch.sort(torch.stack([scores[n] for n in flat]), dim=1, stable=True).indices[:, :swap]
        chosen = dict(zip(flat, order))
        ids_all = dict(zip(flat, order.tolist()))  # one host transfer for the records of all layers
        scores_all = dict(zip(flat, torch.stack([scores[n][chosen[n]] for n in flat]).tolist()))
    for name, t in scores.items():
        if t.dim() > 1:
            chosen[name] = torch.sort(t, dim=-1, stable=True).indices[..., :swap]
            ids_all[name] = chosen[name].tolist()
            scores_all[name] = torch.gather(t, -1, chosen[name]).tolist()
    return chosen, ids_all, scores_all
