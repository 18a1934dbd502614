"""FLIP's unmasked tuning: from `start` on, the masking ratio is 0 (optionally at its own lr).

`lr` replaces the scheduled learning rate during tuning, scaled per parameter group as the
main phase scales it (per-tower lr, layer decay relative to optimizer.lr).

Switching is a function of the timestamp, so a resumed run lands in the right phase.
"""

from __future__ import annotations

from typing import Optional

from composer.core import Algorithm, Event, State, Time
from composer.loggers import Logger

from pipeline.algorithms.unwrap import clip_of
from pipeline.common import metric_keys
from pipeline.model.towers import patch_dropout


class UnmaskedTuning(Algorithm):
    def __init__(self, start: str = "0.95dur", lr: Optional[float] = None):
        self.start = Time.from_timestring(start)
        self.lr = lr
        self.masking_ratio: Optional[float] = None

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_START

    def active(self, state: State) -> bool:
        if self.start.unit.value == "dur":
            return float(state.get_elapsed_duration()) >= self.start.value
        return state.timestamp.get(self.start.unit) >= self.start

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        dropout = patch_dropout(clip_of(state.model))
        if self.masking_ratio is None:
            self.masking_ratio = dropout.prob
        active = self.active(state)
        dropout.prob = 0.0 if active else self.masking_ratio
        if active and self.lr is not None:
            # Runs after the scheduler stepped, so this lr holds for the whole step.
            for optimizer in state.optimizers:
                for group in optimizer.param_groups:
                    # initial_lr: the group's base lr, as LambdaLR records it (absent: no scheduler)
                    base_lr = group.setdefault("initial_lr", group["lr"])
                    group["lr"] = self.lr * base_lr / optimizer.defaults["lr"]
        logger.log_metrics({metric_keys.UNMASKED_TUNING_ACTIVE: int(active)})
