"""A run that explains itself: its resolved config is written to the run folder and next to its
checkpoints (local or in a bucket) when it starts, and eval / export read the model back from there.

    runs/demo/config.yaml                   the run folder
    runs/demo/checkpoints/config.yaml       next to the checkpoints (s3://bucket/run/config.yaml)
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from composer.utils import get_file, maybe_create_object_store_from_uri, parse_uri

from pipeline.config import ConfigError, ModelConfig, TrainConfig, load, to_yaml
from pipeline.paths import is_remote

CONFIG_FILE = "config.yaml"
LATEST_CHECKPOINT = "latest-rank0.pt"


def write_run_config(cfg: TrainConfig) -> None:
    """The resolved config, in the run folder and in the save folder (uploaded when remote)."""
    text = to_yaml(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, CONFIG_FILE), "w") as f:
        f.write(text)
    if not is_remote(cfg.save_folder):
        os.makedirs(cfg.save_folder, exist_ok=True)
        with open(os.path.join(cfg.save_folder, CONFIG_FILE), "w") as f:
            f.write(text)
        return
    with tempfile.TemporaryDirectory() as staging:
        local = os.path.join(staging, CONFIG_FILE)
        with open(local, "w") as f:
            f.write(text)
        object_name = os.path.join(parse_uri(cfg.save_folder)[2], CONFIG_FILE)
        maybe_create_object_store_from_uri(cfg.save_folder).upload_object(object_name, local)


def _saved_config(folder: str) -> Optional[TrainConfig]:
    """The run config saved in a local or remote folder, or None when there is none."""
    if not is_remote(folder):
        path = os.path.join(folder, CONFIG_FILE)
        return load(TrainConfig, path) if os.path.isfile(path) else None
    with tempfile.TemporaryDirectory() as staging:
        local = os.path.join(staging, CONFIG_FILE)
        try:
            get_file(f"{folder.rstrip('/')}/{CONFIG_FILE}", local)
        except FileNotFoundError:
            return None
        return load(TrainConfig, local)


def resolve_run(load_path: str, model: Optional[ModelConfig]) -> tuple:
    """(model config, checkpoint path) for a run folder or a checkpoint. The model is the one
    given, else the one in the config.yaml saved with the run."""
    is_local_folder = not is_remote(load_path) and os.path.isdir(load_path)
    if is_local_folder and os.path.isfile(os.path.join(load_path, CONFIG_FILE)):  # a run folder
        saved = _saved_config(load_path)
        return model or saved.model, os.path.join(saved.save_folder, LATEST_CHECKPOINT)
    if model is not None:
        return model, load_path
    saved = _saved_config(os.path.dirname(load_path.rstrip("/")))
    if saved is None:
        raise ConfigError(
            f"No model section, and no {CONFIG_FILE} next to {load_path} to read it from: add a `model:` "
            "section (the checkpoint's architecture) or point load_path at the run folder train.py wrote"
        )
    return saved.model, load_path
