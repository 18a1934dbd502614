"""StreamingDatasets starting together on one machine register their shared memory one at a time.

streaming names a dataset's shared memory by the first prefix it finds free in /dev/shm and then
creates it, so two jobs starting at the same moment on one machine (a sweep's runs launched side
by side, two test workers) can pick the same prefix, and one dies with
`FileExistsError: '/000003_locals'` (mosaicml/streaming#884 and #901, open). Here each node's
local leader holds a file lock in /dev/shm itself (so it is shared exactly by the processes that
share those names) from before its ranks look for a free prefix until it has created it; the job's
other ranks wait at a barrier until their leader holds the lock.

streaming also finds a free prefix by attaching to every prefix already in /dev/shm, and registers
each attachment to be closed at exit, so a process holds one more file open for each prefix there
each time it builds a dataset. Prefixes left by killed jobs stay in /dev/shm, and a long process
(an eval of many sets, a test worker) runs out of files. Here those attachments close as soon as the
scan moves on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from tempfile import gettempdir

import streaming.base.dataset as streaming_dataset
import streaming.base.shared.prefix as streaming_prefix
from filelock import FileLock, Timeout
from torch import distributed as dist

log = logging.getLogger(__name__)

LOCK_PATH = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else gettempdir(), "streaming_shm_prefix.lock")
# Two multi-node jobs starting at once on the same nodes could each hold the lock on one node while
# waiting at a barrier for their ranks on the other; waiting this long, then going on without the
# lock, turns that deadlock back into streaming's own (rare) race.
LOCK_WAIT_S = 60
_find_and_create_prefix = streaming_dataset.get_shm_prefix
_SharedMemory = streaming_prefix.SharedMemory


def _attach_closed_on_release(name=None, create=None, size=0, auto_cleanup=True):
    """streaming's SharedMemory, but an attachment (create=False) is not held open until exit: it
    closes when released, as the scan moves on (what the process created is still cleaned at exit)."""
    return _SharedMemory(name, create, size, auto_cleanup=auto_cleanup and create is not False)


@contextmanager
def _machine_lock() -> Iterator[None]:
    lock = FileLock(LOCK_PATH, mode=0o666)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        log.warning("%s held for %g s by another job; registering shared memory without it", LOCK_PATH, LOCK_WAIT_S)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _under_machine_lock(streams_local, streams_remote, world, retry: int = 100):
    with _machine_lock() if world.is_local_leader else nullcontext():
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return _find_and_create_prefix(streams_local, streams_remote, world, retry)


def register_prefixes_one_at_a_time() -> None:
    """Every StreamingDataset built in this process from now on takes its prefix under the lock,
    and closes what it attached to while looking for one."""
    streaming_dataset.get_shm_prefix = _under_machine_lock
    streaming_prefix.SharedMemory = _attach_closed_on_release
