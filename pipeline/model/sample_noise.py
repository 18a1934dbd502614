"""Masking noise that belongs to the sample, not to the rank that happens to hold it.

Every training sample carries an id: its index in the dataset, counted on across epochs
(pipeline/data/loader.py). Patch and text masking draw their noise from (seed, sample id, position)
through a counter-based hash (SplitMix64), so a sample is masked the same way on 1 rank or many,
in any micro-batch, and after any resume. `CLIPModel.forward` names the ids of the samples it
encodes with `samples(ids)`; the masking modules read them there.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Optional

import numpy as np
import torch

PATCH_STREAM, TEXT_STREAM = 1, 2  # one noise stream per kind of mask

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1
_sample_ids: ContextVar[Optional[torch.Tensor]] = ContextVar("sample_ids", default=None)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on uint64 (array arithmetic wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@contextlib.contextmanager
def samples(sample_ids: Optional[torch.Tensor]):
    """The ids of the samples being encoded, for the masking modules' noise."""
    token = _sample_ids.set(sample_ids)
    try:
        yield
    finally:
        _sample_ids.reset(token)


def sample_uniform(seed: int, stream: int, length: int, device) -> torch.Tensor:
    """(samples, length) float64 noise in [0, 1), a function of (seed, stream, sample id, position)."""
    ids = _sample_ids.get()
    if ids is None:
        raise RuntimeError(
            "masking noise needs the ids of the samples being encoded (pipeline.model.sample_noise.samples)"
        )
    keys = splitmix64(np.array([(seed * 4 + stream) & _MASK64], dtype=np.uint64) ^ ids.cpu().numpy().astype(np.uint64))
    bits = splitmix64(keys[:, None] + (np.arange(length, dtype=np.uint64) * _GOLDEN)[None, :])
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) / 2.0**53).to(device)
