"""A CLIP's weights written for open_clip and the tools built on it: a folder in open_clip's hub
layout, or one .safetensors file (with the model's JSON config when it is an inline one);
pipeline/export.py is the command."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import open_clip
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file

from pipeline.config.schema import ModelConfig
from pipeline.model.clip import loss_init


def open_clip_weights(clip: torch.nn.Module) -> dict:
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    for name in ("logit_scale", "logit_bias"):  # open_clip's own 0-dim shape: training keeps (1,) for FSDP2
        if name in state:
            state[name] = state[name].reshape(())
    return state


def model_config(cfg: ModelConfig) -> dict:
    """open_clip's config of the model: the inline one or the built-in one, with the context length
    and the loss's logit init (SigLIP's bias makes open_clip create the parameter) baked in."""
    config = copy.deepcopy(cfg.custom) if cfg.custom is not None else open_clip.get_model_config(cfg.name)
    if cfg.context_length is not None:  # so that open_clip builds the same text tower
        config["text_cfg"]["context_length"] = cfg.context_length
    config.update(loss_init(cfg))
    return config


def export_folder(clip: torch.nn.Module, cfg: ModelConfig, folder: str) -> list:
    """open_clip's hub layout (as open_clip.push_to_hf_hub writes it); returns the files written."""
    os.makedirs(folder, exist_ok=True)
    weights, config = os.path.join(folder, HF_SAFE_WEIGHTS_NAME), Path(folder) / HF_CONFIG_NAME
    save_file(open_clip_weights(clip), weights)
    save_config_for_hf(clip, config, model_config=model_config(cfg))  # model config + preprocessing
    return [weights, str(config)]


def export_file(clip: torch.nn.Module, cfg: ModelConfig, out: str) -> list:
    """One safetensors file (+ <name>.json for an inline config); returns the files written."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_file(open_clip_weights(clip), out)
    if cfg.custom is None:
        return [out]
    config_path = os.path.join(os.path.dirname(out), f"{cfg.name}.json")
    with open(config_path, "w") as f:
        json.dump(model_config(cfg), f, indent=2)
    return [out, config_path]


def export(clip: torch.nn.Module, cfg: ModelConfig, out: str) -> list:
    """A .safetensors file, or else a folder in open_clip's hub layout."""
    return (export_file if out.endswith(".safetensors") else export_folder)(clip, cfg, out)
