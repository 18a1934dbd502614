"""Weights in: a whole pretrained model (`model.pretrained`), or one tower from another model's
weights (`model.visual_init`, `model.text_init`), as EVA-CLIP starts: EVA02 MIM weights for the
image tower, OpenAI CLIP's for the text tower.

Files are read safely (safetensors, or torch.load with weights_only): an open_clip export (a hub
folder or one .safetensors), an open_clip training checkpoint (`state_dict`), a Composer checkpoint,
or a plain state dict (timm's `model.safetensors`), local or remote. Every key of the tower must
arrive and every key that arrives must be used, unless `allow_missing` / `allow_unexpected` name it
(fnmatch patterns); position embeddings are resampled when the grid differs, a timm patch
embedding when the patch size does; any other shape mismatch fails naming the key.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import tempfile

import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME
from safetensors.torch import load_file

from pipeline.checkpoint.folder import CheckpointError, is_save_folder, is_sharded_checkpoint
from pipeline.checkpoint.loading import read_checkpoint, read_checkpoint_model
from pipeline.checkpoint.resume import resume_checkpoint
from pipeline.common import storage
from pipeline.common.storage import is_remote
from pipeline.config.schema import ConfigError, ModelConfig, WeightsConfig, WeightsLayout
from pipeline.model.clip import WEIGHTS_PREFIX
from pipeline.model.towers import layout_to_clip, resample_to_fit, tower_of_key


def clip_state(model_state: dict) -> dict:
    """The open_clip weights in a Composer model state."""
    return {k.removeprefix(WEIGHTS_PREFIX): v for k, v in model_state.items() if k.startswith(WEIGHTS_PREFIX)}


def clip_weights(path: str, trust: bool = False) -> dict:
    """The open_clip weights of a Composer checkpoint (full or sharded, local or remote) or of a run's
    save folder (its newest whole checkpoint), never unpickling code unless `trust`."""
    if is_save_folder(path):
        path = resume_checkpoint(path).path  # read_checkpoint_model checks its signature itself
    try:
        return clip_state(read_checkpoint_model(path, trust))
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    except (KeyError, TypeError):
        raise ConfigError(f"{path} is not a Composer checkpoint (no state.model)") from None


def read_weights(path: str) -> dict:
    """{key: tensor} of a weights file or export folder, or of a run's newest whole checkpoint (its
    save folder), local or remote, never unpickling code."""
    if is_save_folder(path) or is_sharded_checkpoint(path):  # the run's own, signed
        return clip_weights(path)
    if is_remote(path):
        with tempfile.TemporaryDirectory() as folder:
            local = os.path.join(folder, os.path.basename(path.rstrip("/")))
            storage.download_file(path, local)
            return read_weights(local)
    if os.path.isdir(path):
        path = os.path.join(path, HF_SAFE_WEIGHTS_NAME)  # open_clip's hub layout
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        data = read_checkpoint(path)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    if isinstance(data.get("state"), dict) and "model" in data["state"]:  # Composer
        return clip_state(data["state"]["model"])
    state = data.get("state_dict", data)  # open_clip's training checkpoints keep it under state_dict
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _fit(clip: torch.nn.Module, what: str, arriving: dict, expected: dict, cfg: WeightsConfig) -> dict:
    """Tensors that fit `expected` (resampled position embeddings); fails on what does not fit."""
    missing = sorted(k for k in expected if k not in arriving and not _matches(k, cfg.allow_missing))
    unexpected = sorted(k for k in arriving if k not in expected and not _matches(k, cfg.allow_unexpected))
    if missing or unexpected:
        raise ConfigError(
            f"{what} from {cfg.path} ({cfg.layout.value} layout) does not fit this model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}. Name keys meant to stay new in allow_missing, or to be "
            "dropped in allow_unexpected (fnmatch patterns)"
        )
    fitted = {}
    for key, value in arriving.items():
        if key not in expected:
            continue
        if value.shape != expected[key].shape:
            value = resample_to_fit(clip, key, value) if value.ndim > 1 else None
            if value is None or value.shape != expected[key].shape:
                raise ConfigError(
                    f"{what} from {cfg.path}: '{key}' has shape {tuple(arriving[key].shape)}, "
                    f"this model's has {tuple(expected[key].shape)}"
                )
        fitted[key] = value.to(expected[key].dtype)
    return fitted


def load_pretrained(clip: torch.nn.Module, cfg: WeightsConfig) -> int:
    """A whole open_clip-layout model's weights into `clip`; returns how many tensors arrived."""
    source = read_weights(cfg.path)
    for name in ("logit_scale", "logit_bias"):  # open_clip keeps 0-dim scalars; training keeps (1,)
        if name in source:
            source[name] = source[name].reshape(1)
    fitted = _fit(clip, "model.pretrained", source, clip.state_dict(), cfg)
    clip.load_state_dict(fitted, strict=False)
    return len(fitted)


def load_tower(clip: torch.nn.Module, tower: str, cfg: WeightsConfig) -> int:
    """One tower's weights into `clip`; returns how many tensors arrived."""
    layout = WeightsLayout.open_clip if cfg.layout == WeightsLayout.openai else cfg.layout  # the same key names
    arriving = layout_to_clip(clip, tower, layout.value, read_weights(cfg.path))
    expected = {k: v for k, v in clip.state_dict().items() if tower_of_key(k) == tower}
    fitted = _fit(clip, f"model.{tower}_init", arriving, expected, cfg)
    clip.load_state_dict(fitted, strict=False)
    return len(fitted)


def load_initial_weights(clip: torch.nn.Module, cfg: ModelConfig) -> None:
    """model.pretrained, then visual_init / text_init on top; says what arrived."""
    loaded = []
    if cfg.pretrained is not None:
        loaded.append(f"{load_pretrained(clip, cfg.pretrained)} tensors from {cfg.pretrained.path}")
    for tower, init in (("visual", cfg.visual_init), ("text", cfg.text_init)):
        if init is not None:
            loaded.append(
                f"{tower} tower: {load_tower(clip, tower, init)} tensors from {init.path} ({init.layout.value})"
            )
    if loaded:
        print(f"{cfg.name}: " + "; ".join(loaded), file=sys.stderr)
