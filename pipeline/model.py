"""A ComposerModel around an open_clip CLIP, trained with open_clip's ClipLoss."""

from __future__ import annotations

import json
import os
import tempfile

import open_clip
import torch
from composer.models import ComposerModel
from composer.utils import dist
from open_clip.loss import ClipLoss
from open_clip.transformer import ResidualAttentionBlock

from pipeline.config import ModelConfig
from pipeline.zeroshot import encode_eval_batch

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale), the inverse temperature, at 100


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
    clip, train_transform, eval_transform = open_clip.create_model_and_transforms(
        cfg.name, force_context_length=cfg.context_length
    )
    clip.output_dict = False  # forward returns (image features, text features, logit scale.exp())
    # FSDP2 cannot shard 0-dim parameters.
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().reshape(1))
    return clip, train_transform, eval_transform, open_clip.get_tokenizer(cfg.name, cfg.context_length)


def _blocks_and_width(tower: torch.nn.Module):
    """(transformer blocks, width) of an open_clip or timm tower."""
    if hasattr(tower, "trunk"):  # timm vision tower
        return tower.trunk.blocks, tower.trunk.embed_dim
    transformer = getattr(tower, "transformer", tower)
    return transformer.resblocks, transformer.width


def _forward_flops(tower: torch.nn.Module, tokens: int) -> float:
    """2 FLOPs per weight per token through the blocks, plus the attention products."""
    blocks, width = _blocks_and_width(tower)
    weights = sum(p.numel() for p in blocks.parameters() if p.ndim > 1)
    return 2 * weights * tokens + 4 * len(blocks) * tokens**2 * width


def kept_image_tokens(visual: torch.nn.Module) -> int:
    """Class token + the patches that survive patch masking (FLIP) in training."""
    if hasattr(visual, "trunk"):
        patches, dropout = visual.trunk.patch_embed.num_patches, visual.trunk.patch_drop
    else:
        patches, dropout = visual.grid_size[0] * visual.grid_size[1], visual.patch_dropout
    ratio = getattr(dropout, "prob", 0.0) if visual.training else 0.0
    return 1 + (max(1, int(patches * (1 - ratio))) if ratio > 0 else patches)


def shard_transformer_blocks(module: torch.nn.Module) -> bool:
    """FSDP shards each transformer block of either tower as its own unit."""
    return isinstance(module, ResidualAttentionBlock) or type(module).__name__ in ("Block", "EvaBlock")


class CLIPModel(ComposerModel):
    """Batches are (images, token ids); the loss sees every sample of the global batch.

    Eval batches are dicts from `pipeline.eval.build_evaluators`, scored by its `eval_metrics`.
    """

    def __init__(self, clip: torch.nn.Module, cfg: ModelConfig, eval_metrics: dict | None = None):
        super().__init__()
        self.clip = clip
        # Composer's FSDP asks each child of the ComposerModel which of its modules to shard.
        clip.fsdp_wrap_fn = shard_transformer_blocks
        self.eval_metrics = eval_metrics or {}
        self.loss_fn = ClipLoss(
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            cache_labels=True,
            rank=dist.get_global_rank(),
            world_size=dist.get_world_size(),
        )
        # Set by ContrastiveAccumulation while a batch runs as several micro-batches.
        self.feature_cache = None

    def encode(self, images, texts):
        """(image features, text features, logit scale); either input may be None.

        Through open_clip's own forward, whose hooks FSDP uses to gather the parameters.
        """
        image_features, text_features, logit_scale = self.clip(images, texts)[:3]
        return image_features, text_features, logit_scale.float().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, batch):
        images, texts = batch
        if self.feature_cache is None or not self.training:
            return (*self.encode(images, texts), 1.0)
        chunk = self.feature_cache.start_chunk()  # before encoding: it replays the chunk's RNG
        image_features, text_features, logit_scale = self.encode(images, texts)
        image_features, text_features, grad_scale = self.feature_cache.splice(chunk, image_features, text_features)
        # The logit scale's gradient is counted once, in the last micro-batch: the one whose
        # backward DDP synchronises, which must give every parameter a gradient.
        last = chunk == len(self.feature_cache.features) - 1
        return image_features, text_features, logit_scale if last else logit_scale.detach(), grad_scale

    def flops_per_batch(self, batch) -> float:
        """Training FLOPs of this rank's batch (backward = 2x forward), for SpeedMonitor's MFU."""
        images, texts = batch
        text_tower = self.clip.text if hasattr(self.clip, "text") else self.clip
        per_sample = _forward_flops(self.clip.visual, kept_image_tokens(self.clip.visual))
        per_sample += _forward_flops(text_tower, texts.shape[1])
        return 3 * per_sample * len(images)

    def loss(self, outputs, batch):
        image_features, text_features, logit_scale, grad_scale = outputs
        # The loss is taken in fp32 even under bf16 autocast.
        with torch.autocast(image_features.device.type, enabled=False):
            loss = self.loss_fn(image_features.float(), text_features.float(), logit_scale.float())
        if grad_scale == 1.0:
            return loss
        return loss.detach() + (loss - loss.detach()) * grad_scale

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def eval_forward(self, batch, outputs=None):
        return encode_eval_batch(self.clip, batch)

    def update_metric(self, batch, outputs, metric) -> None:
        metric.update(self.clip, batch, outputs)  # zero-shot classification builds its classifier with the model
