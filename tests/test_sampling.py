"""Virtual epochs drawn in shard passes (pipeline/data/sampling.py), on real MDS stores read by a real
StreamingDataset, locally and from a SeaweedFS bucket."""

import math
import os
import pickle
import shutil

import numpy as np
import pytest
from streaming import MDSWriter, Stream
from streaming.base.compression import decompress
from streaming.base.spanner import Spanner

from pipeline.data.sampling import ShardPassDataset, ShardSpanner
from pipeline.data.shard_index import CompactStream, LazyShard

SHARD_BYTES = 1 << 10  # a few dozen samples of one int each


def write_stream(folder: str, first_uid: int, samples: int, compression=None, hashes=()) -> str:
    with MDSWriter(
        out=folder, columns={"uid": "int"}, size_limit=SHARD_BYTES, compression=compression, hashes=list(hashes)
    ) as writer:
        for uid in range(first_uid, first_uid + samples):
            writer.write({"uid": uid})
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Two streams: uids 0..999 and 1000..1599."""
    root = tmp_path_factory.mktemp("store")
    return {"a": write_stream(str(root / "a"), 0, 1000), "b": write_stream(str(root / "b"), 1000, 600)}


def dataset(streams: list, epoch_size: int, sampling: str = "shard_passes", **kwargs) -> ShardPassDataset:
    return ShardPassDataset(
        streams=streams, epoch_size=epoch_size, sampling=sampling, batch_size=4, shuffle_seed=5, **kwargs
    )


def epochs(data: ShardPassDataset, count: int) -> list:
    """The uids of `count` successive virtual epochs (each iteration starts the next)."""
    return [[sample["uid"] for sample in data] for _ in range(count)]


def test_a_pass_of_25_virtual_epochs_draws_every_sample_exactly_once(store):
    # No proportions: each stream gives 4% of itself to each epoch of 64 (40 and 24).
    data = dataset([Stream(local=store["a"]), Stream(local=store["b"])], epoch_size=64)
    drawn = epochs(data, 25)
    assert all(len(epoch) == 64 for epoch in drawn)
    assert sorted(uid for epoch in drawn for uid in epoch) == list(range(1600))


def test_each_epoch_takes_exactly_its_proportions_and_a_small_stream_repeats_only_after_a_whole_pass(store):
    data = dataset([Stream(local=store["a"], proportion=0.7), Stream(local=store["b"], proportion=0.3)], 100)
    drawn = epochs(data, 30)
    assert all(sum(uid < 1000 for uid in epoch) == 70 for epoch in drawn)  # exact, every epoch
    from_b = [uid for epoch in drawn for uid in epoch if uid >= 1000]  # 900: one pass and a half
    assert sorted(from_b[:600]) == list(range(1000, 1600))
    assert len(set(from_b[600:])) == 300
    assert len({uid for epoch in drawn[:10] for uid in epoch if uid < 1000}) == 700  # 10 epochs of a's pass


def test_an_epoch_is_whole_shards_and_the_next_continues_where_it_stopped(store):
    data = dataset([Stream(local=store["a"])], epoch_size=100, shuffle=False)
    shard_of, sizes = ShardSpanner(data.samples_per_shard), data.samples_per_shard
    first, second = epochs(data, 2)
    for epoch, ends in ((first, 1), (second, 2)):  # the first starts a pass; the second may cut a shard at each end
        drawn = np.bincount([shard_of[uid][0] for uid in epoch], minlength=len(sizes))
        assert np.count_nonzero((drawn > 0) & (drawn < sizes)) <= ends
        assert np.count_nonzero(drawn) <= math.ceil(100 / sizes.min()) + ends
    assert len(set(first + second)) == 200  # nothing drawn twice in the pass


def test_a_4_percent_epoch_from_a_bucket_downloads_only_its_shards(store, s3, s3_bucket, tmp_path):
    client = s3.client()
    for name, folder in store.items():
        for file in os.listdir(folder):
            client.upload_file(os.path.join(folder, file), s3_bucket, f"{name}/{file}")
    downloaded = {}
    for sampling in ("shard_passes", "streaming"):
        local = {name: str(tmp_path / sampling / name) for name in store}
        streams = [Stream(remote=f"s3://{s3_bucket}/{name}", local=local[name]) for name in store]
        epochs(dataset(streams, epoch_size=64, sampling=sampling), 1)
        downloaded[sampling] = {
            name: sum(file.startswith("shard.") for file in os.listdir(local[name])) for name in store
        }
    for name, choose in (("a", 40), ("b", 24)):  # ceil(choose / shard size) + 1 at most
        shard_size = dataset([Stream(local=store[name])], epoch_size=choose).samples_per_shard.min()
        assert downloaded["shard_passes"][name] <= math.ceil(choose / shard_size) + 1, downloaded
    assert downloaded["streaming"]["a"] > 3 * downloaded["shard_passes"]["a"], downloaded  # what it replaces


def test_the_shard_spanner_equals_streamings_on_random_shard_sizes():
    rng = np.random.default_rng(3)
    for _ in range(20):
        sizes = rng.integers(0, 3000, size=int(rng.integers(1, 40))).astype(np.int64)
        sizes[rng.integers(len(sizes))] += 1  # at least one sample
        ours, theirs = ShardSpanner(sizes), Spanner(sizes.copy())
        for index in rng.integers(0, sizes.sum(), size=500):
            shard, within = theirs[int(index)]
            assert ours[int(index)] == (int(shard), within)
        for outside in (-1, int(sizes.sum())):
            with pytest.raises(IndexError):
                ours[outside]


# ---------------------------------------------------------------------------
# The compact shard index (pipeline/data/shard_index.py)
# ---------------------------------------------------------------------------


def write_compressed(folder: str, first_uid: int, samples: int) -> str:
    return write_stream(folder, first_uid, samples, compression="zstd", hashes=("sha1", "xxh64"))


def test_the_compact_index_reads_as_streamings_readers_do(store, tmp_path):
    zstd = write_compressed(str(tmp_path / "zstd"), 5000, 300)
    readers = {}
    for stream in (Stream, CompactStream):
        data = dataset([stream(local=store["a"]), stream(local=zstd)], epoch_size=200)
        readers[stream] = (data.samples_per_shard, epochs(data, 3), data.shards, data.cache_usage)
    (sizes, drawn, shards, usage), (compact_sizes, compact_drawn, lazy, compact_usage) = readers.values()
    assert all(isinstance(shard, LazyShard) for shard in lazy) and not isinstance(shards[0], LazyShard)
    assert np.array_equal(compact_sizes, sizes) and compact_drawn == drawn and compact_usage == usage
    for shard, lazy_shard in zip(shards, lazy):
        assert lazy_shard.get_max_size() == shard.get_max_size() and len(lazy_shard) == len(shard)
        assert lazy_shard.compression == shard.compression and lazy_shard.file_pairs == shard.file_pairs
    spawned = pickle.loads(pickle.dumps(lazy[-1]))  # as a spawned loader worker receives it
    assert spawned[0] == shards[-1][0] and spawned.table is not lazy[-1].table


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_partly_cached_remote_stream_counts_its_cache_as_streaming_does(store, s3, s3_bucket, tmp_path, compression):
    written = write_stream(str(tmp_path / "written"), 5000, 300, compression=compression, hashes=("sha1", "xxh64"))
    client = s3.client()
    for file in os.listdir(written):
        client.upload_file(os.path.join(written, file), s3_bucket, f"remote/{file}")
    shards = sorted(file for file in os.listdir(written) if file.startswith("shard."))
    usage = {}
    for stream in (Stream, CompactStream):
        local = tmp_path / stream.__name__
        local.mkdir()
        shutil.copy(os.path.join(written, "index.json"), local / "index.json")
        for i, name in enumerate(shards):  # zstd: zipped only, raw and zipped, raw only, not cached
            with open(os.path.join(written, name), "rb") as f:
                data = f.read()
            if i % 4 in (0, 1):
                (local / name).write_bytes(data)
            if compression and i % 4 in (1, 2):
                (local / name.removesuffix(".zstd")).write_bytes(decompress("zstd", data))
        data = dataset([stream(remote=f"s3://{s3_bucket}/remote", local=str(local))], epoch_size=100)
        states = [data._shard_states[shard] for shard in range(data.num_shards)]
        usage[stream] = (data.cache_usage, states, sorted(os.listdir(local)))
        assert len(epochs(data, 1)[0]) == 100
    assert usage[CompactStream] == usage[Stream] and usage[Stream][0] > 0  # the same bytes, the same files left
    assert len(set(usage[Stream][1])) == 2  # some shards local, some remote


def test_a_rebuilt_stream_gets_new_arrays(tmp_path):
    folder = write_stream(str(tmp_path / "s"), 0, 100)
    first = dataset([CompactStream(local=folder)], epoch_size=50).shards[0].table.folder
    shutil.rmtree(folder)
    write_stream(folder, 0, 300)
    rebuilt = dataset([CompactStream(local=folder)], epoch_size=50)
    assert rebuilt.num_samples == 300 and rebuilt.shards[0].table.folder != first and not os.path.exists(first)
