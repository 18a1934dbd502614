"""Which samples of each stream a virtual epoch draws, at the cost of its shards, not of the store.

streaming 0.13 draws an epoch's samples one by one across every shard of a stream (so a 4% epoch
downloads every shard) and builds one pick per sample of the stream to do it; its `Spanner` holds
8 bytes per sample of the store in every rank and loader worker (mosaicml/streaming#792, #771;
PR #773 unmerged). Here:

- `shard_passes`: each stream is read in passes, each pass its shards in a seeded permutation (the
  samples of a shard in order); virtual epoch e takes the next `choose` samples of that endless
  sequence, so an epoch is whole shards plus at most a partial one at each end, the next epoch
  continues where it stopped, and every sample is drawn once per pass before any is drawn twice.
  The shuffle (streaming's, shuffle blocks across the epoch's shards) then mixes them as before.
- `ShardSpanner`: the global sample index -> (shard, index in shard) from the shard offsets alone.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from numpy.typing import NDArray
from streaming import StreamingDataset

from pipeline.compat.streaming_spanner import spanner_class
from pipeline.config.schema import Sampling


class ShardSpanner:
    """streaming's Spanner from the shard offsets (a cumsum and a binary search): O(shards) memory."""

    def __init__(self, shard_sizes: NDArray[np.int64]):
        self.shard_bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(shard_sizes, dtype=np.int64)])
        self.num_samples = int(self.shard_bounds[-1])

    def __getitem__(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"Invalid sample index `{index}`: 0 <= {index} < {self.num_samples}")
        shard = int(np.searchsorted(self.shard_bounds, index, side="right")) - 1  # skips empty shards
        return shard, int(index - self.shard_bounds[shard])


def shard_passes(
    samples_per_shard: NDArray[np.int64], choose: int, epoch: int, seed: int, stream: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(samples taken from each piece of shard, in order; their sample indices within the stream) of
    virtual epoch `epoch`: samples [epoch * choose, (epoch + 1) * choose) of the stream's passes."""
    bounds = np.concatenate([np.zeros(1, np.int64), np.cumsum(samples_per_shard, dtype=np.int64)])
    per_pass = int(bounds[-1])
    begin, end = epoch * choose, (epoch + 1) * choose
    units, firsts = [], []
    for pass_id in range(begin // per_pass, (end - 1) // per_pass + 1 if choose else 0):
        order = np.random.default_rng([seed, stream, pass_id]).permutation(len(samples_per_shard))
        sizes = samples_per_shard[order]
        starts = np.cumsum(sizes, dtype=np.int64) - sizes  # where each shard starts in the pass
        low, high = max(begin - pass_id * per_pass, 0), min(end - pass_id * per_pass, per_pass)
        take_from = np.clip(low - starts, 0, sizes)
        take_to = np.clip(high - starts, 0, sizes)
        taken = take_to > take_from
        units.append((take_to - take_from)[taken])
        firsts.append(bounds[order[taken]] + take_from[taken])
    units = np.concatenate(units) if units else np.zeros(0, np.int64)
    firsts = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    # Each piece's sample indices: its first, then one by one.
    piece_starts = np.cumsum(units) - units
    sample_ids = np.repeat(firsts - piece_starts, units) + np.arange(int(units.sum()), dtype=np.int64)
    return units.astype(np.int64), sample_ids


class ShardPassDataset(StreamingDataset):
    """streaming's StreamingDataset with a ShardSpanner and, with `sampling="shard_passes"`, each
    stream's share of a virtual epoch drawn by `shard_passes` ("streaming": streaming's own draw)."""

    def __init__(self, *, sampling: str = "streaming", **kwargs):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        self.sampling = sampling
        with spanner_class(ShardSpanner):
            super().__init__(**kwargs)

    def resample_streams(self, epoch: int, stream_id: Optional[int] = None) -> tuple:
        """(shuffle units, sample ids) of the epoch, as streaming's, which shuffles them."""
        if self.sampling == "streaming":
            return super().resample_streams(epoch, stream_id)
        units, sample_ids = [], []
        for stream in range(self.num_streams) if stream_id is None else [stream_id]:
            first = self.shard_offset_per_stream[stream]
            sizes = self.samples_per_shard[first : first + self.shards_per_stream[stream]]
            stream_units, ids = shard_passes(sizes, int(self.streams[stream].choose), epoch, self.shuffle_seed, stream)
            units.append(stream_units)
            sample_ids.append(ids + self.sample_offset_per_stream[stream])
        return np.concatenate(units), np.concatenate(sample_ids)


SAMPLINGS = tuple(sampling.value for sampling in Sampling)  # data.sampling's values
