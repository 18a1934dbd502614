"""FLIP patch masking: drop a fraction of image patch tokens after patch + position embedding.

As open_clip's PatchDropout (timm's for timm towers) does: per sample, class token kept, only in
training mode, dropped tokens never enter the encoder. This algorithm installs the module where
the tower applies it (`pipeline.model.towers`). Its noise is a function of (seed, sample id), so the
masks do not depend on the step's RNG history, the rank or the world size: resumed runs, on any
number of ranks, mask exactly as uninterrupted ones.
"""

from __future__ import annotations

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from pipeline.algorithms.unwrap import clip_of
from pipeline.common import metric_keys
from pipeline.model.towers import install_patch_dropout, patch_dropout


class PatchMasking(Algorithm):
    def __init__(self, ratio: float = 0.5, seed: int = 0):
        self.ratio = ratio
        self.seed = seed

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BATCH_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            install_patch_dropout(clip_of(state.model), self.ratio, self.seed)
            return
        logger.log_metrics({metric_keys.PATCH_MASKING_RATIO: patch_dropout(clip_of(state.model)).prob})
