"""The names of the metrics a run logs (metrics.csv, every logger) and its reports read back."""

LOSS = "loss/train/total"  # Composer's name for the training loss
FLOPS_PER_BATCH = "flops/batch"  # training FLOPs of one global batch (pipeline/training/callbacks.py)
SAMPLE_HASH = "data/sample_hash"  # a hash of the global batch's sample ids
DATALOADER_WAIT = "time/dataloader_wait"
TRAIN_HOURS = "time/train"  # SpeedMonitor's training wall-clock (Composer's total_wct), in hours
LOSS_GUARD_SKIPPED = "loss_guard/skipped"
PATCH_MASKING_RATIO = "patch_masking/ratio"
UNMASKED_TUNING_ACTIVE = "unmasked_tuning/active"
EVAL_PREFIX = "metrics/"  # Composer's evaluators: metrics/<eval set>/<score>
TOP1 = "top1"  # a classification set's top-1 accuracy: metrics/<set>/top1


def is_eval(metric: str) -> bool:
    return metric.startswith(EVAL_PREFIX)


def eval_score(metric: str) -> str:
    """metrics/<eval set>/<score> -> <eval set>/<score>."""
    return metric.removeprefix(EVAL_PREFIX)
