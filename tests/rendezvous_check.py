"""Run under `composer -n 2`: build the run's Trainer as train.py does (argv[2:]: overrides of the
demo recipe), counting the process groups made on the way.

Writes (rank 0) {"groups_made": how many times torch.distributed.init_process_group ran}. One is
right: Composer's. Two means a StreamingDataset made and destroyed its own first, on the same
MASTER_PORT, and the ranks' second rendezvous can join the first one's dying store (a hang).
"""

import sys

import torch
import torch.distributed

from pipeline.config import TrainConfig, load
from pipeline.train import build_trainer
from tests.conftest import DEMO_YAML


def main(out: str, *overrides: str) -> None:
    made = []
    init_process_group = torch.distributed.init_process_group

    def counted(*args, **kwargs):
        made.append(args or kwargs)
        return init_process_group(*args, **kwargs)

    torch.distributed.init_process_group = counted  # streaming and Composer both call it through the module
    trainer = build_trainer(load(TrainConfig, DEMO_YAML, list(overrides)))
    if torch.distributed.get_rank() == 0:
        torch.save({"groups_made": len(made)}, out)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
