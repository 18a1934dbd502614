"""Each stream's shard index, compact: what a Merged-2B store's 781k shards cost every process.

streaming 0.13 parses a stream's index.json into one Reader object per shard in every rank (and
every loader worker inherits them): for 781k shards about 1.2 GiB and 40 s a process, most of it
building the Readers. Here the node's local leader turns index.json once into arrays (per shard:
samples, file sizes and names, and its JSON entry in one blob) in the node's temporary folder (not
beside the data, which may be read-only), which every process memory-maps, so the node holds them
once in its page cache; a resumed run on the node reuses them.
Each process then holds one small `LazyShard` per shard, which builds streaming's Reader only when
that shard is read (a few recent ones are kept).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict

import numpy as np
from filelock import FileLock
from streaming import Stream
from streaming.base.format import reader_from_json
from streaming.base.format.index import get_index_basename
from streaming.base.util import wait_for_file_to_exist

COMPACT = "clipstream-shard-index"  # in the node's temporary folder: <index path's hash>/<its size>-<time>
READERS_KEPT = 256  # streaming's Readers of the shards a process read last
WAIT_SECONDS = 600  # for the node's leader to write the compact index (about 15 s at 781k shards)


class CompactStream(Stream):
    """A Stream whose shards are LazyShards over the compact index (index.json is fetched and
    checked as streaming does)."""

    def get_shards(self, world, allow_unsafe_types: bool) -> list:
        index = os.path.join(self.local, self.split, get_index_basename())
        if not os.path.exists(index):
            if world.is_local_leader and self.remote:
                os.rename(self._download_file(get_index_basename(), get_index_basename() + ".tmp"), index)
            elif world.is_local_leader:
                raise RuntimeError(f"No `remote` provided, but local file {index} does not exist either")
            else:
                wait_for_file_to_exist(
                    index, 0.1, self.download_timeout, f"{index} took too long to download (see local rank 0)"
                )
        folder = compact_folder(index)
        if world.is_local_leader and not os.path.isdir(folder):
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            with FileLock(f"{os.path.dirname(folder)}.lock"):  # another job on the node may read this stream
                if not os.path.isdir(folder):
                    write_compact_index(index, folder)
        wait_for_file_to_exist(folder, 0.1, WAIT_SECONDS, f"{folder} was not written (see local rank 0)")
        table = ShardTable(folder, self.local, self.split)
        table.validate(allow_unsafe_types)
        counts = {}  # one int object per distinct count: most shards of a store hold the same
        return [LazyShard(table, shard, counts.setdefault(n, n)) for shard, n in enumerate(table.samples.tolist())]

    def set_up_local(self, shards: list, cache_usage_per_shard: np.ndarray) -> None:
        """streaming's (each shard's bytes in the local cache, the leader's at start-up), as array
        operations for MDS shards that are absent, or cached uncompressed: a Merged-2B stream's 781k
        shards took the leader ~9 s one by one. Other shards ask their Reader, as streaming does."""
        if not shards:
            return
        table, folder = shards[0].table, os.path.join(self.local, self.split or "")
        listing = set(files_under(os.fsencode(folder)))
        raw = np.fromiter((name in listing for name in table.raw_names.tolist()), np.bool_, len(table.raw_names))
        zipped = np.fromiter((name in listing for name in table.zip_names.tolist()), np.bool_, len(table.zip_names))
        zipped &= table.zip_bytes >= 0
        cache_usage_per_shard[:] = np.where(raw & (table.zip_bytes < 0), table.raw_bytes, 0)
        readers_decide = np.flatnonzero(~table.joint | ((zipped | raw) & (table.zip_bytes >= 0)))
        if len(readers_decide):
            paths = {os.path.join(folder, os.fsdecode(name)) for name in listing}
            for shard in readers_decide:
                cache_usage_per_shard[shard] = shards[shard].set_up_local(paths, self.safe_keep_zip)


def files_under(folder: bytes, relative: bytes = b""):
    """The names of the files under `folder`, relative to it, as bytes (as the table keeps them)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from files_under(entry.path, relative + entry.name + b"/")
            else:
                yield relative + entry.name


def compact_folder(index: str) -> str:
    """Where the arrays of this version of `index` go (the same for every process of the node)."""
    stat, path = os.stat(index), os.path.abspath(index)
    stream = hashlib.sha1(path.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), COMPACT, stream, f"{stat.st_size}-{stat.st_mtime_ns}")


