"""Composer's RemoteUploader in threads, not spawned processes (Composer 0.32).

Each spawned process re-imports the training script (torch, Composer: ~15 s of a core), and each
rank spawns a manager, uploaders and checkers: on a busy node the first checkpoint landed a minute
late. Uploads wait on the network, as well in threads. tests/test_layout.py fails loudly if
Composer stops building its pools from these names.
"""

from __future__ import annotations

import contextlib
import threading
import types
from concurrent.futures import ThreadPoolExecutor

from composer.utils import remote_uploader


@contextlib.contextmanager
def threads_for_upload_processes():
    """Composer's RemoteUploader, built inside this, uploads and checks uploads in threads where it
    would spawn processes."""
    threads = types.SimpleNamespace(Manager=lambda: types.SimpleNamespace(Event=threading.Event))
    saved = remote_uploader.ProcessPoolExecutor, remote_uploader.multiprocessing
    remote_uploader.ProcessPoolExecutor = lambda max_workers, mp_context: ThreadPoolExecutor(max_workers)
    remote_uploader.multiprocessing = types.SimpleNamespace(get_context=lambda method: threads)
    try:
        yield
    finally:
        remote_uploader.ProcessPoolExecutor, remote_uploader.multiprocessing = saved
