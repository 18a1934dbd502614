"""StreamingDatasets starting together on one machine register their shared memory one at a time.

streaming names a dataset's shared memory by the first prefix it finds free in /dev/shm and then
creates it, so two jobs starting at the same moment on one machine (a sweep's runs launched side
by side, two test workers) can pick the same prefix, and one dies with
`FileExistsError: '/000003_locals'` (mosaicml/streaming#884 and #901, open). Here each node's
local leader holds a machine-wide file lock from before its ranks look for a free prefix until it
has created it; the job's other ranks wait at a barrier until their leader holds the lock.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from tempfile import gettempdir

import streaming.base.dataset as streaming_dataset
from filelock import FileLock
from torch import distributed as dist

# The folder streaming keeps its own machine-wide locks in; readable and writable by every user.
LOCK_PATH = os.path.join(gettempdir(), "streaming_shm_prefix.lock")
_find_and_create_prefix = streaming_dataset.get_shm_prefix


def _under_node_lock(streams_local, streams_remote, world, retry: int = 100):
    with FileLock(LOCK_PATH, mode=0o666) if world.is_local_leader else nullcontext():
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return _find_and_create_prefix(streams_local, streams_remote, world, retry)


def register_prefixes_one_at_a_time() -> None:
    """Every StreamingDataset built in this process from now on takes its prefix under the lock."""
    streaming_dataset.get_shm_prefix = _under_node_lock
