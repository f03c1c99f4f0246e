"""SRLoRA's pool: per adapted matrix, the principal directions of W0 not loaded yet.

Each process keeps only its rows of U (a row block, ``Shards.row_block``); S and V are
whole and bit-identical on every process. Fused experts (S is E x k) split the experts dim
instead: each process keeps U, S and V of its block of experts. Loaded directions leave the
pool (copies, so their memory is freed): it only ever holds what later events need.
"""

from __future__ import annotations

import math

import torch


class Pool:
    """Directions not loaded yet, by layer name: ``pool[name]`` is ``{"U", "S", "V"}`` with U
    (own rows x k), S (k) and V (in x k); fused experts have a leading dim of own experts on
    each (``first`` is then the first expert's index)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, torch.Tensor]] = {}
        self.first: dict[str, int] = {}  # the first row of U this process holds
        self.whole: set[str] = set()  # layers whose U holds every row (loaded, not yet attached)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return self.data[name]

    def values(self):
        return self.data.values()

    def keep(self, name: str, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, first: int, whole: bool) -> None:
        """Hold the directions after the initial pairs: U's rows from ``first`` (all rows if ``whole``)."""
        self.data[name] = {"U": U.contiguous(), "S": S, "V": V.contiguous()}
        self.first[name] = first
        (self.whole.add if whole else self.whole.discard)(name)

    def experts(self, name: str) -> bool:
        """Whether the layer is a fused experts weight (its pool is split by experts)."""
        return self.data[name]["S"].dim() > 1

    def split_keys(self, name: str) -> tuple[str, ...]:
        """The tensors of the layer's pool each process holds a part of (dim 0): U's rows, or for
        fused experts U, S and V of its experts; the others are whole everywhere."""
        return ("U", "S", "V") if self.experts(name) else ("U",)

    def place(self, name: str, n_rows: int, shards, device: torch.device) -> None:
        """Keep this process's rows of a pool loaded whole (fused experts: its experts), next to
        the adapter (a resumed layer has none until its state is loaded)."""
        pool = self.data.get(name)
        if pool is None:
            return
        if name in self.whole and shards.world_size > 1:
            split = self.split_keys(name)
            first, end = shards.row_block(pool["S"].shape[0] if self.experts(name) else n_rows)
            pool.update({k: pool[k][first:end] for k in split})
            self.first[name] = first
            self.whole.discard(name)
        self.data[name] = {k: v.to(device).contiguous() for k, v in pool.items()}

    def next_directions(self, names: list[str], swap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next ``swap`` directions of the layers ``names`` (same shapes) stacked: U (G x own
        rows x swap), S (G x swap), V (G x in x swap)."""
        return (torch.stack([self.data[n]["U"][..., :swap] for n in names]),
                torch.stack([self.data[n]["S"][..., :swap] for n in names]),
                torch.stack([self.data[n]["V"][..., :swap] for n in names]))

    def drop(self, name: str, swap: int) -> None:
        """Remove the ``swap`` directions just loaded (S, r_target numbers, stays a view)."""
        pool = self.data[name]
        self.data[name] = {"U": pool["U"][..., swap:].clone(), "S": pool["S"][..., swap:],
                           "V": pool["V"][..., swap:].clone()}

    def wholes(self, name: str, n_rows: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The pool as whole tensors: ``(split, replicated)``; the split ones (U; fused experts:
        U, S and V of ``n_rows`` experts) hold zeros outside this process's part, so summed over
        processes they are whole; the replicated ones (S, V) are whole on every process."""
        pool, first = self.data[name], self.first[name]
        split = self.split_keys(name)
        out = {}
        for key in split:  # dim 0: U's rows, or the experts
            out[key] = pool[key].new_zeros(n_rows, *pool[key].shape[1:])
            out[key][first : first + pool[key].shape[0]] = pool[key]
        return out, {k: v for k, v in pool.items() if k not in split}

    @staticmethod
    def bytes_after(k_left: int, out_f: int, in_f: int, world_size: int) -> int:
        """Bytes a layer's pool holds per process with ``k_left`` directions left."""
        return 4 * k_left * (math.ceil(out_f / world_size) + in_f + 1)
