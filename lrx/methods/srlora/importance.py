"""SRLoRA's importance tracking: AdaLoRA's sensitivity EMAs per element of A and B.

After every step's backward (Zhang et al. 2023, eq. 8-10): ``I = |w * g|``,
``I_bar = b1 I_bar + (1 - b1) I``, ``U_bar = b2 U_bar + (1 - b2) |I - I_bar|``; a pair's
score is ``mean_i s(B[i, k]) + mean_j s(A[k, j])`` with ``s = I_bar * U_bar``. Statistics live
on this process's pieces of A and B (``Shards.span``); scores are local sums reduced by one
small all-reduce, identical on every process.
"""

from __future__ import annotations

import math

import torch

from lrx.sharding import piece_to_full, pieces_rows

STAT_KEYS = ("A_ibar", "A_ubar", "B_ibar", "B_ubar")


def pair_shape(r: int, layer, key: str) -> tuple[int, ...]:
    """Shape of A or B (not ``p.shape``: a partitioned parameter may be emptied); fused experts
    lead with their experts dim."""
    lead = (layer.num_experts,) if getattr(layer, "fused", False) else ()
    return (*lead, r, layer.in_features) if key == "A" else (*lead, layer.out_features, r)


class Importance:
    """The statistics of every adapted layer on this process's pieces.

    Args:
        r: adapter rank.
        beta1, beta2: the EMA factors of I_bar and U_bar.
    """

    def __init__(self, r: int, beta1: float, beta2: float):
        self.r, self.beta1, self.beta2 = r, beta1, beta2
        self.pieces: dict[str, dict[str, torch.Tensor]] = {}
        self.shapes: dict[str, dict[str, tuple[int, int]]] = {}

    def attach(self, layers: dict, shards, saved: dict[str, torch.Tensor] | None, released: bool) -> None:
        """Create the statistics on this process's pieces: zeros, or this process's part of
        ``saved`` (whole tensors by ``{layer}.{key}``); nothing once ``released``."""
        saved = saved or {}
        self.pieces = {}
        self.shapes = {name: {k: pair_shape(self.r, layer, k) for k in "AB"} for name, layer in layers.items()}
        for name, layer in layers.items():
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B)):
                local = shards.local(p)
                start, end = shards.span(p)
                for stat in ("ibar", "ubar"):
                    full = saved.get(f"{name}.{key}_{stat}")
                    if released:  # never read again: hold nothing
                        value = local.new_zeros(0)
                    else:
                        value = local.new_zeros(end - start) if full is None else full.reshape(-1)[start:end]
                    self.pieces.setdefault(name, {})[f"{key}_{stat}"] = value.to(local).clone()

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per layer, I_bar and U_bar of A and B: this process's pieces, shaped like A and B
        when the piece is the whole tensor."""
        out = {}
        for name, pieces in self.pieces.items():
            out[name] = {}
            for key, value in pieces.items():
                shape = self.shapes[name][key[0]]
                out[name][key] = value.view(shape) if value.numel() == math.prod(shape) else value
        return out

    @torch.no_grad()
    def update(self, layers: dict, shards) -> None:
        """Fold this step's gradients into the statistics: a handful of fused multi-tensor
        kernels for all layers, no host synchronisation."""
        params, grads, ibars, ubars = [], [], [], []
        for name, layer in layers.items():
            st = self.pieces[name]
            for key, p in (("A", layer.lora_A), ("B", layer.lora_B)):
                grad = shards.local_grad(p)
                if grad is not None:
                    n = st[f"{key}_ibar"].numel()
                    params.append(shards.local(p)[:n])
                    grads.append(grad[:n])
                    ibars.append(st[f"{key}_ibar"])
                    ubars.append(st[f"{key}_ubar"])
        if not params:
            return
        b1, b2 = self.beta1, self.beta2
        imp = torch._foreach_mul(params, grads)
        torch._foreach_abs_(imp)
        torch._foreach_mul_(ibars, b1)
        torch._foreach_add_(ibars, imp, alpha=1 - b1)
        torch._foreach_sub_(imp, ibars)
        torch._foreach_abs_(imp)
        torch._foreach_mul_(ubars, b2)
        torch._foreach_add_(ubars, imp, alpha=1 - b2)

    def local_scores(self, names: list[str], layer, shards) -> torch.Tensor:
        """This process's part of the pair scores of the layers ``names`` (one shape group):
        G x r, to be summed over processes."""
        st = [self.pieces[n] for n in names]
        sens = {k: torch.stack([x[f"{k}_ibar"] for x in st]) * torch.stack([x[f"{k}_ubar"] for x in st])
                for k in ("A", "B")}
        rows_B, _ = stacked_rows(shards, layer, self.r, "B", list(sens["B"]))
        rows_A, first_A = stacked_rows(shards, layer, self.r, "A", list(sens["A"]))
        score = rows_B.sum(dim=1) / layer.out_features
        score[:, first_A : first_A + rows_A.shape[1]] += rows_A.sum(dim=2) / layer.in_features
        return score

    def reset(self, name: str, key: str, keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(statistic, factor)`` pairs that zero the statistics of A or B where ``keep`` is 0."""
        out = []
        for stat in ("ibar", "ubar"):
            t = self.pieces[name][f"{key}_{stat}"]
            out.append((t if t.shape[0] == keep.shape[0] else t[: keep.shape[0]], keep))
        return out

    def release(self) -> None:
        """Free the statistics once the pool is exhausted (saved, they read as zeros)."""
        for st in self.pieces.values():
            for key, value in st.items():
                st[key] = value.new_zeros(0)

    def whole(self, name: str, layer, shards) -> list[tuple[str, torch.Tensor]]:
        """The layer's statistics as whole tensors with zeros outside this process's piece
        (summed over processes: the whole statistics)."""
        out = []
        for key, piece in self.pieces[name].items():
            p = layer.lora_A if key[0] == "A" else layer.lora_B
            shape = pair_shape(self.r, layer, key[0])  # fused experts: flat pieces of E x rows x cols
            full = piece_to_full(piece, shards.span(p)[0], (math.prod(shape[:-1]), shape[-1]))
            out.append((key, full.view(shape)))
        return out

    def bytes(self, out_f: int, in_f: int, world_size: int) -> int:
        return 4 * 2 * self.r * (out_f + in_f) // world_size


def stacked_rows(shards, layer, r: int, key: str, values: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Pieces ``values`` of A or B of same-shape layers as G x rows x C (see ``pieces_rows``)."""
    start, end = shards.span(getattr(layer, f"lora_{key}"))
    return pieces_rows(torch.stack([v[: end - start] for v in values]), start, pair_shape(r, layer, key))
