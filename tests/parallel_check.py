"""Run under `composer -n 2`: 3 batches of the tiny CLIP under one parallelism mode (argv[2]), with
HYBRID_SHARD's shard size (argv[3], optional).

Writes (rank 0) {"losses": [...], "local": parameters held by this rank, "total": all parameters}.
"""

import sys

import torch
from composer.loggers import InMemoryLogger
from composer.utils import dist

from pipeline.config import ParallelismConfig, Sharding
from pipeline.parallel import build_parallelism
from tests.tiny import make_trainer, tiny_model


def main(out: str, sharding: str, shard_size: str = "") -> None:
    log = InMemoryLogger()
    cfg = ParallelismConfig(sharding=Sharding(sharding), shard_size=int(shard_size) if shard_size else None)
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    trainer = make_trainer(
        model, batch_size=8, max_duration="3ba", loggers=[log], parallelism_config=build_parallelism(cfg)
    )
    trainer.fit()
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.state.model.parameters())
    losses = [float(v) for _, v in log.data["loss/train/total"]]
    if dist.get_global_rank() == 0:
        torch.save({"losses": losses, "local": local, "total": total}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
