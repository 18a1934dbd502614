"""How this project's batches mix a run's streams, against a uniform permutation of every row per
epoch (open_clip_train's csv loader, a DataLoader with shuffle=True).

    python bench/batch_mix.py                                   # the sample's streams, py1e
    python bench/batch_mix.py --shuffle-algo naive --seeds 0 1 2 3 4

Only the sample order is computed (streaming's own `generate_work`, as one process of one node
builds it), no image is read. Per global batch: the distinct streams and shards it draws from,
and the first stream's share of it; the spread of that share over batches and its mean over each
eighth of an epoch show whether the shuffle leaves the streams lumped together in time.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def batch_streams(streams: list, shuffle_algo: str, seed: int, epoch: int, batch_size: int) -> tuple:
    """(stream index per sample, shard index per sample), shaped (batches, batch_size), for one epoch."""
    from streaming.base.batching import generate_work
    from streaming.base.world import World

    from pipeline.data.sampling import ShardPassDataset
    from pipeline.data.shard_index import CompactStream

    dataset = ShardPassDataset(
        streams=[CompactStream(local=local) for local in streams],
        batch_size=batch_size,
        shuffle=True,
        shuffle_algo=shuffle_algo,
        shuffle_seed=seed,
        num_canonical_nodes=1,  # what a one-node run pins
        shuffle_block_size=4_000_000,  # streaming's default for one canonical node
        sampling="streaming",
    )
    ids = generate_work(dataset.batching_method, dataset, World.detect(), epoch, 0).reshape(-1)
    ids = ids[ids >= 0]  # streaming pads the last batch with -1
    ids = ids[: len(ids) // batch_size * batch_size].reshape(-1, batch_size)
    shards = np.searchsorted(dataset.spanner.shard_bounds, ids, side="right") - 1
    return dataset.stream_per_shard[shards], shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", nargs="+", default=["data/sample/web", "data/sample/coco"])
    parser.add_argument("--shuffle-algo", default="py1e")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    shares, by_eighth, n_streams, n_shards, rows = [], [], [], [], 0
    for seed in args.seeds:
        for epoch in range(args.epochs):
            streams, shards = batch_streams(args.streams, args.shuffle_algo, seed, epoch, args.batch_size)
            rows = streams.size
            share = (streams == 0).mean(axis=1)
            shares += list(share)
            by_eighth.append([chunk.mean() for chunk in np.array_split(share, 8)])
            n_streams += [len(np.unique(b)) for b in streams]
            n_shards += [len(np.unique(b)) for b in shards]
    first_share = float(np.mean(shares))
    rng = np.random.default_rng(0)  # the same rows, permuted uniformly, in batches of the same size
    uniform = np.concatenate(
        [(rng.permutation(rows) < round(first_share * rows)).reshape(-1, args.batch_size).mean(1) for _ in range(20)]
    )
    print(f"{args.shuffle_algo}, seeds {args.seeds}, epochs 0-{args.epochs - 1}, batches of {args.batch_size}:")
    print(f"  distinct streams per batch: {np.mean(n_streams):.2f}; distinct shards per batch: {np.mean(n_shards):.2f}")
    print(
        f"  {args.streams[0]}'s share per batch: mean {first_share:.3f}, sd {np.std(shares):.3f} "
        f"(a uniform permutation: sd {np.std(uniform):.3f})"
    )
    print("  its mean share by eighth of an epoch:", " ".join(f"{v:.3f}" for v in np.mean(by_eighth, axis=0)))


if __name__ == "__main__":
    main()
