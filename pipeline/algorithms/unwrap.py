"""Reach the open_clip model inside Composer's (possibly DDP/FSDP-wrapped) model."""

import torch


def composer_model_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def clip_of(model: torch.nn.Module) -> torch.nn.Module:
    return composer_model_of(model).clip
