"""Run under `composer -n 2`: 3 batches of the tiny CLIP under each parallelism mode named (argv[2:]),
one after another in the same processes (one launch instead of one per mode).

Writes (rank 0) {mode: {"losses": [...], "local": parameters held by this rank, "total": all parameters}}.
"""

import sys

import torch
from composer.loggers import InMemoryLogger
from composer.utils import dist

from pipeline.config import ParallelismConfig, Sharding
from pipeline.parallel import build_parallelism
from tests.tiny import make_trainer, tiny_model


def run(sharding: str) -> dict:
    log = InMemoryLogger()
    cfg = ParallelismConfig(sharding=Sharding(sharding))
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    trainer = make_trainer(
        model, batch_size=8, max_duration="3ba", loggers=[log], parallelism_config=build_parallelism(cfg)
    )
    trainer.fit()
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trainer.state.model.parameters())
    trainer.close()
    return {"losses": [float(v) for _, v in log.data["loss/train/total"]], "local": local, "total": total}


def main(out: str, *modes: str) -> None:
    results = {mode: run(mode) for mode in modes}
    if dist.get_global_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
