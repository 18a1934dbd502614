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
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from pipeline.common.tables import markdown_table  # noqa: E402

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


def build_dataset(root: str, epoch_size: int, batch_size: int, num_canonical_nodes: int, sampling: str):
    """The two streams as a dataset whose samples are their ids (no shard is read). "streaming":
    streaming 0.13 itself (its index, Spanner and draw), the baseline; otherwise this project's
    dataset (pipeline/data/sampling.py) over the compact shard index (pipeline/data/shard_index.py)."""
    from streaming import Stream, StreamingDataset

    from pipeline.data.sampling import ShardPassDataset
    from pipeline.data.shard_index import CompactStream

    base = StreamingDataset if sampling == "streaming" else ShardPassDataset
    stream = Stream if sampling == "streaming" else CompactStream

    class SampleIds(base):
        def __getitem__(self, index: int) -> int:
            return index

    streams = [stream(local=os.path.join(root, name), proportion=p) for name, p in MIX.items()]
    return SampleIds(
        streams=streams,
        batch_size=batch_size,
        shuffle=True,
        shuffle_algo="py1e",
        shuffle_seed=17,
        num_canonical_nodes=num_canonical_nodes,
        epoch_size=epoch_size or None,
        **({} if base is StreamingDataset else {"sampling": sampling}),
    )


