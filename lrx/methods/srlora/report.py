"""SRLoRA's report: how long each pool direction stayed trainable, per layer type.

Slots are tracked as plain Python lists (an event updates every layer's, and tensor
indexing would cost a dispatch per operation); ``write`` makes ``srlora_lifetimes.json/.png``.
"""

from __future__ import annotations

import json
from pathlib import Path


class Lifetimes:
    """Which pool direction each slot holds, since when, and the ended lifetimes."""

    def __init__(self, r: int, r_target: int):
        self.r, self.r_target = r, r_target
        self.slot_pool: dict[str, list[int]] = {}  # pool index held by each slot
        self.slot_start: dict[str, list[int]] = {}  # step at which it was loaded
        self.ended: list[tuple[int, int, int, int]] = []  # (layer, pool index, start, end)

    def add_layer(self, name: str, experts: int = 0) -> None:
        """A layer's slots; fused experts (``experts`` > 0) keep one list of slots per expert."""
        if experts:
            self.slot_pool[name] = [list(range(self.r)) for _ in range(experts)]
            self.slot_start[name] = [[0] * self.r for _ in range(experts)]
        else:
            self.slot_pool[name] = list(range(self.r))
            self.slot_start[name] = [0] * self.r

    def replace(self, index: int, name: str, slots: list, pointer: int, step: int) -> None:
        """Slots ``slots`` of layer ``name`` (the ``index``-th) now hold directions ``pointer, ...``
        (fused experts: ``slots`` is one list per expert)."""
        pools, starts = self.slot_pool[name], self.slot_start[name]
        if not slots or not isinstance(slots[0], list):
            pools, starts, slots = [pools], [starts], [slots]
        for pool, start, chosen in zip(pools, starts, slots, strict=True):
            for j, slot in enumerate(chosen):
                self.ended.append((index, pool[slot], start[slot], step))
                pool[slot], start[slot] = pointer + j, step

    def mean_steps(self, total_steps: int) -> dict[str, list[float]]:
        """Mean number of steps each pool direction stayed trainable, per layer type."""
        rows = list(self.ended)
        names = list(self.slot_pool)
        for index, name in enumerate(names):
            pools, starts = self.slot_pool[name], self.slot_start[name]
            if pools and isinstance(pools[0], list):  # fused experts: per expert
                rows += [(index, p, s, total_steps) for pool, start in zip(pools, starts) for p, s in zip(pool, start)]
                continue
            for slot in range(self.r):
                rows.append((index, pools[slot], starts[slot], total_steps))
        per_type: dict[str, list[list[int]]] = {}
        for index, pool_index, start, end in rows:
            kind = names[index].rsplit(".", 1)[-1]
            per_type.setdefault(kind, [[] for _ in range(self.r_target)])[pool_index].append(end - start)
        return {k: [sum(v) / len(v) if v else 0.0 for v in lists] for k, lists in per_type.items()}

    def write(self, run_dir: Path, total_steps: int, event_steps: list[int], events_done: int) -> None:
        """``srlora_lifetimes.json`` and a plot of it, ``srlora_lifetimes.png``."""
        lifetimes = self.mean_steps(total_steps)
        (run_dir / "srlora_lifetimes.json").write_text(json.dumps(
            {"total_steps": total_steps, "event_steps": event_steps, "mean_steps_trainable": lifetimes}))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, values in sorted(lifetimes.items()):
            ax.plot(range(len(values)), values, marker=".", label=kind)
        ax.axvline(self.r - 0.5, color="grey", linestyle=":", label="initial pairs | pool")
        ax.set_xlabel("pool direction (singular value rank)")
        ax.set_ylabel("steps trainable (mean over layers)")
        ax.set_title(f"SRLoRA direction lifetimes ({events_done} events, {total_steps} steps)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(run_dir / "srlora_lifetimes.png", dpi=100)
        plt.close(fig)
