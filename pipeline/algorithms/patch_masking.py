"""FLIP patch masking: drop a fraction of image patch tokens after patch + position embedding.

open_clip's PatchDropout (timm's for timm towers) does exactly this: per sample, class token
kept, only in training mode, dropped tokens never enter the encoder. This algorithm installs
it where the tower applies it (`pipeline.towers`), and reseeds torch's RNG at every batch from
(seed, step, rank) so the masks are a function of the step, not of the RNG history: resumed
runs mask exactly as uninterrupted ones.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist

from pipeline.algorithms.unwrap import clip_of
from pipeline.towers import install_patch_dropout, patch_dropout


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


class PatchMasking(Algorithm):
    def __init__(self, ratio: float = 0.5, seed: int = 0):
        self.ratio = ratio
        self.seed = seed

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BATCH_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            install_patch_dropout(clip_of(state.model), self.ratio)
            return
        torch.manual_seed(step_seed(self.seed, int(state.timestamp.batch), dist.get_global_rank()))
        logger.log_metrics({"patch_masking/ratio": patch_dropout(clip_of(state.model)).prob})
