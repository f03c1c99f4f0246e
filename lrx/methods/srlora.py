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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lrx.errors import ConfigError
from lrx.methods import register_method
from lrx.methods.base import Method, MethodConfig, Shards, WeightAccess, adapted_layers
from lrx.methods.layer import AdaptedLinear
from lrx.methods.pissa import principal_init
from lrx.sharding import flat_range_of_product, fsdp_row_range, pieces_rows, piece_to_full
from lrx.spectral import randomized_svd_rows, top_singular

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


STAT_KEYS = ("A_ibar", "A_ubar", "B_ibar", "B_ubar")


@register_method("srlora")
class SRLoRA(Method):
    config_cls = SRLoRAConfig

    def __init__(self, config: SRLoRAConfig):
        super().__init__(config)
        self.layers: dict[str, AdaptedLinear] = {}
        self.pool_data: dict[str, dict[str, torch.Tensor]] = {}  # U (own rows), S, V not loaded yet
        self.pool_first: dict[str, int] = {}  # first row of U this rank holds
        self.pool_whole: set[str] = set()  # layers whose U holds every row (loaded, not attached)
        self.stat_pieces: dict[str, dict[str, torch.Tensor]] = {}  # this rank's pieces, from attach
        self._pending_stats: dict[str, torch.Tensor] = {}  # loaded before attach
        self.last_event_bytes = 0  # bytes all-reduced for the event factors (benchmarks)
        # Host-side bookkeeping as plain lists: an event updates every layer's, and tensor
        # indexing would cost a dispatch per operation.
        self.slot_pool: dict[str, list[int]] = {}  # pool index held by each slot
        self.slot_start: dict[str, list[int]] = {}  # step at which it was loaded
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
            self.slot_pool[name] = list(range(r))
            self.slot_start[name] = [0] * r
        return names

    def init_layer(self, name: str, index: int, layer: AdaptedLinear, weights: WeightAccess) -> None:
        cfg = self.config
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
        self.pool_first[name] = first
        if weights.world_size == 1:
            self.pool_whole.add(name)
        self.pool_data[name] = {"U": U[:, cfg.r :].contiguous(), "S": S[cfg.r :], "V": V[:, cfg.r :].contiguous()}

    def attach(self, model: nn.Module, shards: Shards, compute_dtype: torch.dtype | None = None) -> None:
        """Create the importance statistics on this rank's pieces of A and B; keep only this
        rank's rows of the pool's U; move the pool next to the adapter."""
        pending = self._pending_stats or {  # statistics held whole so far (one process)
            f"{name}.{key}": value for name, st in self.stat_pieces.items() for key, value in st.items()
        }
        self._pending_stats, self.stat_pieces = {}, {}
        super().attach(model, shards, compute_dtype)
        for name, layer in self.layers.items():
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B)):
                piece = shards.pieces(p)[-1]
                start, end = shards.span(p)
                for stat in ("ibar", "ubar"):
                    full = pending.get(f"{name}.{key}_{stat}")
                    if self.exhausted:  # never read again: hold nothing
                        value = piece.new_zeros(0)
                    else:
                        value = piece.new_zeros(end - start) if full is None else full.reshape(-1)[start:end]
                    self.stat_pieces.setdefault(name, {})[f"{key}_{stat}"] = value.to(piece).clone()
            pool = self.pool_data[name]
            if name in self.pool_whole and shards.world_size > 1:  # loaded whole: keep own rows
                first, end = fsdp_row_range(layer.out_features, shards.world_size, shards.rank)
                pool["U"] = pool["U"][first:end]
                self.pool_first[name] = first
                self.pool_whole.discard(name)
            self.pool_data[name] = {k: v.to(layer.lora_A.device).contiguous() for k, v in pool.items()}

    def _attached(self) -> None:
        if not self.stat_pieces:  # used without a trainer: one process
            self.attach(nn.ModuleDict(), self.shards)

    @property
    def exhausted(self) -> bool:
        """Every event has run: the pool is empty and pair scores are never needed again."""
        return self.events_done >= self.config.n_events

    def _release_stats(self) -> None:
        """Free the importance statistics once the pool is exhausted (saved, they read as zeros,
        so adapter files keep one layout)."""
        for st in self.stat_pieces.values():
            for key, value in st.items():
                st[key] = value.new_zeros(0)

    @property
    def pool(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, the pool directions not loaded yet (U: this rank's rows, S, V)."""
        self._attached()
        return self.pool_data

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, the importance statistics I_bar and U_bar of A and B: this rank's
        pieces, shaped like A and B when the piece is the whole tensor."""
        self._attached()
        out = {}
        for name, layer in self.layers.items():
            out[name] = {}
            for key, value in self.stat_pieces[name].items():
                shape = self._shape(layer, key[0])
                out[name][key] = value.view(shape) if value.numel() == math.prod(shape) else value
        return out

    def edit_rank_bound(self) -> int:
        cfg = self.config
        return 2 * cfg.r_target - cfg.r  # PiSSA init + 2 r' per event

    def state_bytes(self, layer: AdaptedLinear, world_size: int = 1, log_bytes: int = 4) -> int:
        """The most SRLoRA holds for one layer between events, per process: the pool (U on own
        rows; S, V whole), the statistics (sharded; freed after the last event) and the edit
        log (replicated, ``log_bytes`` per value), after event k = 0 .. N. An estimate: the
        copies an event makes while it runs are not counted."""
        cfg = self.config
        out_f, in_f = layer.out_features, layer.in_features
        most = 0
        for k in range(cfg.n_events + 1):
            pool = 4 * (cfg.r_target - cfg.r - k * cfg.swap) * (math.ceil(out_f / world_size) + in_f + 1)
            stats = 4 * 2 * cfg.r * (out_f + in_f) // world_size if k < cfg.n_events else 0
            edit_log = log_bytes * (cfg.r + 2 * k * cfg.swap) * (out_f + in_f)
            most = max(most, pool + stats + edit_log)
        return most

    # ---- importance ----------------------------------------------------------------------

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.exhausted:
            return  # scores are never used again
        self._attached()
        params, grads, ibars, ubars = [], [], [], []
        for name, layer in self.layers.items():
            st = self.stat_pieces[name]
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B)):
                grad = self.shards.grad_piece(p)
                if grad is not None:
                    n = st[f"{key}_ibar"].numel()
                    params.append(self.shards.pieces(p)[-1][:n])
                    grads.append(grad[:n])
                    ibars.append(st[f"{key}_ibar"])
                    ubars.append(st[f"{key}_ubar"])
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

    def _groups(self) -> list[list[str]]:
        """Layers whose pieces have the same shapes (the same matrix shape): events and scores
        work on each group as stacked tensors, a few kernels per group instead of per layer."""
        groups: dict[tuple, list[str]] = {}
        for name, layer in self.layers.items():
            key = (layer.out_features, layer.in_features, self.shards.span(layer.lora_A),
                   self.shards.span(layer.lora_B), self.pool_first[name], self.pool_data[name]["U"].shape[0])
            groups.setdefault(key, []).append(name)
        return list(groups.values())

    def _stacked_rows(self, names: list[str], key: str, values: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The pieces ``values`` of A or B of the layers ``names`` as G x rows x C (see pieces_rows)."""
        layer = self.layers[names[0]]
        start, end = self.shards.span(getattr(layer, f"lora_{key}"))
        return pieces_rows(torch.stack([v[: end - start] for v in values]), start, self._shape(layer, key))

    def all_pair_scores(self) -> dict[str, torch.Tensor]:
        """Score of every pair of every layer (mean sensitivity over B's column plus A's row),
        identical on every rank: local sums, then one small all-reduce for all layers."""
        if self.exhausted:
            raise RuntimeError("srlora: the pool is exhausted; pair scores are not kept after the last event")
        self._attached()
        local = {}
        for names in self._groups():
            st = [self.stat_pieces[n] for n in names]
            sens = {k: torch.stack([x[f"{k}_ibar"] for x in st]) * torch.stack([x[f"{k}_ubar"] for x in st])
                    for k in ("A", "B")}
            rows_B, _ = self._stacked_rows(names, "B", list(sens["B"]))
            rows_A, first_A = self._stacked_rows(names, "A", list(sens["A"]))
            out_f, in_f = self._shape(self.layers[names[0]], "B")[0], self._shape(self.layers[names[0]], "A")[1]
            score = rows_B.sum(dim=1) / out_f
            score[:, first_A : first_A + rows_A.shape[1]] += rows_A.sum(dim=2) / in_f
            local.update(zip(names, score))
        scores = self.shards.all_reduce(torch.stack([local[n] for n in self.layers]))
        return dict(zip(self.layers, scores))

    def pair_scores(self, name: str) -> torch.Tensor:
        """Scores of one layer's pairs (collective when sharded: call on every rank)."""
        return self.all_pair_scores()[name]

    # ---- schedule ------------------------------------------------------------------------

    def check_schedule(self, total_steps: int) -> None:
        cfg, n = self.config, self.config.n_events
        if n and not cfg.interval and int(cfg.end_fraction * total_steps) // n < 1:
            raise ConfigError(
                f"srlora needs at least {-(-n // cfg.end_fraction):.0f} training steps for its {n} "
                f"recomposition events, the run has {total_steps}; raise train.max_steps/epochs or "
                "lower method.r_target"
            )

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
            self.check_schedule(total_steps)
            self.interval = int(cfg.end_fraction * total_steps) // n
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

    def _event_factors(self, chosen: dict[str, torch.Tensor]) -> list[dict]:
        """Per group of same-shape layers, the full fused pairs (B[:, idx], A[idx]) and the
        loaded directions' B rows, assembled on every rank from the local pieces by one
        all-reduce for all layers (x + 0 == x)."""
        swap, groups, parts = self.config.swap, [], []
        for names in self._groups():
            layers = [self.layers[n] for n in names]
            out_f, in_f, G = layers[0].out_features, layers[0].in_features, len(names)
            idx = torch.stack([chosen[n] for n in names])  # G x swap
            rows_B, first_B = self._stacked_rows(names, "B", [self.shards.pieces(l.lora_B)[-1] for l in layers])
            B_old = rows_B.new_zeros(G, out_f, swap)
            B_old[:, first_B : first_B + rows_B.shape[1]] = torch.gather(
                rows_B, 2, idx[:, None, :].expand(-1, rows_B.shape[1], -1))
            rows_A, first_A = self._stacked_rows(names, "A", [self.shards.pieces(l.lora_A)[-1] for l in layers])
            A_full = rows_A.new_zeros(G, self.config.r, in_f)
            A_full[:, first_A : first_A + rows_A.shape[1]] = rows_A
            A_old = torch.gather(A_full, 1, idx[:, :, None].expand(-1, -1, in_f))
            U = torch.stack([self.pool_data[n]["U"][:, :swap] for n in names])
            U_new = U.new_zeros(G, out_f, swap)
            first = self.pool_first[names[0]]
            U_new[:, first : first + U.shape[1]] = U
            groups.append({"names": names, "idx": idx, "B_old": B_old, "A_old": A_old, "U_new": U_new})
            parts += [B_old.reshape(-1), A_old.reshape(-1), U_new.reshape(-1)]
        flat = self.shards.all_reduce(torch.cat(parts))
        self.last_event_bytes = flat.numel() * flat.element_size()
        offset = 0
        for group in groups:
            for key in ("B_old", "A_old", "U_new"):
                t = group[key]
                group[key] = flat[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
        return groups

    def _shape(self, layer: AdaptedLinear, key: str) -> tuple[int, int]:
        """Shape of A or B (not ``p.shape``: ZeRO-3 empties partitioned parameters)."""
        return (self.config.r, layer.in_features) if key == "A" else (layer.out_features, self.config.r)

    @torch.no_grad()
    def recompose(self, optimizer: torch.optim.Optimizer | None, step: int) -> list[dict]:
        """One event on every layer: fuse the lowest-scoring pairs, load the next pool directions.

        Collective when sharded (every rank calls it at the same step): one all-reduce of the
        pair scores, one of the small event factors; each rank then edits only its piece of
        the base (or appends the same factors to the replicated edit log). Layers of the same
        shape are handled together as stacked tensors.

        Returns:
            One record per layer: fused pair ids and scores, new pointer, fusion error.
        """
        cfg = self.config
        swap = cfg.swap
        scores = self.all_pair_scores()
        names = list(self.layers)
        order = torch.sort(torch.stack([scores[n] for n in names]), dim=1, stable=True).indices[:, :swap]
        chosen = dict(zip(names, order))
        # One host transfer for the records of all layers.
        ids_all = dict(zip(names, order.tolist()))
        scores_all = dict(zip(names, torch.stack([scores[n][chosen[n]] for n in names]).tolist()))
        records, errors = {}, {}
        for group in self._event_factors(chosen):
            group_names, idx = group["names"], group["idx"]
            s = self.layers[group_names[0]].scale
            S = torch.stack([self.pool_data[n]["S"][:swap] for n in group_names])
            V = torch.stack([self.pool_data[n]["V"][:, :swap] for n in group_names])
            root = torch.sqrt(S / s)[:, None, :]
            B_new = group["U_new"] * root
            A_new = (V * root).transpose(1, 2)
            # One edit per layer: + s B_k A_k of the fused pairs, - s B_new A_new of the loaded ones.
            edit_U = torch.cat([group["B_old"] * s, -s * B_new], dim=2)
            edit_V = torch.cat([group["A_old"], A_new], dim=1)
            for g, name in enumerate(group_names):
                layer = self.layers[name]
                before = None
                if layer.fold_edits and cfg.fusion_check:
                    start, end = self.shards.span(layer.base.weight)
                    before = self.shards.pieces(layer.base.weight)[-1][: end - start].double()
                layer.add_edit(edit_U[g], edit_V[g])
                if before is not None:  # ||applied - intended||^2 and ||intended||^2 on this piece
                    intended = flat_range_of_product(edit_U[g].double(), edit_V[g].double(), start, end)
                    applied = self.shards.pieces(layer.base.weight)[-1][: end - start].double() - before
                    errors[name] = torch.stack([(applied - intended).square().sum(), intended.square().sum()])
            self._swap_slots(group_names, idx, B_new, A_new, optimizer)
        for index, (name, layer) in enumerate(self.layers.items()):
            # Loaded directions leave the pool (copies, so that their memory is freed): it only
            # ever holds what later events need (S, r_target numbers, stays a view).
            pool = self.pool_data[name]
            self.pool_data[name] = {"U": pool["U"][:, swap:].clone(), "S": pool["S"][swap:],
                                    "V": pool["V"][:, swap:].clone()}
            ids = ids_all[name]
            slots, starts = self.slot_pool[name], self.slot_start[name]
            for j, slot in enumerate(ids):
                self.lifetimes.append((index, slots[slot], starts[slot], step))
                slots[slot], starts[slot] = self.pointer + j, step
            records[name] = {"event": self.events_done + 1, "layer": name, "fused_pairs": ids,
                             "scores": scores_all[name], "pointer": self.pointer + swap,
                             "fusion_error": 0.0}  # the log holds the intended factors exactly
        if errors:
            err = self.shards.all_reduce(torch.stack(list(errors.values())))
            for name, (num, den) in zip(errors, err.tolist()):
                records[name]["fusion_error"] = (num / den) ** 0.5 if den > 0 else 0.0
        self.pointer += swap
        self.events_done += 1
        if self.exhausted:
            self._release_stats()
        records = list(records.values())
        log.info("srlora event %d/%d at step %d: pointer %d, fusion error max %.2e",
                 self.events_done, cfg.n_events, step, self.pointer, max(r["fusion_error"] for r in records))
        return records

    def _swap_slots(self, names: list[str], idx: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor,
                    optimizer) -> None:
        """Load the new pairs into slots ``idx`` of every live copy of A and B of the layers
        ``names`` (one group), and zero the slots' importance statistics and (per
        ``optimizer_state``) their Adam moments."""
        moments = ()
        if optimizer is not None and self.config.optimizer_state != "keep":
            # Zeroing only the first moment keeps Adam's per-element scale estimate, so the first
            # updates of a new slot are smaller than usual (a built-in warm-up); zeroing the second
            # moment too, under Adam's global step count, makes them ~1/sqrt(1 - beta2) too large.
            moments = ("exp_avg",) if self.config.optimizer_state == "reset_m" else ("exp_avg", "exp_avg_sq")
        layers = [self.layers[n] for n in names]
        for key, new in (("A", A_new), ("B", B_new)):
            shape = self._shape(layers[0], key)
            full = new.new_zeros(len(names), *shape)
            mask = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
            dim, where = (1, idx[:, :, None].expand(-1, -1, shape[1])) if key == "A" else \
                (2, idx[:, None, :].expand(-1, shape[0], -1))
            full.scatter_(dim, where, new)
            mask.scatter_(dim, where, True)
            full, mask = full.view(len(names), -1), mask.view(len(names), -1)
            params = [getattr(layer, f"lora_{key}") for layer in layers]
            start, end = self.shards.span(params[0])
            copies = [self.shards.pieces(p) for p in params]
            for c in range(len(copies[0])):  # the parameter, and ZeRO-3's fp32 master
                views = [cp[c][: end - start] for cp in copies]
                new_views = torch.where(mask[:, start:end], full[:, start:end].to(views[0].dtype), torch.stack(views))
                torch._foreach_copy_(views, list(new_views))
            replicas = [self.shards.replicas(p) for p in params]
            for c in range(len(replicas[0])):
                views = [r[c] for r in replicas]
                torch._foreach_copy_(views, list(torch.where(mask, full.to(views[0].dtype), torch.stack(views))))
            keep = (~mask[:, start:end]).float().unbind(0)
            targets, factors = [], []
            for g, (name, p) in enumerate(zip(names, params)):  # plain Python per layer: no dispatches to spare
                pieces = [self.stat_pieces[name][f"{key}_ibar"], self.stat_pieces[name][f"{key}_ubar"]]
                pieces += [t for t in (self.shards.optimizer_piece(optimizer, p, k) for k in moments) if t is not None]
                for t in pieces:
                    targets.append(t if t.shape[0] == end - start else t[: end - start])
                    factors.append(keep[g] if t.device == keep[g].device else keep[g].to(t.device))
            torch._foreach_mul_(targets, factors)

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's state with whole tensors (collective when sharded: call on every rank)."""
        self._attached()
        out = {
            "pointer": torch.tensor(self.pointer), "events_done": torch.tensor(self.events_done),
            "interval": torch.tensor(self.interval), "total_steps": torch.tensor(self.total_steps),
            "lifetimes": torch.tensor(self.lifetimes, dtype=torch.long).reshape(-1, 4),
        }
        wholes, parts = [], []
        for name, layer in self.layers.items():
            pool = self.pool_data[name]
            U = pool["U"]
            U_full = U.new_zeros(layer.out_features, U.shape[1])
            U_full[self.pool_first[name] : self.pool_first[name] + U.shape[0]] = U
            wholes.append((f"pool.{name}.U", U_full))
            for key, piece in self.stat_pieces[name].items():
                shape = self._shape(layer, key[0])
                if self.exhausted:  # released
                    out[f"stats.{name}.{key}"] = torch.zeros(shape)
                    continue
                p = layer.lora_A if key[0] == "A" else layer.lora_B
                wholes.append((f"stats.{name}.{key}", piece_to_full(piece, self.shards.span(p)[0], shape)))
            out[f"pool.{name}.S"] = pool["S"]
            out[f"pool.{name}.V"] = pool["V"]
            out[f"slots.{name}.pool_index"] = torch.tensor(self.slot_pool[name], dtype=torch.long)
            out[f"slots.{name}.start"] = torch.tensor(self.slot_start[name], dtype=torch.long)
        if wholes:
            flat = self.shards.all_reduce(torch.cat([t.reshape(-1).float() for _, t in wholes]))
            offset = 0
            for key, t in wholes:
                out[key] = flat[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        try:
            self.pointer = int(state.pop("pointer"))
            self.events_done = int(state.pop("events_done"))
            self.interval = int(state.pop("interval"))
            self.total_steps = int(state.pop("total_steps"))
            self.lifetimes = [tuple(row) for row in state.pop("lifetimes").tolist()]
            pending = {}
            for name in self.layers:  # whole, on the host: attach keeps this rank's part on its device
                self.pool_first[name] = 0
                self.pool_whole.add(name)
                self.pool_data[name] = {k: state.pop(f"pool.{name}.{k}") for k in ("U", "S", "V")}
                for key in STAT_KEYS:
                    pending[f"{name}.{key}"] = state.pop(f"stats.{name}.{key}")
                self.slot_pool[name] = state.pop(f"slots.{name}.pool_index").tolist()
                self.slot_start[name] = state.pop(f"slots.{name}.start").tolist()
        except KeyError as e:
            raise ValueError(f"srlora state is missing {e}; the adapter file is incomplete") from None
        if state:
            raise ValueError(f"unexpected srlora state keys {sorted(state)[:5]}")
        # Sliced into this rank's pieces by the next attach (the trainer's, or the first use
        # without one): the parameters may be sharded by then.
        self._pending_stats = pending
        self.stat_pieces = {}

    # ---- reports ---------------------------------------------------------------------------

    def direction_lifetimes(self) -> dict[str, list[float]]:
        """Mean number of steps each pool direction stayed trainable, per layer type."""
        rows = list(self.lifetimes)
        names = list(self.layers)
        for index, name in enumerate(names):
            for slot in range(self.config.r):
                rows.append((index, self.slot_pool[name][slot], self.slot_start[name][slot], self.total_steps))
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
