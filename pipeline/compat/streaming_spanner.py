"""StreamingDataset with a spanner of our choosing (streaming 0.13).

streaming's Spanner holds 8 bytes per sample of the store in every rank and loader worker, built
in StreamingDataset.__init__ from a name it looks up in its module (mosaicml/streaming#792, #771;
PR #773, a Spanner without the big array, is not merged). tests/test_layout.py fails loudly if
__init__ stops building it from that name.
"""

from __future__ import annotations

import contextlib

from streaming.base import dataset as streaming_dataset


@contextlib.contextmanager
def spanner_class(spanner: type):
    """StreamingDataset.__init__, run inside this, builds `spanner(samples_per_shard)` where it
    builds its Spanner."""
    saved = streaming_dataset.Spanner
    streaming_dataset.Spanner = spanner
    try:
        yield
    finally:
        streaming_dataset.Spanner = saved
