"""Optimizer parameter groups: per-tower lr / weight decay, layer-wise lr decay, no-decay sets.

The peak lr is optimizer.lr, or optimizer.lr_per_256 * global batch / 256 (FLIP's rule), and
each tower (and the logit scale) may have its own. Frozen parameters (a locked tower) are left
out, so they get no optimizer state. Biases, norms, embedding tables and the logit scale get no
weight decay. With layer decay d, a
parameter at depth i of a tower with n blocks gets lr * d ** (n + 1 - i): embeddings are depth 0,
block k is depth k + 1, the final norm / projection is depth n + 1 (EVA-CLIP, BEiT). Depths and
towers come from `pipeline.model.towers.layer_ids`.
"""

from __future__ import annotations

import torch
from composer.utils import dist
from timm.optim import Lamb

from pipeline.common.tables import align_columns
from pipeline.config.schema import OptimizerConfig, OptimizerName
from pipeline.model.towers import layer_ids


def peak_lr(cfg: OptimizerConfig, global_batch_size: int) -> float:
    return cfg.lr if cfg.lr is not None else cfg.lr_per_256 * global_batch_size / 256


def param_groups(model: torch.nn.Module, cfg: OptimizerConfig, global_batch_size: int = 256) -> list:
    """One group per (tower, depth, weight decay) of a CLIPModel's trainable parameters."""
    base_lr = peak_lr(cfg, global_batch_size)
    ids = layer_ids(model.clip)
    groups: dict = {}
    for name, param in model.clip.named_parameters():
        if not param.requires_grad:
            continue
        layer = ids[name]
        tower_cfg = getattr(cfg, layer.tower)  # visual, text or logit_scale
        lr = base_lr if tower_cfg.lr is None else tower_cfg.lr
        wd = cfg.weight_decay if tower_cfg.weight_decay is None else tower_cfg.weight_decay
        lr *= tower_cfg.layer_decay ** (layer.num_blocks + 1 - layer.depth)  # logit scale: depth 1 of 0 blocks
        if not layer.decays:
            wd = 0.0
        key = (layer.tower, layer.depth, wd)
        group = groups.setdefault(
            key, {"params": [], "lr": lr, "weight_decay": wd, "name": f"{layer.tower}.{layer.depth}"}
        )
        group["params"].append(param)
    return list(groups.values())


def describe(groups: list) -> str:
    """The effective lr and weight decays per tower depth, printed when training starts."""
    depths: dict = {}
    for g in groups:
        row = depths.setdefault(g["name"], {"params": 0, "lr": g["lr"], "wd": []})
        row["params"] += len(g["params"])
        row["wd"].append(f"{g['weight_decay']:g}")
    order = sorted(depths, key=lambda name: (name.rsplit(".", 1)[0], int(name.rsplit(".", 1)[1])))
    rows = [
        [name, str(depths[name]["params"]), f"{depths[name]['lr']:.4g}", " / ".join(sorted(depths[name]["wd"]))]
        for name in order
    ]
    return align_columns([["tower.depth", "tensors", "lr", "weight_decay"], *rows])


def build_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, global_batch_size: int = 256
) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, global_batch_size)
    if dist.get_global_rank() == 0:
        print(f"Optimizer {cfg.name.value}, peak lr per group:\n{describe(groups)}", flush=True)
    kwargs = dict(lr=peak_lr(cfg, global_batch_size), betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == OptimizerName.lamb:
        lamb = cfg.lamb
        return Lamb(
            groups,
            **kwargs,
            max_grad_norm=lamb.max_grad_norm,
            trust_clip=lamb.trust_clip,
            always_adapt=lamb.always_adapt,
        )
    # The fused update: one kernel per tensor instead of a loop of small ops (the fast path on
    # GPUs; on the 2-core CPU it measured within noise of the loop, bench/RESULTS.md).
    return torch.optim.AdamW(groups, **kwargs, fused=True)
