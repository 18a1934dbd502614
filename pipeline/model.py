"""A ComposerModel around an open_clip CLIP, trained with open_clip's ClipLoss."""

from __future__ import annotations

import json
import math
import os
import tempfile

import open_clip
import torch
from composer.models import ComposerModel
from composer.utils import dist
from open_clip.loss import ClipLoss

from pipeline.config import ModelConfig

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the learned temperature at 100


def register_custom_model(cfg: ModelConfig) -> None:
    """Make an inline model config known to open_clip under `cfg.name` (via its JSON registry)."""
    folder = tempfile.mkdtemp(prefix="open_clip_cfg_")
    with open(os.path.join(folder, f"{cfg.name}.json"), "w") as f:
        json.dump(cfg.custom, f)
    open_clip.add_model_config(folder)


def build_clip(cfg: ModelConfig):
    """(CLIP model, train transform, eval transform, tokenizer) for an open_clip name or inline config."""
    if cfg.custom is not None:
        register_custom_model(cfg)
    elif cfg.name not in open_clip.list_models():
        raise ValueError(f"model.name '{cfg.name}' is not an open_clip model; see open_clip.list_models()")
    clip, train_transform, eval_transform = open_clip.create_model_and_transforms(cfg.name)
    # FSDP2 cannot shard 0-dim parameters.
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().reshape(1))
    return clip, train_transform, eval_transform, open_clip.get_tokenizer(cfg.name)


class CLIPModel(ComposerModel):
    """Batches are (images, token ids); the loss sees every sample of the global batch."""

    def __init__(self, clip: torch.nn.Module, cfg: ModelConfig):
        super().__init__()
        self.clip = clip
        self.loss_fn = ClipLoss(
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            cache_labels=True,
            rank=dist.get_global_rank(),
            world_size=dist.get_world_size(),
        )

    def forward(self, batch):
        images, texts = batch
        image_features = self.clip.encode_image(images, normalize=True)
        text_features = self.clip.encode_text(texts, normalize=True)
        logit_scale = self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        return image_features, text_features, logit_scale

    def loss(self, outputs, batch):
        return self.loss_fn(*outputs)
