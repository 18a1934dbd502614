"""What a build shows on the terminal: one progress line per stage and source. What Spark and
img2dataset print goes to log files instead (`output_to`)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Optional, TextIO

from pipeline.common.storage import is_remote


def log_folder(work_dir: str) -> str:
    """Where Spark's, img2dataset's and streaming's output goes: <work_dir>/logs, or ./logs when
    work_dir is in a bucket."""
    return "logs" if is_remote(work_dir) else os.path.join(work_dir, "logs")


@contextlib.contextmanager
def output_to(path: str) -> Iterator[TextIO]:
    """Points file descriptors 1 and 2 (this process's, and those of processes it starts meanwhile)
    at the log file `path`; yields a stream to where stdout went before."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


class StageLine:
    """`<stage> <source>: <text>`, rewritten in place on a terminal; elsewhere (a log, CI) only its
    final text is printed."""

    def __init__(self, stage: str, source: str, stream: Optional[TextIO] = None):
        self.prefix = f"{stage:<9}{source}: "
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if self.live:
            self._write("\r" + (self.prefix + text).ljust(self.width))

    def done(self, text: str) -> None:
        self._write(("\r" if self.live else "") + (self.prefix + text).ljust(self.width) + "\n")

    def _write(self, line: str) -> None:
        self.width = max(self.width, len(line.strip("\r\n")))
        self.stream.write(line)
        self.stream.flush()


@contextlib.contextmanager
def polling(show: Callable[[], None], seconds: float = 1.0) -> Iterator[None]:
    """Calls `show` every `seconds` while the block runs (progress that only the file system knows)."""
    stop = threading.Event()

    def loop():
        while not stop.wait(seconds):
            show()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
