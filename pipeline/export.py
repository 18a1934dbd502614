"""Export a checkpoint's CLIP for open_clip and the tools built on it (CLIP_benchmark, open_clip_train).

    python pipeline/export.py yamls/eval/zeroshot.yaml OUT_DIR load_path=runs/demo
    python pipeline/export.py yamls/eval/zeroshot.yaml OUT.safetensors \
        load_path=runs/demo/checkpoints/ep0-ba250-rank0.pt

A folder gets open_clip's hub layout: open_clip_config.json (the model config, with any
`model.context_length` override baked in, plus the preprocessing) and open_clip_model.safetensors.
open_clip and CLIP_benchmark open it by name, with nothing to register:

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
    clip_benchmark eval --model local-dir:OUT_DIR --pretrained local --no_amp --dataset ...

A path ending in .safetensors gets the weights alone, plus <model.name>.json next to them for an
inline `model.custom` config; load it with

    open_clip.add_model_config("OUT_DIR/<model.name>.json")  # inline configs only
    model, _, preprocess = open_clip.create_model_and_transforms("<model.name>", pretrained="OUT.safetensors")

The model is the one the run saved with its config (or an eval YAML's `model:` section); `load_path`
is the run folder or one of its checkpoints.
"""

from __future__ import annotations

import sys

from pipeline import compat
from pipeline.config.schema import EvalConfig, load
from pipeline.model.export import export
from pipeline.run.saved import load_clip


def main(argv: list) -> None:
    if len(argv) < 2 or "=" in argv[1]:
        sys.exit(__doc__)
    cfg = load(EvalConfig, argv[0], argv[2:])
    compat.apply()
    clip, _, _, model = load_clip(cfg)
    out = argv[1]
    print("wrote " + ", ".join(export(clip, model, out)))
    if not out.endswith(".safetensors"):
        print(f'open with open_clip.create_model_and_transforms("local-dir:{out}")')
    elif model.custom is None and model.context_length is not None:
        print(f"open_clip needs force_context_length={model.context_length} to build this text tower")


if __name__ == "__main__":
    main(sys.argv[1:])
