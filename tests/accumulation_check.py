"""Run under `composer -n N`: one batch of 32 as a whole and as 4 micro-batches per rank.

Writes {run: {"loss": float, "grads": {name: tensor}}} (rank 0) to the path in argv[1].
"""

import sys

import torch
from composer.utils import dist

from tests.tiny import GradCapture, make_trainer, tiny_model

GLOBAL_BATCH = 32


def main(out: str) -> None:
    results = {}
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    for run, microbatch in (("full", None), ("chunked", per_rank // 4)):
        capture = GradCapture()
        trainer = make_trainer(tiny_model(), batch_size=per_rank, device_train_microbatch_size=microbatch,
                               callbacks=[capture], max_duration="1ba")  # fmt: skip
        trainer.fit()
        grads = {name.removeprefix("module."): grad for name, grad in capture.grads[0].items()}
        results[run] = {"loss": capture.losses[0], "grads": grads}
    if dist.get_global_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
