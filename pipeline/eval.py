"""Zero-shot evaluation of a checkpoint (or a fresh model) on eval MDS streams.

    python pipeline/eval.py yamls/eval/zeroshot.yaml load_path=runs/demo            # a run folder
    python pipeline/eval.py yamls/eval/zeroshot.yaml load_path=s3://bucket/run/ep1-ba900-rank0.pt

The model is the one the run saved with its config (config.yaml in the run folder and next to the
checkpoints); an eval YAML's `model:` section is needed only for a checkpoint from elsewhere.
Prints a table and writes the scores as JSON (`output`). The same datasets can be Composer
evaluators during training: see `pipeline/evaluation/evaluators.py`. `patch_masking=0.5` scores FLIP's masked
inference: half of each image's patches dropped by training's own patch-dropout module.
"""

from __future__ import annotations

import json
import os
import sys

from pipeline import compat
from pipeline.config.schema import EvalConfig, load
from pipeline.evaluation.evaluate import evaluate, format_table


def main(argv: list) -> None:
    if not argv:
        sys.exit(__doc__)
    cfg = load(EvalConfig, argv[0], argv[1:])
    compat.apply()
    results = evaluate(cfg)
    os.makedirs(os.path.dirname(cfg.output) or ".", exist_ok=True)
    with open(cfg.output, "w") as f:
        json.dump(results, f, indent=2)
    masked = f", {cfg.patch_masking:.0%} of image patches dropped" if cfg.patch_masking is not None else ""
    print(f"{results['model']} from {cfg.load_path or 'a fresh initialisation'}{masked}\n")
    print(f"{format_table(results)}\n\nscores: {cfg.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
