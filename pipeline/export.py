"""Export a checkpoint's CLIP to open_clip's format: a safetensors file (+ the model config JSON).

    python pipeline/export.py yamls/eval/zeroshot.yaml OUT.safetensors load_path=runs/demo/checkpoints/latest-rank0.pt

The model comes from an eval YAML (its `model` and `load_path`). An inline `model.custom` config
is written next to the weights as <model.name>.json; load the export with

    open_clip.add_model_config("OUT_DIR/<model.name>.json")  # inline configs only
    model, _, preprocess = open_clip.create_model_and_transforms("<model.name>", pretrained="OUT.safetensors")
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from safetensors.torch import save_file

from pipeline.config import EvalConfig, ModelConfig, load
from pipeline.eval import load_clip


def export(clip: torch.nn.Module, cfg: ModelConfig, out: str) -> list:
    """Write `clip` for open_clip; returns the files written."""
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    # open_clip's own 0-dim shape: training keeps (1,) for FSDP2
    state["logit_scale"] = state["logit_scale"].reshape(())
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_file(state, out)
    if cfg.custom is None:
        return [out]
    model_config = copy.deepcopy(cfg.custom)
    if cfg.context_length is not None:  # bake the override in, so open_clip builds the same text tower
        model_config["text_cfg"]["context_length"] = cfg.context_length
    config_path = os.path.join(os.path.dirname(out), f"{cfg.name}.json")
    with open(config_path, "w") as f:
        json.dump(model_config, f, indent=2)
    return [out, config_path]


def main(argv: list) -> None:
    if len(argv) < 2 or "=" in argv[1]:
        sys.exit(__doc__)
    cfg = load(EvalConfig, argv[0], argv[2:])
    clip, _, _ = load_clip(cfg)
    written = export(clip, cfg.model, argv[1])
    print("wrote " + ", ".join(written))
    if cfg.model.custom is None and cfg.model.context_length is not None:
        print(f"open_clip needs force_context_length={cfg.model.context_length} to build this text tower")


if __name__ == "__main__":
    main(sys.argv[1:])
