"""One SRLoRA recomposition event on a group of same-shape layers.

The r' lowest-scoring pairs of each layer are fused into the base (an edit) and the next r'
pool directions are loaded into the freed slots PiSSA-style and subtracted from the base (the
same edit), so the model's output does not change. Only adapter-sized factors cross
processes (one all-reduce for all groups: under FSDP2, whose edit logs are row-sharded, only
the fused rows of A, as every process has its own rows of B, of the pool's U and of the log);
each process then edits its own piece of the base (or writes its rows of the edit log, or
appends the same factors to a replicated one) and writes its pieces of A and B.
"""

from __future__ import annotations

import torch

from lrx.methods.srlora.importance import pair_shape, stacked_rows
from lrx.sharding import flat_range_of_product


def rows_stay_local(group: list, pool_rows: tuple[int, int], shards) -> bool:
    """Whether every process can apply a group's event from its own rows of U alone: its piece
    of each B, its rows of the pool's U and of each (row-sharded) edit log are one block of
    rows (FSDP2), and the verbs read nothing else (``Shards.row_piece``)."""
    own = shards.row_piece(group[0].lora_B)
    return own == pool_rows and all(
        shards.row_piece(g.lora_B) == own and g.edit_log.rows(shards) == own for g in group)


def gather_factors(groups: list[list[str]], layers: dict, chosen: dict[str, torch.Tensor], pool, shards,
                   r: int, swap: int) -> list[dict]:
    """Per group, the fused pairs ``B_old`` (G x out x swap), ``A_old`` (G x swap x in) and the
    loaded directions' U rows ``U_new``, assembled on every process from the local pieces by
    one all-reduce for all groups (x + 0 == x). Where the rows of U stay local
    (``rows_stay_local``: FSDP2 with row-sharded edit logs, or one process) ``B_old`` and
    ``U_new`` keep this process's rows only, zeros elsewhere, and only ``A_old`` crosses
    processes."""
    out, parts = [], []
    for names in groups:
        group = [layers[n] for n in names]
        layer = group[0]
        out_f, in_f, G = layer.out_features, layer.in_features, len(names)
        idx = torch.stack([chosen[n] for n in names])  # G x swap
        rows_B, first_B = stacked_rows(shards, layer, r, "B", [shards.local(g.lora_B) for g in group])
        B_old = rows_B.new_zeros(G, out_f, swap)
        B_old[:, first_B : first_B + rows_B.shape[1]] = torch.gather(
            rows_B, 2, idx[:, None, :].expand(-1, rows_B.shape[1], -1))
        rows_A, first_A = stacked_rows(shards, layer, r, "A", [shards.local(g.lora_A) for g in group])
        A_full = rows_A.new_zeros(G, r, in_f)
        A_full[:, first_A : first_A + rows_A.shape[1]] = rows_A
        A_old = torch.gather(A_full, 1, idx[:, :, None].expand(-1, -1, in_f))
        U, S, V = pool.next_directions(names, swap)
        U_new = U.new_zeros(G, out_f, swap)
        first = pool.first[names[0]]
        U_new[:, first : first + U.shape[1]] = U
        factors = {"B_old": B_old, "A_old": A_old, "U_new": U_new}
        summed = ("A_old",) if rows_stay_local(group, (first, first + U.shape[1]), shards) else tuple(factors)
        out.append({"names": names, "idx": idx, **factors, "S": S, "V": V, "summed": summed})
        parts += [factors[key].reshape(-1) for key in summed]
    if not out:  # no plain layers (only fused experts, ``srlora/experts.py``)
        return out
    flat = shards.all_reduce(torch.cat(parts))
    offset = 0
    for group in out:
        for key in group.pop("summed"):
            t = group[key]
            group[key] = flat[offset : offset + t.numel()].view(t.shape)
            offset += t.numel()
    return out


def fuse_and_load(group: dict, layers: dict, shards, check: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Apply one group's edit to each layer's base: ``+ s B_k A_k`` of the fused pairs and
    ``- s B_new A_new`` of the loaded directions. Returns the new pairs (B_new, A_new) and,
    where ``check`` and the edit was folded, ``{name: (||applied - intended||^2,
    ||intended||^2)}`` on this process's piece (measured in float64)."""
    names = group["names"]
    s = layers[names[0]].scale
    root = torch.sqrt(group["S"] / s)[:, None, :]
    B_new = group["U_new"] * root
    A_new = (group["V"] * root).transpose(1, 2)
    edit_U = torch.cat([group["B_old"] * s, -s * B_new], dim=2)
    edit_V = torch.cat([group["A_old"], A_new], dim=1)
    errors = {}
    for g, name in enumerate(names):
        layer = layers[name]
        before = None
        if layer.fold_edits and check:
            start, end = shards.span(layer.base.weight)
            before = shards.local(layer.base.weight)[: end - start].double()
        layer.add_edit(edit_U[g], edit_V[g])
        if before is not None:
            intended = flat_range_of_product(edit_U[g].double(), edit_V[g].double(), start, end)
            applied = shards.local(layer.base.weight)[: end - start].double() - before
            errors[name] = torch.stack([(applied - intended).square().sum(), intended.square().sum()])
    return B_new, A_new, errors


def swap_slots(names: list[str], layers: dict, idx: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor,
               shards, importance, optimizer, moments: tuple[str, ...], r: int) -> None:
    """Write the new pairs into slots ``idx`` of A and B of the layers ``names`` (wherever the
    backend keeps them), zero those slots' importance statistics and the Adam ``moments``."""
    group = [layers[n] for n in names]
    for key, new in (("A", A_new), ("B", B_new)):
        shape = pair_shape(r, group[0], key)
        full = new.new_zeros(len(names), *shape)
        mask = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
        dim, where = (1, idx[:, :, None].expand(-1, -1, shape[1])) if key == "A" else \
            (2, idx[:, None, :].expand(-1, shape[0], -1))
        full.scatter_(dim, where, new)
        mask.scatter_(dim, where, True)
        full, mask = full.view(len(names), -1), mask.view(len(names), -1)
        params = [getattr(layer, f"lora_{key}") for layer in group]
        keep = shards.write_masked(params, full, mask, optimizer, moments)
        targets, factors = [], []
        for g, name in enumerate(names):
            for t, k in importance.reset(name, key, keep[g]):
                targets.append(t)
                factors.append(k if t.device == k.device else k.to(t.device))
        torch._foreach_mul_(targets, factors)
