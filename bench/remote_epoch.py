"""Shards a virtual epoch downloads from a bucket, against the shards it needs.

    python bench/remote_epoch.py [--samples 100000] [--epoch-fraction 0.04] [--epochs 3]

A real MDS store (one uid and a 1 KiB payload a sample, shards of 1 MiB: about 1,000 samples
each) is uploaded to a SeaweedFS bucket on loopback (tests/s3server.py), and read from there as a
`remote` stream with a virtual epoch of --epoch-fraction of it, as the recipes read Merged-2B (a
100M epoch is 4% of 2.5B). For each sampling and epoch: the shards the epoch's samples lie in
(needed), the shards that arrived in the local cache during it (downloaded), and the bytes
downloaded over the bytes of the samples trained on. "streaming" is streaming 0.13 itself;
"shard_passes" this project's dataset (pipeline/data/sampling.py) on the compact shard index.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from pipeline.common.tables import markdown_table  # noqa: E402

PAYLOAD = 1024
SHARD_BYTES = 1 << 20


def write_store(folder: str, samples: int) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=folder, columns={"uid": "int", "payload": "bytes"}, size_limit=SHARD_BYTES) as writer:
        for uid in range(samples):
            writer.write({"uid": uid, "payload": os.urandom(PAYLOAD)})


def read_epochs(remote: str, local: str, epoch_size: int, epochs: int, sampling: str) -> list:
    """Per epoch: (shards needed, shards downloaded, bytes downloaded / bytes trained on)."""
    from streaming import Stream, StreamingDataset

    from pipeline.data.sampling import ShardPassDataset, ShardSpanner
    from pipeline.data.shard_index import CompactStream

    if sampling == "streaming":
        dataset = StreamingDataset(streams=[Stream(remote=remote, local=local)], epoch_size=epoch_size, batch_size=64)
    else:
        stream = CompactStream(remote=remote, local=local)
        dataset = ShardPassDataset(streams=[stream], epoch_size=epoch_size, batch_size=64, sampling=sampling)
    shard_of = ShardSpanner(dataset.samples_per_shard)
    rows, cached = [], set()
    for _ in range(epochs):
        uids = [sample["uid"] for sample in dataset]
        now = {name for name in os.listdir(local) if name.startswith("shard.")}
        downloaded = now - cached
        cached = now
        size = sum(os.path.getsize(os.path.join(local, name)) for name in downloaded)
        needed = {shard_of[uid][0] for uid in uids}
        rows.append((len(needed), len(downloaded), size / (len(uids) * (PAYLOAD + 8))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--epoch-fraction", type=float, default=0.04)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    from pipeline import compat
    from tests.s3server import S3Server

    compat.apply()
    with tempfile.TemporaryDirectory() as root, S3Server(os.path.join(root, "s3")) as s3:
        os.environ.update(s3.env())
        store = os.path.join(root, "store")
        write_store(store, args.samples)
        bucket = s3.make_bucket("remote-epoch")
        for name in os.listdir(store):
            s3.client().upload_file(os.path.join(store, name), bucket, f"store/{name}")
        shards = sum(name.startswith("shard.") for name in os.listdir(store))
        epoch_size = int(args.samples * args.epoch_fraction)
        table = [
            ["sampling", "epoch", "samples", "shards needed", f"shards downloaded (of {shards})", "bytes / trained"]
        ]
        for sampling in ("streaming", "shard_passes"):
            local = os.path.join(root, "cache", sampling)
            for epoch, (needed, downloaded, ratio) in enumerate(
                read_epochs(f"s3://{bucket}/store", local, epoch_size, args.epochs, sampling)
            ):
                table.append([sampling, str(epoch), f"{epoch_size:,}", str(needed), str(downloaded), f"{ratio:.2f}x"])
    print(markdown_table(table))


if __name__ == "__main__":
    main()
