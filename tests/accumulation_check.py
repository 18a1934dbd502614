"""Run under `composer -n N`: one batch of 32 as a whole and as 4 micro-batches per rank.

Writes {loss: {run: {"loss": float, "grads": {name: tensor}}}} (rank 0) to the path in argv[1] for
each loss named after it (clip, siglip), one after another in the same processes. The loss is the
mean over ranks: SigLIP's rank loss covers its own images against every text, so only the mean is
the global batch's loss (CLIP's ranks each compute the whole loss).
"""

import sys

import torch
from composer.utils import dist

from tests.tiny import TINY, TINY_SIGLIP, GradCapture, make_trainer, tiny_model

GLOBAL_BATCH = 32


def accumulate(loss: str) -> dict:
    model_cfg = TINY_SIGLIP if loss == "siglip" else TINY
    results = {}
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    for run, microbatch in (("full", None), ("chunked", per_rank // 4)):
        capture = GradCapture()
        trainer = make_trainer(
            tiny_model(cfg=model_cfg),
            batch_size=per_rank,
            device_train_microbatch_size=microbatch,
            callbacks=[capture],
            max_duration="1ba",
        )
        trainer.fit()
        grads = {name.removeprefix("module."): grad for name, grad in capture.grads[0].items()}
        loss = torch.tensor(capture.losses[0])
        dist.all_reduce(loss)
        results[run] = {"loss": float(loss) / dist.get_world_size(), "grads": grads}
        trainer.close()
    return results


def main(out: str, *losses: str) -> None:
    results = {loss: accumulate(loss) for loss in losses}
    if dist.get_global_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
