"""MDS streams -> (image tensor, token ids, sample ids) batches: StreamingDataset over weighted Streams."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import Optional

import torch
from composer.core import DataSpec
from streaming import StreamingDataLoader
from streaming.base.hashing import get_hash

from pipeline.config.schema import AugmentOn, ConfigError, DataConfig, Device
from pipeline.data.augment import Augment, collate_device_parts
from pipeline.data.sampling import ShardPassDataset
from pipeline.data.shard_index import CompactStream

log = logging.getLogger(__name__)


class CorruptShardError(RuntimeError):
    """A shard whose bytes no longer match the hash written when it was built."""


class CLIPStreamingDataset(ShardPassDataset):
    """Augments each sample's image (pipeline/data/augment.py) and tokenizes one of its captions.

    Every shard is checked against its build-time hash the first time this process reads it. A
    sample that still cannot be decoded is replaced by the next one (the same one on every run, so
    resumption stays exact), logged and counted.
    """

    def __init__(
        self,
        *,
        augment: Callable,
        tokenizer: Callable,
        stream_names: Sequence[str] = (),
        validate_hash: Optional[str] = "xxh64",
        max_bad_samples: int = 100,
        captions: Optional[dict] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.captions = dict(captions or {})  # data.captions: {column: probability}
        self.augment = augment  # (image bytes, the sample's random.Random) -> image (pipeline/data/augment.py)
        self.tokenizer = tokenizer
        self.stream_names = list(stream_names) or [s.remote or s.local for s in self.streams]
        self.validate_hash = validate_hash
        self.max_bad_samples = max_bad_samples
        self.bad_samples = 0  # in this process
        self._checked_shards: set = set()

    def __getitem__(self, index: int):
        shard_id = int(self.spanner[index][0])
        try:
            sample = super().__getitem__(index)
        except Exception as err:  # noqa: BLE001 - a shard that cannot be parsed
            self._check_shard(shard_id)
            return self._replace(index, shard_id, err)
        self._check_shard(shard_id)
        # Augmentation and the caption choice are functions of (seed, epoch, sample), not of
        # worker RNG history or rank, so a resumed run sees exactly what an uninterrupted one would.
        rng = random.Random(hash((self.shuffle_seed, self.next_epoch, index)))
        # The sample's id, unique across epochs: the masks' noise is drawn from it (pipeline/model/sample_noise.py).
        sample_id = self.next_epoch * self.num_samples + index
        caption = choose_caption(sample, self.captions, rng)
        try:
            image = self.augment(sample["image"], rng)
        except Exception as err:  # noqa: BLE001 - any decoder error
            return self._replace(index, shard_id, err)
        return image, self.tokenizer(caption)[0], sample_id

    def _shard_file(self, shard_id: int) -> tuple:
        shard = self.shards[shard_id]
        raw = shard.file_pairs[0][0]
        return os.path.join(shard.dirname, shard.split, raw.basename), raw.hashes

    def _stream_name(self, shard_id: int) -> str:
        return self.stream_names[int(self.stream_per_shard[shard_id])]

    def _check_shard(self, shard_id: int) -> None:
        if self.validate_hash is None or shard_id in self._checked_shards:
            return
        path, hashes = self._shard_file(shard_id)
        if self.validate_hash not in hashes:  # built by another tool: say so once per shard, read on
            log.warning(
                "stream '%s': shard %s has no %s hash in its index (it has: %s), so it is not checked; "
                "rebuild it with `make shards` to get one",
                self._stream_name(shard_id),
                path,
                self.validate_hash,
                sorted(hashes) or "none",
            )
            self._checked_shards.add(shard_id)
            return
        with open(path, "rb") as f:
            found = get_hash(self.validate_hash, f.read())
        if found != hashes[self.validate_hash]:
            raise CorruptShardError(
                f"stream '{self._stream_name(shard_id)}': shard {path} is corrupt ({self.validate_hash} "
                f"{found}, built as {hashes[self.validate_hash]}). If it is a cached copy of a remote stream, "
                "delete it and it is downloaded again; otherwise rebuild the stream (make shards) or upload it again."
            )
        self._checked_shards.add(shard_id)

    def _replace(self, index: int, shard_id: int, err: Exception):
        self.bad_samples += 1
        path, _ = self._shard_file(shard_id)
        message = f"stream '{self._stream_name(shard_id)}': sample {index} in {path} cannot be decoded ({err!r})"
        if self.bad_samples > self.max_bad_samples:
            raise RuntimeError(
                f"{message}; {self.bad_samples} bad samples in this loader process, more than "
                "data.max_bad_samples: stopping. Rebuild the stream or raise the limit."
            )
        log.warning("%s: replaced by the next sample (%d bad so far)", message, self.bad_samples)
        return self[(index + 1) % self.num_samples]


def choose_caption(sample: dict, captions: dict, rng: random.Random) -> str:
    """The caption a sample trains on this epoch (data.captions); `rng` is the sample's own."""
    if not captions:
        return rng.choice(sample.get("captions") or [sample["caption"]])  # COCO-style streams keep all
    present = {column: p for column, p in captions.items() if sample.get(column)}
    if not present:
        return sample["caption"]
    chosen = sample[rng.choices(list(present), weights=list(present.values()))[0]]
    return rng.choice(chosen) if isinstance(chosen, list) else chosen


