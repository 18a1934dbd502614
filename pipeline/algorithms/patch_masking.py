"""FLIP patch masking: drop a fraction of image patch tokens after patch + position embedding.

open_clip's PatchDropout (timm's for timm towers) does exactly this: per sample, class token
kept, only in training mode, dropped tokens never enter the encoder. This algorithm installs
it, and reseeds torch's RNG at every batch from (seed, step, rank) so the masks are a function
of the step, not of the RNG history: resumed runs mask exactly as uninterrupted ones.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from open_clip.transformer import PatchDropout
from timm.layers import PatchDropoutWithIndices

from pipeline.algorithms.unwrap import clip_of


def install_patch_dropout(clip: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """Put a patch-dropout module of `ratio` into the vision tower; returns it."""
    visual = clip.visual
    if hasattr(visual, "patch_dropout"):  # open_clip VisionTransformer
        visual.patch_dropout = PatchDropout(ratio, exclude_first_token=True)
        return visual.patch_dropout
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "patch_drop"):  # timm ViT / EVA (keeps RoPE aligned)
        trunk.patch_drop = PatchDropoutWithIndices(ratio, num_prefix_tokens=trunk.num_prefix_tokens)
        return trunk.patch_drop
    raise ValueError(f"patch masking does not know the vision tower {type(visual).__name__}")


def find_patch_dropout(clip: torch.nn.Module) -> torch.nn.Module:
    for module in clip.visual.modules():
        if isinstance(module, (PatchDropout, PatchDropoutWithIndices)):
            return module
    raise ValueError("no patch masking installed: add algorithms.patch_masking")


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


class PatchMasking(Algorithm):
    def __init__(self, ratio: float = 0.5, seed: int = 0):
        if not 0 <= ratio < 1:
            raise ValueError(f"algorithms.patch_masking.ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.seed = seed

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BATCH_START)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            install_patch_dropout(clip_of(state.model), self.ratio)
            return
        torch.manual_seed(step_seed(self.seed, int(state.timestamp.batch), dist.get_global_rank()))
        logger.log_metrics({"patch_masking/ratio": find_patch_dropout(clip_of(state.model)).prob})
