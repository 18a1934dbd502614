"""StreamingDataset at Merged-2B scale, on synthetic index files (no images needed).

    python bench/streaming_scale.py                          # 10M, 100M, 1B samples; full and virtual epochs
    python bench/streaming_scale.py --samples 1e9 2.5e9 --epoch-sizes 100e6 --resume   # before / after
    python bench/streaming_scale.py --samples 10e6 --epoch-sizes 0 --samples-per-shard 3200

Two streams mixed 80/20 (LAION-2B / COYO-700M as in the recipes) are described by MDS index.json
files (and sparse shard files: no disk used) with the recipes' shard size: `make shards` writes
MDSWriter's default 64 MiB shards, about 3,200 samples of ~20 KiB (a 256 px JPEG and its caption).
Each measurement is a fresh process, as one node's local rank 0 is: it builds the dataset
(start-up: reading the indexes, the spanner), then draws the first batch (time to first batch:
streaming resamples the streams and partitions and shuffles the whole epoch's sample ids into
shared memory). The dataset's __getitem__ returns
the sample id, so no shard is read: what is timed is streaming's own bookkeeping. Memory is the
process's peak RSS (which counts the shared pages it touched) and the peak of what streaming
put in /dev/shm (sampled every 50 ms; per node: the other ranks of the node
map the same shared memory). Prints a markdown table and the extrapolation to 2.5B samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX = {"laion2b": 0.8, "coyo700m": 0.2}
SHARD_BYTES = 1 << 26  # MDSWriter's default size_limit, which `make shards` keeps


def write_index(folder: str, samples: int, samples_per_shard: int) -> None:
    """An MDS index.json for `samples` samples in shards of `samples_per_shard`, and each shard as a
    sparse file of the shard's size (no disk used): streaming counts them as already local."""
    os.makedirs(folder, exist_ok=True)
    shards, left = [], samples
    while left > 0:
        count = min(samples_per_shard, left)
        name = f"shard.{len(shards):07d}.mds"
        shards.append(
            {
                "column_encodings": ["jpeg", "str"],
                "column_names": ["image", "caption"],
                "column_sizes": [None, None],
                "compression": None,
                "format": "mds",
                "hashes": [],
                "raw_data": {"basename": name, "bytes": SHARD_BYTES, "hashes": {}},
                "samples": count,
                "size_limit": SHARD_BYTES,
                "version": 2,
                "zip_data": None,
            }
        )
        left -= count
        with open(os.path.join(folder, name), "wb") as f:
            f.truncate(SHARD_BYTES)
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"shards": shards, "version": 2}, f)


def shm_bytes() -> int:
    return sum(
        os.path.getsize(os.path.join("/dev/shm", n))
        for n in os.listdir("/dev/shm")
        if os.path.isfile(os.path.join("/dev/shm", n))
    )


def measure(root: str, epoch_size: int, batch_size: int, num_canonical_nodes: int, sampling: str, resume: bool) -> dict:
    """Run in a fresh process: start-up, time to first batch (of epoch 0, or with `resume` of the
    middle of epoch 3, as a resumed run asks for it), peak RSS and shared memory."""
    from streaming import Stream, StreamingDataset

    from pipeline.sampling import ShardPassDataset

    # "streaming": streaming 0.13 itself (its Spanner and draw), the baseline.
    base = StreamingDataset if sampling == "streaming" else ShardPassDataset

    class SampleIds(base):
        def __getitem__(self, index: int) -> int:
            return index

    shm_before, shm_peak, done = shm_bytes(), [0], threading.Event()
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # torch and streaming, loaded

    def sample_shm() -> None:  # streaming's shared memory can be short-lived: keep its peak
        while not done.wait(0.05):
            shm_peak[0] = max(shm_peak[0], shm_bytes() - shm_before)

    threading.Thread(target=sample_shm, daemon=True).start()
    start = time.perf_counter()
    streams = [Stream(local=os.path.join(root, name), proportion=p) for name, p in MIX.items()]
    dataset = SampleIds(
        streams=streams,
        batch_size=batch_size,
        shuffle=True,
        shuffle_algo="py1e",
        shuffle_seed=17,
        num_canonical_nodes=num_canonical_nodes,
        epoch_size=epoch_size or None,
        **({} if base is StreamingDataset else {"sampling": sampling}),
    )
    startup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # what every rank holds
    if resume:
        dataset.load_state_dict(
            {
                "epoch": 3,
                "sample_in_epoch": dataset.epoch_size // 2,
                "num_canonical_nodes": num_canonical_nodes,
                "shuffle_seed": 17,
                "initial_physical_nodes": None,
            }
        )
    started = time.perf_counter()
    first = [sample for _, sample in zip(range(batch_size), iter(dataset))]
    first_batch = time.perf_counter()
    done.set()
    result = {
        "startup_s": started - start,
        "first_batch_s": first_batch - started,
        "shards": int(dataset.num_shards),
        "samples": int(dataset.num_samples),
        "epoch": int(dataset.epoch_size),
        "first": len(first),
        "sampling": sampling,
        "resume": resume,
        "startup_rss_gib": startup_rss,
        "imports_rss_gib": imports_rss,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "shm_gib": max(shm_peak[0], shm_bytes() - shm_before) / 2**30,
    }
    return result