def write_compact_index(index: str, folder: str) -> None:
    """The arrays of `index` (an MDS index.json), written into a new folder renamed into place."""
    with open(index) as f:
        obj = json.load(f)
    if obj.get("version") != 2:
        raise ValueError(f"Unsupported streaming data version in {index}: {obj.get('version')}. Expected version 2.")
    shards = obj["shards"]
    entries = [json.dumps(info, sort_keys=True).encode() for info in shards]
    raw = [info.get("raw_data") or {} for info in shards]
    zipped = [info.get("zip_data") or {} for info in shards]
    kinds = {}  # one shard of each format and column encodings: validated in every process
    for shard, info in enumerate(shards):
        kinds.setdefault(json.dumps([info.get("format"), info.get("column_encodings")]), shard)
    arrays = {
        "samples": np.array([info["samples"] for info in shards], np.int64),
        "raw_bytes": np.array([r.get("bytes", 0) for r in raw], np.int64),
        "zip_bytes": np.array([z.get("bytes", -1) for z in zipped], np.int64),  # -1: no zip form
        "raw_names": np.array([r.get("basename", "") for r in raw], np.bytes_),
        "zip_names": np.array([z.get("basename", "") for z in zipped], np.bytes_),
        "offsets": np.concatenate([np.zeros(1, np.int64), np.cumsum([len(e) for e in entries], dtype=np.int64)]),
        "entries": np.frombuffer(b"".join(entries), np.uint8),
        "kinds": np.array(sorted(kinds.values()), np.int64),
        "joint": np.array([info.get("format") == "mds" for info in shards], np.bool_),  # one file (+ zip) a shard
    }
    parent = os.path.dirname(folder)
    for old in os.listdir(parent):  # an older version of the index's arrays
        shutil.rmtree(os.path.join(parent, old), ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=".staging.", dir=parent)
    for name, array in arrays.items():
        np.save(os.path.join(staging, f"{name}.npy"), array)
    os.replace(staging, folder)


class ShardTable:
    """One stream's compact index, memory-mapped; builds streaming's Reader of a shard on demand."""

    def __init__(self, folder: str, local: str, split: str):
        self.folder, self.local, self.split = folder, local, split
        # Plain views of the maps: numpy's memmap indexes through Python, 2x slower a shard.
        load = {name: np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r").view(np.ndarray) for name in ARRAYS}
        self.samples, self.raw_bytes, self.zip_bytes = load["samples"], load["raw_bytes"], load["zip_bytes"]
        self.raw_names, self.zip_names = load["raw_names"], load["zip_names"]
        self.offsets, self.entries, self.kinds = load["offsets"], load["entries"], load["kinds"]
        self.joint = load["joint"]
        self.readers: OrderedDict = OrderedDict()

    def __reduce__(self):  # loader workers that are spawned, not forked, map the files again
        return ShardTable, (self.folder, self.local, self.split)

    def reader(self, shard: int):
        """streaming's Reader of `shard`."""
        if shard in self.readers:
            self.readers.move_to_end(shard)
            return self.readers[shard]
        info = json.loads(bytes(self.entries[self.offsets[shard] : self.offsets[shard + 1]]))
        self.readers[shard] = reader_from_json(self.local, self.split, info)
        if len(self.readers) > READERS_KEPT:
            self.readers.popitem(last=False)
        return self.readers[shard]

    def validate(self, allow_unsafe_types: bool) -> None:
        """streaming's check (no pickled columns unless allowed), once per kind of shard."""
        for shard in self.kinds:
            self.reader(int(shard)).validate(allow_unsafe_types)


ARRAYS = ("samples", "raw_bytes", "zip_bytes", "raw_names", "zip_names", "offsets", "entries", "kinds", "joint")


class LazyShard:
    """Stands for streaming's Reader of one shard: its size from the table, everything else from
    the Reader, built when first asked for."""

    __slots__ = ("table", "shard", "samples")

    def __init__(self, table: ShardTable, shard: int, samples: int):
        # streaming reads every shard's `samples` in every rank at start-up: a slot, not the table
        self.table, self.shard, self.samples = table, shard, samples

    @property
    def size(self) -> int:
        return self.samples

    def __len__(self) -> int:
        return self.samples

    def get_raw_size(self) -> int:
        return int(self.table.raw_bytes[self.shard])

    def get_zip_size(self):
        size = int(self.table.zip_bytes[self.shard])
        return None if size < 0 else size

    def get_max_size(self) -> int:
        return self.get_raw_size() + (self.get_zip_size() or 0)

    def validate(self, allow_unsafe_types: bool) -> None:
        """Done once per kind of shard by the table."""

    def __getitem__(self, at):  # a sample (streaming's Reader is an Array)
        return self.table.reader(self.shard)[at]

    def __iter__(self):
        return iter(self.table.reader(self.shard))

    def __getattr__(self, name: str):
        if name.startswith("__"):  # pickling and copying look these up before the slots are set
            raise AttributeError(name)
        return getattr(self.table.reader(self.shard), name)
