"""Run under `composer -n 2`: the summed gradient's global norm of one batch of 32 in 4 micro-batches,
without and with Composer's GradientClipping; argv[2]: ddp or FULL_SHARD (FSDP2). Writes the norms (rank 0)."""

import sys

import torch
from composer.algorithms import GradientClipping
from composer.utils import dist

from pipeline.config import ParallelismConfig, Sharding
from pipeline.parallel import build_parallelism
from tests.tiny import GradCapture, make_trainer, tiny_model


def global_norm(grads: dict) -> float:
    """The norm over all ranks: FSDP2 gradients are shards (DTensors); DDP's are replicas."""
    squares = sum(
        float(g.full_tensor().pow(2).sum()) if hasattr(g, "full_tensor") else float(g.pow(2).sum())
        for g in grads.values()
    )
    return squares**0.5


def main(out: str, sharding: str) -> None:
    norms = {}
    for name, algorithms in (("raw", []), ("clipped", [GradientClipping("norm", 0.05)])):
        capture = GradCapture()
        parallelism = build_parallelism(ParallelismConfig(sharding=Sharding(sharding)))
        make_trainer(
            tiny_model(),
            batch_size=16,
            device_train_microbatch_size=4,
            max_duration="1ba",
            callbacks=[capture],
            algorithms=algorithms,
            parallelism_config=parallelism,
        ).fit()
        norms[name] = global_norm(capture.grads[0])
    if dist.get_global_rank() == 0:
        torch.save(norms, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
