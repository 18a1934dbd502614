"""A ComposerModel around an open_clip CLIP, trained with the configured contrastive loss."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import open_clip
import torch
from composer.models import ComposerModel

from pipeline.config.schema import LossName, ModelConfig
from pipeline.model.loss import Features, build_loss, contrastive_loss
from pipeline.model.sample_noise import samples
from pipeline.model.towers import forward_flops, fsdp_unit, kept_image_tokens, towers

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale), the inverse temperature, at 100
# SigLIP's initialisation (Zhai et al. 2023): logit scale 10, logit bias -10.
SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


def register_custom_model(cfg: ModelConfig) -> None:
    """Make an inline model config known to open_clip under `cfg.name` (via its JSON registry)."""
    folder = tempfile.mkdtemp(prefix="open_clip_cfg_")
    with open(os.path.join(folder, f"{cfg.name}.json"), "w") as f:
        json.dump(cfg.custom, f)
    open_clip.add_model_config(folder)


def loss_init(cfg: ModelConfig) -> dict:
    """open_clip's init_logit_scale / init_logit_bias for the chosen loss (SigLIP needs a bias)."""
    init = dict(SIGLIP_INIT) if cfg.loss == LossName.siglip else {}
    if cfg.init_logit_scale is not None:
        init["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        init["init_logit_bias"] = cfg.init_logit_bias
    return init


def training_flops(clip: torch.nn.Module, pairs: int, text_tokens: int) -> float:
    """Training FLOPs of `pairs` image-text pairs (backward = 2x forward), the image patches patch masking
    drops not counted: what the FLOPs callback logs and an equal-FLOPs sweep budgets."""
    vision, text = towers(clip)
    return 3 * pairs * (forward_flops(vision, kept_image_tokens(clip)) + forward_flops(text, text_tokens))


class BuiltClip(NamedTuple):
    clip: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable


def build_clip(cfg: ModelConfig) -> BuiltClip:
    """The CLIP model, its transforms and tokenizer, for an open_clip name or inline config."""
    if cfg.custom is not None:
        register_custom_model(cfg)
    elif cfg.name not in open_clip.list_models():
        raise ValueError(f"model.name '{cfg.name}' is not an open_clip model; see open_clip.list_models()")
    clip, train_transform, eval_transform = open_clip.create_model_and_transforms(
        cfg.name, force_context_length=cfg.context_length, output_dict=True, **loss_init(cfg)
    )
    # FSDP2 cannot shard 0-dim parameters.
    for name in ("logit_scale", "logit_bias"):
        if getattr(clip, name, None) is not None:
            setattr(clip, name, torch.nn.Parameter(getattr(clip, name).detach().reshape(1)))
    return BuiltClip(clip, train_transform, eval_transform, open_clip.get_tokenizer(cfg.name, cfg.context_length))


def lock_towers(clip: torch.nn.Module, cfg: ModelConfig) -> None:
    """Freeze towers as open_clip's --lock-image / --lock-text do (LiT); the optimizer skips them."""
    if cfg.lock_image is not None:
        clip.lock_image_tower(cfg.lock_image.unlocked_groups, cfg.lock_image.freeze_norm_stats)
    if cfg.lock_text is not None:
        clip.lock_text_tower(cfg.lock_text.unlocked_groups)


def encode(clip: torch.nn.Module, images, texts, sample_ids=None) -> Features:
    """Features of either input (None skips a tower), through open_clip's own forward, whose hooks
    FSDP uses to gather the parameters. Masking in training draws its noise from `sample_ids`."""
    with samples(sample_ids):
        return Features.from_open_clip(clip(images, texts), MAX_LOGIT_SCALE)


# CLIPModel holds the open_clip model as its `clip` attribute: the open_clip weights' keys in a
# Composer checkpoint start with this.
WEIGHTS_PREFIX = "clip."


class CLIPModel(ComposerModel):
    """Batches are (images, token ids, sample ids); the loss sees every sample of the global batch,
    and the masks' noise comes from the sample ids (pipeline/model/sample_noise.py).

    Eval batches are dicts from `pipeline.evaluation.evaluators.build_evaluators`, scored by its `eval_metrics`.
    """

    def __init__(self, clip: torch.nn.Module, cfg: ModelConfig, eval_metrics: dict | None = None):
        super().__init__()
        self.clip = clip
        # Composer's FSDP asks each child of the ComposerModel which of its modules to shard.
        clip.fsdp_wrap_fn = fsdp_unit
        self.eval_metrics = eval_metrics or {}
        self.loss_fn = build_loss(cfg)
        # Set by ContrastiveAccumulation while a batch runs as several micro-batches.
        self.feature_cache = None
        # The whole batch's loss (each exact micro-batch computes it too), for the loss guard.
        self.last_batch_loss = None

    def forward(self, batch) -> Features:
        images, texts, sample_ids = batch
        if self.feature_cache is None or not self.training:
            return encode(self.clip, images, texts, sample_ids)
        chunk = self.feature_cache.start_chunk()  # before encoding: it replays the chunk's RNG
        features = encode(self.clip, images, texts, sample_ids)
        spliced = self.feature_cache.splice(chunk, features)
        # The logit scale's (and bias's) gradient is counted once, in the last micro-batch: the
        # one whose backward DDP synchronises, which must give every parameter a gradient.
        if chunk != len(self.feature_cache.features) - 1:
            spliced.logit_scale = spliced.logit_scale.detach()
            spliced.logit_bias = None if spliced.logit_bias is None else spliced.logit_bias.detach()
        return spliced

    def flops_per_batch(self, batch) -> float:
        """Training FLOPs of this rank's batch, for SpeedMonitor's MFU."""
        images, texts, _ = batch
        return training_flops(self.clip, len(images), texts.shape[1])

    def loss(self, outputs: Features, batch):
        loss = contrastive_loss(self.loss_fn, outputs)
        self.last_batch_loss = loss.detach()
        if outputs.grad_scale == 1.0:
            return loss
        return loss.detach() + (loss - loss.detach()) * outputs.grad_scale

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def eval_forward(self, batch, outputs=None) -> Features:
        return encode(self.clip, batch["images"], batch.get("texts"))

    def update_metric(self, batch, outputs, metric) -> None:
        metric.update(self.clip, batch, outputs)  # zero-shot classification builds its classifier with the model
