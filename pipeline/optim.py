"""Optimizer with parameter groups: no weight decay on biases, norms, embeddings, logit scale."""

from __future__ import annotations

import torch
from timm.optim import Lamb

from pipeline.config import ConfigError, OptimizerConfig


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # 1-d parameters are biases, norm scales, class embedding and the logit scale.
    return param.ndim < 2 or "embedding" in name


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.name == "lamb":
        return Lamb(groups, **kwargs)
    raise ConfigError(f"optimizer.name must be 'adamw' or 'lamb', got '{cfg.name}'")
