"""SRLoRA on fused MoE experts (``lrx.methods.experts.AdaptedExperts``): a pool, scores and
events per expert, computed as batched tensors over the experts (no loop in an event).

An experts layer of E experts is E independent matrices: its pool holds U (E x out x k), S
(E x k), V (E x in x k) from one SVD per expert; a pair's score is taken per expert (E x r);
an event picks each expert's r' lowest-scoring pairs (E x r'), fuses them into that expert's
base and loads that expert's next r' pool directions into the freed slots, as one stacked edit
(``AdaptedExperts.add_edit``: U E x out x 2r', V E x 2r' x in), so the output is unchanged.

Over several processes (FSDP2, ZeRO-3) the experts dim is the one split: each process computes
the SVDs of its block of experts (``WeightAccess.row_block``, FSDP2's dim-0 split) and keeps
their pool (U, S and V); the r initial pairs of every expert are summed over processes (zeros
elsewhere, adapter-sized). In an event every process reads its pieces of A, B and the
statistics (FSDP2: whole experts; ZeRO-3: a flat range that may cut one) and computes the new
pairs of its own experts; one all-reduce for all experts layers assembles the fused pairs and
the new ones (adapter-sized, exact: x + 0 == x), so every process appends the same factors to
the experts' log (whole on every process) and folds only its piece of the edit into its piece
of the base. No process reads another's piece of an experts weight.
"""

from __future__ import annotations

import math

import torch

from lrx.methods.experts import AdaptedExperts
from lrx.methods.pissa import principal_init
from lrx.methods.srlora.importance import pair_shape
from lrx.sharding import flat_range_of_product, piece_to_full, pieces_rows
from lrx.spectral import top_singular


def init_experts(layer: AdaptedExperts, weights, cfg, seed: int) -> tuple[torch.Tensor, ...]:
    """Per expert of this process's block (all experts on one process), the top ``r_target``
    singular triplets of its weight (init time: a loop over the experts, as PiSSA's); the first
    r of every expert become the pairs (PiSSA-style, an edit of the base).

    Returns:
        This process's experts' pool: U (E' x out x k), S (E' x k), V (E' x in x k), k =
        r_target - r, and the index of its first expert.
    """
    rows, first = weights.row_block(layer)  # E' x out x in (stored layout), this process's experts
    triplets = [top_singular(w, cfg.r_target, method=cfg.svd, niter=cfg.svd_niter, oversample=cfg.svd_oversample,
                             seed=seed) for w in layer.logical(rows)]
    U, S, V = (torch.stack(t) for t in zip(*triplets, strict=True)) if triplets else (None, None, None)
    E, r = layer.num_experts, cfg.r
    shapes = ((E, layer.out_features, r), (E, r), (E, layer.in_features, r))
    if weights.world_size == 1:
        pairs = [t[..., :r] for t in (U, S, V)]
    else:  # every expert's r pairs on every process: own experts' rows, zeros elsewhere, summed
        pairs = [torch.zeros(shape) for shape in shapes]
        if U is not None:
            for whole, t in zip(pairs, (U, S, V)):
                whole[first : first + t.shape[0]] = t[..., :r]
        flat = weights.all_reduce(torch.cat([t.reshape(-1) for t in pairs]))
        pairs = [t.view(shape) for t, shape in zip(flat.split([math.prod(s) for s in shapes]), shapes)]
    principal_init(layer, *(t.to(layer.lora_A.device) for t in pairs))
    if U is None:  # more processes than experts: this one keeps no pool
        U, S, V = (torch.zeros(0, *shape[1:-1], cfg.r_target) for shape in shapes)
    return U[..., r:], S[..., r:], V[..., r:], first


def whole_of(shards, p: torch.Tensor, shape: tuple[int, ...], piece: torch.Tensor | None = None) -> torch.Tensor:
    """This process's piece of ``p`` (or ``piece``, a tensor laid out as that piece) as a whole
    tensor of ``shape`` with zeros elsewhere: summed over processes, the whole tensor."""
    start, end = shards.span(p)
    piece = shards.local(p) if piece is None else piece
    return piece_to_full(piece[: end - start], start, (math.prod(shape[:-1]), shape[-1])).view(shape)


def expert_scores(pieces: dict[str, torch.Tensor], layer: AdaptedExperts, shards) -> torch.Tensor:
    """This process's part of the score of every pair of every expert (E x r; summed over
    processes, the scores): AdaLoRA's ``mean_i s(B[e, i, k]) + mean_j s(A[e, k, j])`` from the
    statistics ``pieces`` (flat, on this process's pieces of A and B, as ``Importance`` keeps them)."""
    r = layer.r
    s_B = whole_of(shards, layer.lora_B, pair_shape(r, layer, "B"), pieces["B_ibar"] * pieces["B_ubar"])
    s_A = whole_of(shards, layer.lora_A, pair_shape(r, layer, "A"), pieces["A_ibar"] * pieces["A_ubar"])
    return s_B.sum(dim=1) / layer.out_features + s_A.sum(dim=2) / layer.in_features