def shards_per_batch(root: str, epoch_size: int, batch_size: int, num_canonical_nodes: int, sampling: str) -> float:
    """The mean number of distinct shards in a global batch of epoch 1 (its order as one process
    of a node builds it, batches of `batch_size`): how well a batch still mixes the store."""
    import numpy as np
    from streaming import Stream
    from streaming.base.batching import generate_work
    from streaming.base.world import World

    from pipeline.sampling import ShardPassDataset

    streams = [Stream(local=os.path.join(root, name), proportion=p) for name, p in MIX.items()]
    dataset = ShardPassDataset(
        streams=streams,
        batch_size=batch_size,
        shuffle_seed=17,
        num_canonical_nodes=num_canonical_nodes,
        epoch_size=epoch_size,
        sampling=sampling,
    )
    ids = generate_work(dataset.batching_method, dataset, World.detect(), 1, 0).reshape(-1, batch_size)
    shards = np.searchsorted(dataset.spanner.shard_bounds, ids, side="right") - 1
    return float(np.mean([len(np.unique(batch)) for batch in shards]))


def run(samples: int, epoch_size: int, sampling: str, resume: bool, args) -> dict:
    root = os.path.join(args.work, f"{samples}")
    if not os.path.exists(os.path.join(root, "coyo700m", "index.json")):
        for name, share in MIX.items():
            write_index(os.path.join(root, name), int(samples * share), args.samples_per_shard)
    code = (
        f"import json, sys; sys.path.insert(0, {REPO!r}); from bench.streaming_scale import measure; "
        f"print(json.dumps(measure({root!r}, {epoch_size}, {args.batch_size}, {args.num_canonical_nodes}, "
        f"{sampling!r}, {resume})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1]
        return {"samples": samples, "epoch": epoch_size, "sampling": sampling, "resume": resume, "error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=float, nargs="+", default=[10e6, 100e6, 1e9])
    parser.add_argument(
        "--epoch-sizes", type=float, nargs="+", default=[0, 100e6], help="0: the whole dataset per epoch"
    )
    parser.add_argument("--samples-per-shard", type=int, default=3200)
    parser.add_argument("--batch-size", type=int, default=1024, help="per rank (65,536 over 64 GPUs)")
    parser.add_argument("--num-canonical-nodes", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument(
        "--sampling", nargs="+", default=["streaming", "shard_passes"], help="data.sampling (pipeline/sampling.py)"
    )
    parser.add_argument("--resume", action="store_true", help="also time a mid-epoch resume (epoch 3, half way)")
    parser.add_argument(
        "--shards-per-batch",
        type=int,
        metavar="GLOBAL_BATCH",
        help="instead: the mean distinct shards per global batch of this size, for each sampling",
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "streaming_scale"))
    args = parser.parse_args()
    if args.shards_per_batch:
        for samples in map(int, args.samples):
            root = os.path.join(args.work, f"{samples}")
            for epoch_size in map(int, args.epoch_sizes):
                for sampling in args.sampling:
                    mean = shards_per_batch(root, epoch_size, args.shards_per_batch, args.num_canonical_nodes, sampling)
                    print(f"| {samples:,} | {epoch_size:,} | {args.shards_per_batch:,} | {sampling} | {mean:,.0f} |")
        return
    rows = []
    for samples in map(int, args.samples):
        for epoch_size in map(int, args.epoch_sizes):
            if epoch_size and epoch_size >= samples:
                continue
            for sampling in args.sampling:
                for resume in (False, True) if args.resume else (False,):
                    result = run(samples, epoch_size, sampling, resume, args)
                    rows.append(result)
                    print(json.dumps(result), file=sys.stderr, flush=True)
    print(
        "| samples | shards | epoch | sampling | first batch of | start-up (s) | first batch (s) "
        "| RSS after start-up (GiB) | peak RSS (GiB) | /dev/shm (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        at = "mid-epoch resume" if r["resume"] else "epoch 0"
        if "error" in r:
            print(f"| {r['samples']:,} | | {r['epoch'] or 'full':,} | {r['sampling']} | {at} | {r['error']} | | | | |")
            continue
        print(
            f"| {r['samples']:,} | {r['shards']:,} | {r['epoch']:,} | {r['sampling']} | {at} | {r['startup_s']:.1f} "
            f"| {r['first_batch_s']:.1f} | {r['startup_rss_gib']:.2f} | {r['peak_rss_gib']:.2f} | {r['shm_gib']:.2f} |"
        )
    imports = [r["imports_rss_gib"] for r in rows if "imports_rss_gib" in r]
    if imports:
        print(f"\nRSS of the imports alone (torch, streaming), counted in every figure: {max(imports):.2f} GiB")


if __name__ == "__main__":
    main()
