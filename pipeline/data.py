"""MDS streams -> (image tensor, token ids) batches: StreamingDataset over weighted Streams."""

from __future__ import annotations

from typing import Callable

import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset

from pipeline.config import ConfigError, DataConfig
from pipeline.images import decode_rgb


class CLIPStreamingDataset(StreamingDataset):
    """Decodes each sample's image to RGB, applies the image transform and tokenizes the caption."""

    def __init__(self, *, image_transform: Callable, tokenizer: Callable, **kwargs):
        super().__init__(**kwargs)
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    def __getitem__(self, index: int):
        sample = super().__getitem__(index)
        # Augmentation noise is a function of (seed, epoch, sample), not of worker RNG history,
        # so a resumed run sees exactly the crops an uninterrupted one would.
        torch.manual_seed(hash((self.shuffle_seed, self.next_epoch, index)) & (2**63 - 1))
        return decode_rgb(sample["image"], self.image_transform), self.tokenizer(sample["caption"])[0]


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    if global_batch_size % world_size:
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} is not divisible by the world size {world_size}"
        )
    return global_batch_size // world_size


def build_dataloader(
    cfg: DataConfig, image_transform: Callable, tokenizer: Callable, world_size: int, seed: int
) -> StreamingDataLoader:
    if not cfg.streams:
        raise ConfigError("data.streams is empty: name at least one MDS stream (local: and/or remote:)")
    streams = [
        Stream(remote=s.remote, local=s.local, proportion=s.proportion,
               download_timeout=cfg.download_timeout, download_retry=cfg.download_retry)
        for s in cfg.streams.values()
    ]
    batch_size = per_rank_batch_size(cfg.global_batch_size, world_size)
    dataset = CLIPStreamingDataset(
        streams=streams,
        batch_size=batch_size,
        shuffle=cfg.shuffle,
        shuffle_seed=seed,
        epoch_size=cfg.epoch_size,
        predownload=cfg.predownload,
        cache_limit=cfg.cache_limit,
        image_transform=image_transform,
        tokenizer=tokenizer,
    )
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,  # every step sees the full contrastive batch
        persistent_workers=cfg.num_workers > 0,
    )
