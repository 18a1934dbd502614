"""Composer algorithms, one per file, each switched on by its section of the config's `algorithms:`
(pipeline/config/schema.py, AlgorithmsConfig) and built from one table, ALGORITHMS. Adding one is
its file, its config class and field, and its row here (pipeline/README.md). Imports config and
model (the towers, the loss), never data, training or run."""

from __future__ import annotations

from composer.algorithms import GradientClipping
from composer.core import Algorithm

from pipeline.algorithms.contrastive_accumulation import ContrastiveAccumulation
from pipeline.algorithms.flash_attention import FlashAttention
from pipeline.algorithms.grad_checkpointing import GradCheckpointing
from pipeline.algorithms.patch_masking import PatchMasking
from pipeline.algorithms.text_masking import TextMasking
from pipeline.algorithms.unmasked_tuning import UnmaskedTuning
from pipeline.config.schema import AlgorithmsConfig

# AlgorithmsConfig field -> the algorithm built from its setting (a section, or `true`), the run's
# seed and tokenizer, in the order Composer runs them on an event. Gradient clipping comes last,
# after the micro-batches' gradients are summed (AFTER_TRAIN_BATCH).
ALGORITHMS = {
    "patch_masking": lambda cfg, seed, tokenizer: PatchMasking(cfg.ratio, seed),
    "unmasked_tuning": lambda cfg, seed, tokenizer: UnmaskedTuning(cfg.start, cfg.lr),
    "text_masking": lambda cfg, seed, tokenizer: TextMasking(cfg.ratio, cfg.mode, tokenizer, seed),
    "flash_attention": lambda on, seed, tokenizer: FlashAttention(),
    "grad_checkpointing": lambda on, seed, tokenizer: GradCheckpointing(),
    "gradient_clipping": lambda cfg, seed, tokenizer: GradientClipping(
        clipping_type=cfg.type.value, clipping_threshold=cfg.threshold
    ),
}


def build_algorithms(cfg: AlgorithmsConfig, seed: int, tokenizer) -> list[Algorithm]:
    # Always on: keeps the whole batch as negatives when Composer splits it into micro-batches.
    algorithms: list[Algorithm] = [ContrastiveAccumulation()]
    for name, build in ALGORITHMS.items():
        setting = getattr(cfg, name)
        if setting is not None and setting is not False:
            algorithms.append(build(setting, seed, tokenizer))
    return algorithms