def per_rank_batch_size(global_batch_size: int, world_size: int) -> int:
    if global_batch_size % world_size:
        raise ConfigError(f"data.global_batch_size={global_batch_size} is not divisible by the world size {world_size}")
    return global_batch_size // world_size


def build_dataloader(
    cfg: DataConfig, augment: Augment, tokenizer: Callable, world_size: int, seed: int, device: Device = Device.cpu
) -> DataSpec:
    """The run's training data: with `data.augment_on: device`, the workers' parts of each batch
    are finished on `device` (Composer's batch_transforms, before the batch is split)."""
    if not cfg.streams:
        raise ConfigError("data.streams is empty: name at least one MDS stream (local: and/or remote:)")
    streams = [  # each stream's shard index held once per node (pipeline/data/shard_index.py)
        CompactStream(
            remote=s.remote,
            local=s.local,
            proportion=s.proportion,
            download_timeout=cfg.download_timeout,
            download_retry=cfg.download_retry,
        )
        for s in cfg.streams.values()
    ]
    batch_size = per_rank_batch_size(cfg.global_batch_size, world_size)
    on_device = cfg.augment_on == AugmentOn.device
    dataset = CLIPStreamingDataset(
        streams=streams,
        batch_size=batch_size,
        shuffle=cfg.shuffle,
        shuffle_seed=seed,
        epoch_size=cfg.epoch_size,
        sampling=cfg.sampling.value,
        num_canonical_nodes=cfg.num_canonical_nodes,
        shuffle_algo=cfg.shuffle_algo,
        shuffle_block_size=cfg.shuffle_block_size,
        predownload=cfg.predownload,
        cache_limit=cfg.cache_limit,
        augment=partial(augment.worker_part, decode_on_device=cfg.decode_on_device) if on_device else augment.on_cpu,
        tokenizer=tokenizer,
        stream_names=list(cfg.streams),
        validate_hash=cfg.validate_hash,
        max_bad_samples=cfg.max_bad_samples,
        captions=cfg.captions,
    )
    loader = StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,  # every step sees the full contrastive batch
        persistent_workers=cfg.num_workers > 0,
        **({"collate_fn": collate_device_parts} if on_device else {}),
    )
    return DataSpec(loader, batch_transforms=FinishOnDevice(augment, device) if on_device else None)


class FinishOnDevice:
    """Composer batch transform of `augment_on: device`:
    ((payloads, boxes, flips), tokens, ids) -> (images, tokens, ids)."""

    def __init__(self, augment: Augment, device: Device):
        self.augment, self.device = augment, device

    def __call__(self, batch: tuple) -> tuple:
        (payloads, boxes, flips), tokens, sample_ids = batch
        device = torch.device("cuda", torch.cuda.current_device()) if self.device == Device.gpu else torch.device("cpu")
        return self.augment.on_device(payloads, boxes, flips, device), tokens, sample_ids
