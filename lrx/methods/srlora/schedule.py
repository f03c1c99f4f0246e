"""SRLoRA's event schedule: N = (r_target - r) / r' events, evenly spaced.

Events come at steps ``interval, 2 interval, ..., N interval``: a fixed ``method.interval``,
or one derived so that the last event comes by ``end_fraction`` of the run (the first after
at least one interval of importance warm-up, the last well before the end).
"""

from __future__ import annotations

import logging

from lrx.errors import ConfigError

log = logging.getLogger(__name__)


class Schedule:
    """When events happen. ``interval`` is 0 until ``start`` has run."""

    def __init__(self, n_events: int, interval: int, end_fraction: float):
        self.n_events, self.fixed_interval, self.end_fraction = n_events, interval, end_fraction
        self.interval = 0
        self.total_steps = 0

    def check(self, total_steps: int) -> None:
        """Raise ConfigError if the events cannot fit in ``total_steps`` (before training)."""
        if self.n_events and not self.fixed_interval and int(self.end_fraction * total_steps) // self.n_events < 1:
            raise ConfigError(
                f"srlora needs at least {-(-self.n_events // self.end_fraction):.0f} training steps for its "
                f"{self.n_events} recomposition events, the run has {total_steps}; raise train.max_steps/epochs "
                "or lower method.r_target"
            )

    def start(self, total_steps: int) -> None:
        """Fix the interval for a run of ``total_steps``; a resumed run keeps its own."""
        if self.interval and self.total_steps == total_steps:
            return
        self.total_steps = total_steps
        n = self.n_events
        if n == 0:
            return
        self.check(total_steps)
        if self.fixed_interval:
            self.interval = self.fixed_interval
            if n * self.interval > total_steps:
                log.warning(
                    "srlora: %d of %d recomposition events fit in %d steps with interval %d; the pool "
                    "will not be exhausted (lower method.interval or raise train.max_steps)",
                    total_steps // self.interval, n, total_steps, self.interval,
                )
        else:
            self.interval = int(self.end_fraction * total_steps) // n
        log.info("srlora: %d events, every %d steps from step %d", n, self.interval, self.interval)

    def due(self, step: int, events_done: int) -> bool:
        """Whether the next event comes after optimizer step ``step``."""
        return bool(self.interval) and events_done < self.n_events and step >= (events_done + 1) * self.interval

    def steps(self) -> list[int]:
        return [k * self.interval for k in range(1, self.n_events + 1)] if self.interval else []
