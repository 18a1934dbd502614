"""One Composer algorithm per file, built from the `algorithms:` section of the config."""

from __future__ import annotations

from composer.algorithms import GradientClipping
from composer.core import Algorithm

from pipeline.algorithms.contrastive_accumulation import ContrastiveAccumulation
from pipeline.algorithms.flash_attention import FlashAttention
from pipeline.algorithms.grad_checkpointing import GradCheckpointing
from pipeline.algorithms.patch_masking import PatchMasking
from pipeline.algorithms.text_masking import TextMasking
from pipeline.algorithms.unmasked_tuning import UnmaskedTuning
from pipeline.config import AlgorithmsConfig


def build_algorithms(cfg: AlgorithmsConfig, seed: int, tokenizer) -> list[Algorithm]:
    # Always on: keeps the whole batch as negatives when Composer splits it into micro-batches.
    algorithms: list[Algorithm] = [ContrastiveAccumulation()]
    if cfg.patch_masking is not None:
        algorithms.append(PatchMasking(cfg.patch_masking.ratio, seed))
    if cfg.unmasked_tuning is not None:
        algorithms.append(UnmaskedTuning(cfg.unmasked_tuning.start, cfg.unmasked_tuning.lr))
    if cfg.text_masking is not None:
        algorithms.append(TextMasking(cfg.text_masking.ratio, cfg.text_masking.mode, tokenizer, seed))
    if cfg.flash_attention:
        algorithms.append(FlashAttention())
    if cfg.grad_checkpointing:
        algorithms.append(GradCheckpointing())
    if cfg.gradient_clipping is not None:  # after the micro-batches' gradients are summed (AFTER_TRAIN_BATCH)
        clipping = cfg.gradient_clipping
        algorithms.append(GradientClipping(clipping_type=clipping.type.value, clipping_threshold=clipping.threshold))
    return algorithms
