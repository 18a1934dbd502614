"""Optimizer parameter groups: per-tower lr / weight decay, layer-wise lr decay, no-decay sets.

Biases, norms, embeddings and the logit scale get no weight decay. With layer decay d, a
parameter at depth i of a tower with n blocks gets lr * d ** (n + 1 - i): embeddings are
depth 0, block k is depth k + 1, the final norm / projection is depth n + 1 (EVA-CLIP, BEiT).
"""

from __future__ import annotations

import re

import torch
from timm.optim import Lamb

from pipeline.config import ConfigError, OptimizerConfig

BLOCK = re.compile(r"\.(?:resblocks|blocks)\.(\d+)\.")
EMBEDDING = re.compile(r"embed|conv1|class_embedding|cls_token|ln_pre")  # depth 0
NO_DECAY_EMBEDDING = re.compile(r"positional_embedding|class_embedding|token_embedding|pos_embed|cls_token")


def tower_of(name: str) -> str:
    if name.startswith("visual."):
        return "visual"
    return "logit_scale" if "logit_scale" in name or "logit_bias" in name else "text"


def depth_of(name: str, num_blocks: int) -> int:
    block = BLOCK.search(name)
    if block:
        return int(block.group(1)) + 1
    return 0 if EMBEDDING.search(name) else num_blocks + 1


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    # 1-d parameters are biases, norm scales and the logit scale; patch embeddings do decay.
    return param.ndim < 2 or bool(NO_DECAY_EMBEDDING.search(name))


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig) -> list:
    named = [(n.removeprefix("clip."), p) for n, p in model.named_parameters() if p.requires_grad]
    num_blocks = {"visual": 0, "text": 0, "logit_scale": 0}
    for name, _ in named:
        block = BLOCK.search(name)
        if block:
            tower = tower_of(name)
            num_blocks[tower] = max(num_blocks[tower], int(block.group(1)) + 1)
    groups: dict = {}
    for name, param in named:
        tower = tower_of(name)
        tower_cfg = getattr(cfg, tower, None)
        lr = cfg.lr if tower_cfg is None or tower_cfg.lr is None else tower_cfg.lr
        wd = cfg.weight_decay if tower_cfg is None or tower_cfg.weight_decay is None else tower_cfg.weight_decay
        depth = depth_of(name, num_blocks[tower])
        if tower_cfg is not None:
            lr *= tower_cfg.layer_decay ** (num_blocks[tower] + 1 - depth)
        if no_weight_decay(name, param):
            wd = 0.0
        key = (tower, depth, wd)
        group = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": f"{tower}.{depth}"})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.name == "lamb":
        return Lamb(groups, **kwargs)
    raise ConfigError(f"optimizer.name must be 'adamw' or 'lamb', got '{cfg.name}'")
