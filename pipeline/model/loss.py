"""The contrastive loss, a config choice (`model.loss`), and the named outputs it reads.

clip: open_clip's ClipLoss (softmax over the global batch, gathered with grad).
siglip: open_clip's SigLipLoss (a sigmoid per image-text pair, with a learnt bias; texts are
exchanged between neighbouring ranks with grad). SigLIP is what users pick when the batch is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from composer.utils import dist
from open_clip.loss import ClipLoss, SigLipLoss

from pipeline.config.schema import LossName, ModelConfig


@dataclass
class Features:
    """What the CLIP's forward gives the loss; either feature may be None for a one-tower forward."""

    image: Optional[torch.Tensor]
    text: Optional[torch.Tensor]
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor] = None  # SigLIP only
    # Set by exact accumulation: undoes Composer's per-micro-batch loss scaling (see the algorithm).
    grad_scale: float = 1.0

    @classmethod
    def from_open_clip(cls, output: dict, max_logit_scale: float) -> Features:
        """From open_clip's forward with output_dict=True; the logit scale clamped (CLIP: at 100)."""
        return cls(
            image=output["image_features"],
            text=output["text_features"],
            logit_scale=output["logit_scale"].float().clamp(max=max_logit_scale),
            logit_bias=output.get("logit_bias"),
        )


def build_loss(cfg: ModelConfig) -> torch.nn.Module:
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    if cfg.loss == LossName.siglip:
        return SigLipLoss(rank=rank, world_size=world_size)
    return ClipLoss(
        local_loss=cfg.local_loss,
        gather_with_grad=cfg.gather_with_grad,
        cache_labels=True,
        rank=rank,
        world_size=world_size,
    )


def contrastive_loss(loss_fn: torch.nn.Module, features: Features) -> torch.Tensor:
    """The loss in fp32, even under bf16 autocast."""
    with torch.autocast(features.image.device.type, enabled=False):
        args = [features.image.float(), features.text.float(), features.logit_scale.float()]
        if isinstance(loss_fn, SigLipLoss):
            args.append(features.logit_bias.float())
        return loss_fn(*args)
