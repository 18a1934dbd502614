"""Run under `composer -n 2` (one launch instead of one per check): first the run's Trainer as
train.py builds it (the demo recipe with the `key=value` overrides among argv[2:]), counting the
process groups made on the way; then 3 batches of the tiny CLIP under each parallelism mode named
among argv[2:], one after another in the same processes.

Writes (rank 0) {"groups_made": how many times torch.distributed.init_process_group ran while the
Trainer was built, mode: {"losses": [...], "local": parameters held by this rank, "total": all
parameters}}. One group is right: Composer's. Two means a StreamingDataset made and destroyed its own
first, on the same MASTER_PORT, and the ranks' second rendezvous can join the first one's dying store
(a hang).
"""

import sys

import torch
import torch.distributed
from composer.loggers import InMemoryLogger
from composer.utils import dist

from pipeline.config import ParallelismConfig, Sharding, TrainConfig, load
from pipeline.parallel import build_parallelism
from pipeline.train import build_trainer
from tests.conftest import DEMO_YAML
from tests.tiny import make_trainer, tiny_model


def groups_made_building(overrides: list) -> int:
    made = []
    init_process_group = torch.distributed.init_process_group

    def counted(*args, **kwargs):
        made.append(args or kwargs)
        return init_process_group(*args, **kwargs)

    torch.distributed.init_process_group = counted  # streaming and Composer both call it through the module
    try:
        build_trainer(load(TrainConfig, DEMO_YAML, overrides)).close()
    finally:
        torch.distributed.init_process_group = init_process_group
    return len(made)


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


def main(out: str, *args: str) -> None:
    overrides, modes = [a for a in args if "=" in a], [a for a in args if "=" not in a]
    results = {"groups_made": groups_made_building(overrides)}  # first: before any process group
    results.update({mode: run(mode) for mode in modes})
    if dist.get_global_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
