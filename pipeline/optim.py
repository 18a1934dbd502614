"""Optimizer parameter groups: per-tower lr / weight decay, layer-wise lr decay, no-decay sets.

Biases, norms, embedding tables and the logit scale get no weight decay. With layer decay d, a
parameter at depth i of a tower with n blocks gets lr * d ** (n + 1 - i): embeddings are depth 0,
block k is depth k + 1, the final norm / projection is depth n + 1 (EVA-CLIP, BEiT). Depths and
towers come from `pipeline.towers.layer_ids`.
"""

from __future__ import annotations

import torch
from timm.optim import Lamb

from pipeline.config import OptimizerConfig, OptimizerName
from pipeline.towers import layer_ids


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list:
    """One group per (tower, depth, weight decay) of a CLIPModel's trainable parameters."""
    ids = layer_ids(model.clip)
    groups: dict = {}
    for name, param in model.clip.named_parameters():
        if not param.requires_grad:
            continue
        layer = ids[name]
        tower_cfg = getattr(cfg, layer.tower, None)  # None: the logit scale follows optimizer.*
        lr = cfg.lr if tower_cfg is None or tower_cfg.lr is None else tower_cfg.lr
        wd = cfg.weight_decay if tower_cfg is None or tower_cfg.weight_decay is None else tower_cfg.weight_decay
        if tower_cfg is not None:
            lr *= tower_cfg.layer_decay ** (layer.num_blocks + 1 - layer.depth)
        if not layer.decays:
            wd = 0.0
        key = (layer.tower, layer.depth, wd)
        group = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": f"{layer.tower}.{layer.depth}"})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == OptimizerName.lamb:
        return Lamb(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