def expert_factors(layers: dict[str, AdaptedExperts], chosen: dict[str, torch.Tensor], pool, shards,
                   swap: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per experts layer, the event's factors, whole and identical on every process: the fused
    pairs ``B_old`` (E x out x r'), ``A_old`` (E x r' x in) from this process's pieces of B and A,
    and the new pairs ``B_new``, ``A_new`` of its experts' pool, assembled by one all-reduce for
    all experts layers (zeros elsewhere: exact)."""
    out, parts = {}, []
    for name, layer in layers.items():
        idx, s, r = chosen[name], layer.scale, layer.r
        B = whole_of(shards, layer.lora_B, pair_shape(r, layer, "B"))
        A = whole_of(shards, layer.lora_A, pair_shape(r, layer, "A"))
        own, first = pool[name], pool.first[name]
        n = own["U"].shape[0]
        root = torch.sqrt(own["S"][..., :swap] / s)[:, None, :]
        B_new = B.new_zeros(layer.num_experts, layer.out_features, swap)
        B_new[first : first + n] = own["U"][..., :swap].to(B) * root.to(B)
        A_new = A.new_zeros(layer.num_experts, swap, layer.in_features)
        A_new[first : first + n] = (own["V"][..., :swap].to(A) * root.to(A)).transpose(1, 2)
        out[name] = {"B_old": torch.gather(B, 2, idx[:, None, :].expand(-1, B.shape[1], -1)),
                     "A_old": torch.gather(A, 1, idx[:, :, None].expand(-1, -1, A.shape[2])),
                     "B_new": B_new, "A_new": A_new}
        parts += [t.reshape(-1) for t in out[name].values()]
    if shards.world_size > 1:
        flat = shards.all_reduce(torch.cat(parts))
        for factors in out.values():
            for key, t in factors.items():
                factors[key], flat = flat[: t.numel()].view(t.shape), flat[t.numel() :]
    return out


def expert_event(layer: AdaptedExperts, factors: dict[str, torch.Tensor], shards, check: bool) -> torch.Tensor:
    """Fuse the pairs ``B_old``, ``A_old`` of each expert into its base and subtract its new
    pairs ``B_new``, ``A_new`` (one stacked edit; ``expert_factors``). Returns, where ``check``
    and the edit was folded, each expert's ``(||applied - intended||^2, ||intended||^2)`` on this
    process's piece of the base (E x 2, float64; summed over processes, the whole expert's), else
    zeros (the log is exact)."""
    s = layer.scale
    edit_U = torch.cat([factors["B_old"] * s, -s * factors["B_new"]], dim=2)
    edit_V = torch.cat([factors["A_old"], factors["A_new"]], dim=1)
    W = layer.base.weight
    start, end = shards.span(W)
    before = shards.local(W)[: end - start].to(torch.float64, copy=True) if layer.fold_edits and check else None
    layer.add_edit(edit_U, edit_V)
    sums = torch.zeros(layer.num_experts, 2, dtype=torch.float64)
    if before is None or end <= start:
        return sums
    Us, Vs = layer.stored_factors(edit_U.double().to(before.device), edit_V.double().to(before.device))
    intended = flat_range_of_product(Us, Vs, start, end)
    applied = shards.local(W)[: end - start].double() - before
    per = layer.out_features * layer.in_features
    for col, t in enumerate(((applied - intended).square(), intended.square())):
        block, first = pieces_rows(t[None], start, (layer.num_experts, per))  # this piece's experts
        sums[first : first + block.shape[1], col] = block[0].sum(dim=1).cpu()
    return sums


def expert_errors(sums: dict[str, torch.Tensor], shards) -> dict[str, list[float]]:
    """Each expert's relative fusion error ``||applied - intended|| / ||intended||`` per layer
    from ``expert_event``'s sums of every process (one all-reduce for all layers)."""
    if not sums:
        return {}
    flat = shards.all_reduce(torch.stack(list(sums.values())))
    num, den = flat[..., 0], flat[..., 1]
    errors = torch.where(den > 0, (num / den.clamp_min(1e-300)).sqrt(), 0.0)
    return dict(zip(sums, errors.tolist()))


def write_expert_slots(layer: AdaptedExperts, idx: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor,
                       shards, optimizer, moments: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Write the new pairs (whole) into slots ``idx`` of each expert's A and B (this process's
    pieces) and zero those slots' Adam ``moments``. Returns, for A and B, the flat 0/1 factor on
    this process's piece that keeps the other slots' statistics."""
    keep = {}
    for key, new, dim in (("A", A_new, 1), ("B", B_new, 2)):
        p, shape = getattr(layer, f"lora_{key}"), pair_shape(layer.r, layer, key)
        where = idx[:, :, None].expand(-1, -1, shape[2]) if key == "A" else idx[:, None, :].expand(-1, shape[1], -1)
        full = torch.zeros(shape, dtype=new.dtype, device=new.device).scatter_(dim, where, new)
        mask = torch.zeros(shape, dtype=torch.bool, device=new.device).scatter_(dim, where, True)
        keep[key] = shards.write_masked([p], full.view(1, -1), mask.view(1, -1), optimizer, moments)[0]
    return keep
