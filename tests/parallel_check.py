"""Run under `composer -n 2` (one launch instead of one per check):

    parallel_check.py OUT MODE... [run KEY=VALUE...]...

First, for each `run`, train.py's main on the demo recipe with those overrides, one run after
another (the first legs of test_parallel's autoresume tests), counting the process groups they make.
Then 3 batches of the tiny CLIP under each parallelism MODE, one after another in the same processes.

Writes (rank 0) {"groups_made": how many times torch.distributed.init_process_group ran during the
runs, mode: {"losses": [...], "local": parameters held by this rank, "total": all parameters}}.
One group is right: Composer's. Two means a StreamingDataset made and destroyed its own first, on the
same MASTER_PORT, and the ranks' second rendezvous can join the first one's dying store (a hang).
"""

import sys

import torch
import torch.distributed
from composer.loggers import InMemoryLogger
from composer.utils import dist

import pipeline.train
from pipeline.config.schema import ParallelismConfig, Sharding
from pipeline.training.parallel import build_parallelism
from tests.conftest import DEMO_YAML
from tests.tiny import make_trainer, tiny_model


def groups_made_running(runs: list) -> int:
    made = []
    init_process_group = torch.distributed.init_process_group

    def counted(*args, **kwargs):
        made.append(args or kwargs)
        return init_process_group(*args, **kwargs)

    torch.distributed.init_process_group = counted  # streaming and Composer both call it through the module
    try:
        for overrides in runs:  # the first makes Composer's group; the others find it made
            pipeline.train.main([DEMO_YAML, *overrides])
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
    modes, runs = [], []
    for arg in args:
        if arg == "run":
            runs.append([])
        else:
            (runs[-1] if runs else modes).append(arg)
    results = {"groups_made": groups_made_running(runs)}  # first: before any process group
    results.update({mode: run(mode) for mode in modes})
    if dist.get_global_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