def resume_mid_epoch(dataset, num_canonical_nodes: int) -> None:
    """What a resumed run's Trainer hands the dataset: half way through epoch 3."""
    state = {"epoch": 3, "sample_in_epoch": dataset.epoch_size // 2, "num_canonical_nodes": num_canonical_nodes}
    dataset.load_state_dict({**state, "shuffle_seed": 17, "initial_physical_nodes": None})


def measure(root: str, epoch_size: int, batch_size: int, num_canonical_nodes: int, sampling: str, resume: bool) -> dict:
    """Run in a fresh process: start-up, time to first batch (of epoch 0, or with `resume` of the
    middle of epoch 3, as a resumed run asks for it), peak RSS and shared memory."""
    import pipeline.data.sampling  # noqa: F401 - torch and streaming, before the imports' RSS is read
    import pipeline.data.shard_index  # noqa: F401

    shm_before, shm_peak, done = shm_bytes(), [0], threading.Event()
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def sample_shm() -> None:  # streaming's shared memory can be short-lived: keep its peak
        while not done.wait(0.05):
            shm_peak[0] = max(shm_peak[0], shm_bytes() - shm_before)

    threading.Thread(target=sample_shm, daemon=True).start()
    start = time.perf_counter()
    dataset = build_dataset(root, epoch_size, batch_size, num_canonical_nodes, sampling)
    startup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # what every rank holds
    if resume:
        resume_mid_epoch(dataset, num_canonical_nodes)
    started = time.perf_counter()
    first = [sample for _, sample in zip(range(batch_size), iter(dataset))]
    first_batch = time.perf_counter()
    done.set()
    return {
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


def node_rank(root: str, epoch_size: int, args: dict, sampling: str, resume: bool, out: str) -> None:
    """One rank of a simulated node (RANK, WORLD_SIZE, ... in the environment): the dataset, a
    StreamingDataLoader with its workers, the first batch; then it waits until every rank of the
    node has its first batch, so their memory is measured side by side."""
    from streaming import StreamingDataLoader

    start = time.perf_counter()
    dataset = build_dataset(root, epoch_size, args["batch_size"], args["num_canonical_nodes"], sampling)
    if resume:
        resume_mid_epoch(dataset, args["num_canonical_nodes"])
    loader = StreamingDataLoader(dataset, batch_size=args["batch_size"], num_workers=args["workers"])
    started = time.perf_counter()
    next(iter(loader))
    first_batch = time.perf_counter()
    with open(os.path.join(out, f"first_batch.{os.environ['RANK']}"), "w") as f:
        json.dump({"startup_s": started - start, "first_batch_s": first_batch - started}, f)
    while sum(name.startswith("first_batch.") for name in os.listdir(out)) < int(os.environ["WORLD_SIZE"]):
        time.sleep(0.2)


def node_memory(ranks: list) -> dict:
    """PSS (shared pages split among the processes that map them, so the sum counts them once) of
    the node's leader, its other ranks and all their loader workers, and the workers' USS (what
    each holds alone: what one more worker would add), in bytes."""
    import psutil

    kinds = {"leader": 0, "ranks": 0, "workers": 0, "workers_uss": 0}
    for rank, proc in enumerate(ranks):
        try:
            process = psutil.Process(proc.pid)
            kinds["leader" if rank == 0 else "ranks"] += process.memory_full_info().pss
            for worker in process.children(recursive=True):
                memory = worker.memory_full_info()
                kinds["workers"] += memory.pss
                kinds["workers_uss"] += memory.uss
        except psutil.Error:  # a process that just ended
            pass
    return kinds


def run_node(samples: int, epoch_size: int, sampling: str, resume: bool, args) -> dict:
    """A node of `args.node` rank processes with `args.workers` loader workers each, all started
    at once; per process kind and for the node: start-up, first batch, peak PSS, /dev/shm."""
    import psutil

    root = store(samples, args)
    options = {"batch_size": args.batch_size, "num_canonical_nodes": args.num_canonical_nodes, "workers": args.workers}
    out = tempfile.mkdtemp()
    code = (
        f"import sys; sys.path.insert(0, {REPO!r}); from bench.streaming_scale import node_rank; "
        f"node_rank({root!r}, {epoch_size}, {options!r}, {sampling!r}, {resume}, {out!r})"
    )
    port, shm_before = 29500 + os.getpid() % 1000, shm_bytes()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(args.node),
                "LOCAL_WORLD_SIZE": str(args.node),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
            stderr=open(os.path.join(out, f"stderr.{rank}"), "w"),  # noqa: SIM115 - closed with the process
        )
        for rank in range(args.node)
    ]
    peak, shm_peak, error = {"leader": 0, "ranks": 0, "workers": 0, "workers_uss": 0, "node": 0}, 0, None
    while any(proc.poll() is None for proc in ranks):
        memory = node_memory(ranks)
        memory["node"] = memory["leader"] + memory["ranks"] + memory["workers"]
        peak = {kind: max(peak[kind], memory[kind]) for kind in peak}
        shm_peak = max(shm_peak, shm_bytes() - shm_before)
        if psutil.virtual_memory().available < 1 << 30:  # stop before the kernel's OOM killer does
            error = f"out of memory: the node reached {memory['node'] / 2**30:.1f} GiB"
            for proc in ranks:
                proc.kill()
        time.sleep(0.5)
    failed = [proc for proc in ranks if proc.returncode]
    if error or failed:
        with open(os.path.join(out, f"stderr.{ranks.index(failed[0])}")) if failed else contextlib.nullcontext() as f:
            reason = error or f.read().strip().splitlines()[-1]
        return {"samples": samples, "epoch": epoch_size, "sampling": sampling, "resume": resume, "error": reason}
    timings = []
    for rank in range(args.node):
        with open(os.path.join(out, f"first_batch.{rank}")) as f:
            timings.append(json.load(f))
    gib = {f"{kind}_pss_gib": peak[kind] / 2**30 for kind in peak}
    result = {
        "samples": samples,
        "epoch": epoch_size,
        "sampling": sampling,
        "resume": resume,
        "startup_s": max(t["startup_s"] for t in timings),
        "first_batch_s": max(t["first_batch_s"] for t in timings),
        **gib,
        # Workers are alike: 8 a rank add (8 / workers - 1) times what these hold alone.
        "node_8_workers_gib": (peak["node"] + peak["workers_uss"] * (8 / args.workers - 1)) / 2**30,
        "shm_gib": shm_peak / 2**30,
    }
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def shards_per_batch(
    root: str,
    epoch_size: int,
    batch_size: int,
    num_canonical_nodes: int,
    sampling: str,
    block: Optional[int],
    granularity: int = 1,
) -> float:
    """The mean number of distinct shards in a global batch of epoch 1 (its order as one process
    of a node builds it, batches of `batch_size`): how well a batch still mixes the store.
    `granularity`: streaming's sampling_granularity (samples drawn together from a shard)."""
    import numpy as np
    from streaming import Stream
    from streaming.base.batching import generate_work
    from streaming.base.world import World

    from pipeline.data.sampling import ShardPassDataset

    streams = [Stream(local=os.path.join(root, name), proportion=p) for name, p in MIX.items()]
    dataset = ShardPassDataset(
        streams=streams,
        batch_size=batch_size,
        shuffle=True,
        shuffle_algo="py1e",
        shuffle_block_size=block or max(4_000_000 // num_canonical_nodes, 1 << 18),  # streaming's default
        shuffle_seed=17,
        num_canonical_nodes=num_canonical_nodes,
        epoch_size=epoch_size,
        sampling=sampling,
        sampling_granularity=granularity,
    )
    ids = generate_work(dataset.batching_method, dataset, World.detect(), 1, 0).reshape(-1, batch_size)
    shards = np.searchsorted(dataset.spanner.shard_bounds, ids, side="right") - 1
    return float(np.mean([len(np.unique(batch)) for batch in shards]))


def store(samples: int, args) -> str:
    """The synthetic store of `samples` samples, written once."""
    root = os.path.join(args.work, f"{samples}")
    if not os.path.exists(os.path.join(root, "coyo700m", "index.json")):
        for name, share in MIX.items():
            write_index(os.path.join(root, name), int(samples * share), args.samples_per_shard)
    return root


def run(samples: int, epoch_size: int, sampling: str, resume: bool, args) -> dict:
    root = store(samples, args)
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


def node_table(rows: list, args) -> str:
    header = [
        "samples", "epoch", "sampling", "first batch of", "start-up (s)", "first batch (s)", "leader PSS (GiB)",
        f"{args.node - 1} other ranks (GiB)", f"{args.node * args.workers} workers (GiB)", "node (GiB)",
        "node with 8 workers a rank (GiB)", "/dev/shm (GiB)",
    ]  # fmt: skip
    keys = ["startup_s", "first_batch_s", "leader_pss_gib", "ranks_pss_gib", "workers_pss_gib", "node_pss_gib"]
    return markdown_table([header, *(cells(r, [*keys, "node_8_workers_gib", "shm_gib"]) for r in rows)])


def process_table(rows: list) -> str:
    header = [
        "samples", "epoch", "sampling", "first batch of", "start-up (s)", "first batch (s)",
        "RSS after start-up (GiB)", "peak RSS (GiB)", "/dev/shm (GiB)",
    ]  # fmt: skip
    keys = ["startup_s", "first_batch_s", "startup_rss_gib", "peak_rss_gib", "shm_gib"]
    table = markdown_table([header, *(cells(r, keys) for r in rows)])
    imports = max((r["imports_rss_gib"] for r in rows if "imports_rss_gib" in r), default=0)
    return f"{table}\n\nRSS of the imports alone (torch, streaming), counted in every figure: {imports:.2f} GiB"


def cells(row: dict, keys: list) -> list:
    """A row's cells: what it measured, then `keys` (seconds to 0.1, GiB to 0.01), or its error."""
    first = [f"{row['samples']:,}", f"{row['epoch'] or 'full':,}", row["sampling"]]
    first.append("mid-epoch resume" if row["resume"] else "epoch 0")
    if "error" in row:
        return [*first, row["error"], *[""] * (len(keys) - 1)]
    return [*first, *(f"{row[key]:.1f}" if key.endswith("_s") else f"{row[key]:.2f}" for key in keys)]


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
        "--sampling", nargs="+", default=["streaming", "shard_passes"], help="data.sampling (pipeline/data/sampling.py)"
    )
    parser.add_argument("--resume", action="store_true", help="also time a mid-epoch resume (epoch 3, half way)")
    parser.add_argument("--shuffle-block-size", type=int, help="default: streaming's (4M / canonical nodes)")
    parser.add_argument("--node", type=int, metavar="RANKS", help="instead: a simulated node of this many ranks")
    parser.add_argument("--workers", type=int, default=2, help="loader workers per rank (--node)")
    parser.add_argument(
        "--shards-per-batch",
        type=int,
        metavar="GLOBAL_BATCH",
        help="instead: the mean distinct shards per global batch of this size, for each sampling",
    )
    parser.add_argument(
        "--sampling-granularity",
        type=int,
        default=1,
        help="with --shards-per-batch: streaming's sampling_granularity (its own whole-shard draw at the shard size)",
    )
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "streaming_scale"))
    args = parser.parse_args()
    if args.shards_per_batch:
        for samples in map(int, args.samples):
            root = os.path.join(args.work, f"{samples}")
            for epoch_size in map(int, args.epoch_sizes):
                for sampling in args.sampling:
                    block, batch, granularity = (
                        args.shuffle_block_size,
                        args.shards_per_batch,
                        args.sampling_granularity,
                    )
                    mean = shards_per_batch(
                        root, epoch_size, batch, args.num_canonical_nodes, sampling, block, granularity
                    )
                    name = sampling if granularity == 1 else f"{sampling}, sampling_granularity {granularity:,}"
                    cells = [f"{samples:,}", f"{epoch_size:,}", f"{batch:,}", name, f"{block or 'default'}"]
                    print("| " + " | ".join([*cells, f"{mean:,.0f}"]) + " |")
        return
    if args.node:
        rows = [
            run_node(samples, epoch_size, sampling, resume, args)
            for samples in map(int, args.samples)
            for epoch_size in map(int, args.epoch_sizes)
            for sampling in args.sampling
            for resume in ((False, True) if args.resume else (False,))
            if not epoch_size or epoch_size < samples
        ]
        print(node_table(rows, args))
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
    print(process_table(rows))


if __name__ == "__main__":
    main()
