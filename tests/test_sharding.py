"""Shard-local building blocks of the distributed backends, checked without processes.

Ranks are simulated with threads and a barrier-based all-reduce that sums in rank order, as
a real collective returns the same sum on every rank.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lrx.sharding import flat_range_of_product, fsdp_row_range, rows_of_product, zero3_flat_range
from lrx.spectral import randomized_svd_rows, top_singular


class ThreadGroup:
    """``world`` threads that can all-reduce (sum) tensors with each other."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.local = threading.local()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for other in self.slots[1:]:
            total += other
        self.barrier.wait()
        return t.copy_(total)

    def run(self, fn):
        results, errors = [None] * self.world, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # surfaced below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return results


def spectrum_matrix(rows=255, cols=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    S = 0.85 ** torch.arange(cols, dtype=torch.float64)
    return (U * S) @ V.t()


def test_ranges_cover_every_row_and_element_once():
    for world in (1, 2, 3, 4):
        rows = [fsdp_row_range(255, world, r) for r in range(world)]
        assert rows[0][0] == 0 and rows[-1][1] == 255
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        flat = [zero3_flat_range(255 * 77, world, r) for r in range(world)]
        assert flat[0][0] == 0 and flat[-1][1] == 255 * 77
        assert all(a[1] == b[0] for a, b in zip(flat, flat[1:]))
    assert fsdp_row_range(3, 4, 3) == (3, 3)  # a rank may hold no rows


@pytest.mark.parametrize("world", [2, 3])
def test_shard_local_fusion_equals_gathered_reference(world):
    g = torch.Generator().manual_seed(1)
    U, V = torch.randn(255, 6, generator=g), torch.randn(6, 77, generator=g)
    full = U @ V
    for rank in range(world):
        start, end = fsdp_row_range(255, world, rank)
        torch.testing.assert_close(rows_of_product(U, V, start, end), full[start:end], rtol=0, atol=1e-6)
        start, end = zero3_flat_range(full.numel(), world, rank)
        torch.testing.assert_close(flat_range_of_product(U, V, start, end), full.flatten()[start:end],
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_per_shard_svd_matches_single_process_and_float64(world):
    W = spectrum_matrix()
    group = ThreadGroup(world)

    def rank_fn(rank):
        start, end = fsdp_row_range(W.shape[0], world, rank)
        return randomized_svd_rows(W[start:end].float(), 8, all_reduce=group.all_reduce, n_rows=W.shape[0], seed=3)

    results = group.run(rank_fn)
    for _, S, V in results[1:]:  # replicated parts are bit-identical on every rank
        assert torch.equal(S, results[0][1]) and torch.equal(V, results[0][2])
    U = torch.cat([r[0] for r in results])
    U1, S1, V1 = top_singular(W.float(), 8, method="randomized", seed=3)
    torch.testing.assert_close(S, S1, rtol=1e-5, atol=0)
    torch.testing.assert_close(U, U1, rtol=0, atol=1e-4)
    torch.testing.assert_close(V, V1, rtol=0, atol=1e-4)
    U64, S64, Vh64 = torch.linalg.svd(W)
    assert torch.all((V.double() * Vh64[:8].t()).sum(0).abs() > 1 - 1e-5)
    assert torch.all((U.double() * U64[:, :8]).sum(0).abs() > 1 - 1e-5)
    torch.testing.assert_close(S.double(), S64[:8], rtol=1e-5, atol=0)
