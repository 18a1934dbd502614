"""A run read back: its resolved config (written to the run folder and next to its checkpoints,
local or in a bucket, when it starts), the sample order it pinned, and its model and weights, which
eval, export, `model.pretrained` and the bench load from here (file names: pipeline/run/files.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from functools import reduce
from typing import NamedTuple, Optional

import torch
from composer.utils import dist, reproducibility

from pipeline.checkpoint.folder import is_save_folder
from pipeline.checkpoint.resume import resume_checkpoint
from pipeline.common import storage
from pipeline.common.storage import is_remote
from pipeline.config.schema import ConfigError, EvalConfig, ModelConfig, TrainConfig, load, to_yaml
from pipeline.model.clip import build_clip
from pipeline.model.weights import clip_weights
from pipeline.run.files import CONFIG_FILE


def write_run_config(cfg: TrainConfig) -> None:
    """The resolved config, in the run folder and in the save folder (uploaded when remote)."""
    text = to_yaml(cfg)
    for folder in (cfg.run_dir, cfg.checkpoint.save_folder):
        storage.write_text(f"{folder.rstrip('/')}/{CONFIG_FILE}", text)


def saved_config(folder: str) -> Optional[TrainConfig]:
    """The run config saved in a local or remote folder, or None when there is none."""
    text = storage.read_bytes(f"{folder.rstrip('/')}/{CONFIG_FILE}")
    if text is None:
        return None
    with tempfile.TemporaryDirectory() as staging:  # the loader reads files (and `base:` beside them)
        local = os.path.join(staging, CONFIG_FILE)
        with open(local, "wb") as f:
            f.write(text)
        return load(TrainConfig, local)


# What decides which samples make up each global batch, in which epoch (streaming's elastic
# determinism keeps the order for any number of ranks, nodes and workers while these stay).
SAMPLE_ORDER_KEYS = (
    "seed",
    "data.global_batch_size",
    "data.streams",
    "data.shuffle",
    "data.epoch_size",
    "data.sampling",
    "data.num_canonical_nodes",
    "data.shuffle_algo",
    "data.shuffle_block_size",
)
PINNED_AT_FIRST_START = ("data.num_canonical_nodes", "data.shuffle_block_size")


def _sample_order_value(cfg: TrainConfig, key: str):
    value = reduce(getattr, key.split("."), cfg)
    if key == "data.streams":  # where a node caches a stream (local) does not change the order
        return {name: (s.remote or s.local, s.proportion) for name, s in value.items()}
    return value


def pin_sample_order(cfg: TrainConfig, saved: Optional[TrainConfig]) -> TrainConfig:
    """`cfg` with num_canonical_nodes and shuffle_block_size fixed: those the run started with when
    it resumes (`saved`: its config.yaml), else the node count now (as streaming would pick) and
    streaming's block size for it. A resume that would change the sample order fails naming the key."""
    data = cfg.data
    if saved is None:
        nodes = data.num_canonical_nodes or max(1, dist.get_world_size() // dist.get_local_world_size())
        block = data.shuffle_block_size or max(4_000_000 // nodes, 1 << 18)  # streaming's default
        return dataclasses.replace(
            cfg, data=dataclasses.replace(data, num_canonical_nodes=nodes, shuffle_block_size=block)
        )
    pinned = {
        key.split(".")[1]: getattr(data, key.split(".")[1]) or _sample_order_value(saved, key)
        for key in PINNED_AT_FIRST_START
    }
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(data, **pinned))
    for key in SAMPLE_ORDER_KEYS:
        now, then = _sample_order_value(cfg, key), _sample_order_value(saved, key)
        if now != then:
            raise ConfigError(
                f"{key}={now} would change the sample order of the run being resumed, which started with "
                f"{key}={then} (its {CONFIG_FILE} in {cfg.checkpoint.save_folder}). "
                "Resume with the same value, or start a new run."
            )
    return cfg


class ResolvedRun(NamedTuple):
    model: ModelConfig
    checkpoint: Optional[str]  # None: a fresh model


def resolve_run(load_path: str, model: Optional[ModelConfig]) -> ResolvedRun:
    """The model config and checkpoint path for a run folder, a run's save folder (local or in a bucket:
    its newest whole checkpoint) or a checkpoint. The model is the one given, else the one in the
    config.yaml saved with the run."""
    is_local_folder = not is_remote(load_path) and os.path.isdir(load_path)
    if is_save_folder(load_path) or (is_local_folder and os.path.isfile(os.path.join(load_path, CONFIG_FILE))):
        saved = saved_config(load_path)  # in both folders
        resume = resume_checkpoint(saved.checkpoint.save_folder if not is_save_folder(load_path) else load_path)
        if resume is None:
            raise ConfigError(
                f"The run in {load_path} has no finished checkpoint in {saved.checkpoint.save_folder} yet"
            )
        return ResolvedRun(model or saved.model, resume.path)
    if model is not None:
        return ResolvedRun(model, load_path)
    saved = saved_config(os.path.dirname(load_path.rstrip("/")))
    if saved is None:
        raise ConfigError(
            f"No model section, and no {CONFIG_FILE} next to {load_path} to read it from: add a `model:` "
            "section (the checkpoint's architecture) or point load_path at the run folder train.py wrote"
        )
    return ResolvedRun(saved.model, load_path)


def _not_random_init(record: logging.LogRecord) -> bool:
    return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _weights_loaded_after():
    """Without open_clip's "No pretrained weights loaded ... Model initialized randomly", which is
    untrue when a checkpoint's weights are loaded right after the model is built."""
    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(_not_random_init)
    try:
        yield
    finally:
        root.removeFilter(_not_random_init)


def model_and_checkpoint(cfg: EvalConfig) -> ResolvedRun:
    """From the run that load_path names, unless the eval config has its own model section."""
    if cfg.load_path:
        return resolve_run(cfg.load_path, cfg.model)
    if cfg.model is None:
        raise ConfigError("A fresh model (no load_path) needs a model section in the eval config")
    return ResolvedRun(cfg.model, None)


class LoadedClip(NamedTuple):
    clip: torch.nn.Module  # in eval mode
    eval_transform: Callable
    tokenizer: Callable
    model: ModelConfig


def load_clip(cfg: EvalConfig) -> LoadedClip:
    """The open_clip model of the run or checkpoint that load_path names (fresh when there is no
    load_path), with its eval image transform, tokenizer and config."""
    model, checkpoint = model_and_checkpoint(cfg)
    reproducibility.seed_all(cfg.seed)
    with _weights_loaded_after() if checkpoint else contextlib.nullcontext():
        built = build_clip(model)
    if checkpoint:
        built.clip.load_state_dict(clip_weights(checkpoint, cfg.trust))
        print(f"{model.name}: weights from {checkpoint}", file=sys.stderr)
    return LoadedClip(built.clip.eval(), built.eval_transform, built.tokenizer, model)
