"""Run under `composer -n 2`: the summed gradient's global norm of one batch of 32 in 4 micro-batches,
without and with Composer's GradientClipping, for each of argv[2:] (ddp, FULL_SHARD: FSDP2) in the same processes.
Writes {parallelism: norms} (rank 0)."""

import sys

import torch
from composer.utils import dist

from pipeline.config.schema import ParallelismConfig, Sharding
from pipeline.training.parallel import build_parallelism
from tests.tiny import clipping_norms


def main(out: str, *shardings: str) -> None:
    norms = {
        sharding: clipping_norms(
            batch_size=16,
            device_train_microbatch_size=4,
            parallelism_config=build_parallelism(ParallelismConfig(sharding=Sharding(sharding))),
        )
        for sharding in shardings
    }
    if dist.get_global_rank() == 0:
        torch.save(norms, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
