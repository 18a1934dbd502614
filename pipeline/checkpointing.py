"""Checkpoints to a folder or a bucket, resumed from where they stopped, loaded safely.

Composer's own `save_folder=s3://...` handling keeps a `./s3:/bucket/...` copy in the working
directory and prefers it on autoresume, so a second resume can pick a stale checkpoint; and it
polls for each upload every 30 s. A CheckpointSaver built here stages in a temporary folder,
finds the latest checkpoint in the bucket itself, and polls every few seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import zipfile

import numpy as np
import torch
from botocore.exceptions import BotoCoreError, ClientError
from composer.callbacks import CheckpointSaver
from composer.utils import parse_uri
# numpy has no public name for the function it pickles arrays with; tests/test_layout.py fails
# loudly if numpy stops pickling with this one.
from numpy._core.multiarray import _reconstruct
from torch.torch_version import TorchVersion

from pipeline.paths import is_remote

FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST = "latest-rank{rank}.pt"
UPLOAD_POLL_SECONDS = 2.0
# Composer's CheckpointSaver has no public argument for its wait between checks that an upload
# landed (30 s); tests/test_layout.py fails loudly if this private name disappears.
UPLOAD_POLL_ATTRIBUTE = "_symlink_upload_wait_before_next_try_in_seconds"


class CheckpointUploadError(RuntimeError):
    """A checkpoint did not reach the object store (unreachable, refused, or timed out)."""


class PollingCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, checking every few seconds that an upload has landed, and
    turning every way an upload can fail into one CheckpointUploadError."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The `latest` pointer is written only after the checkpoint it names is in the bucket,
        # so a shorter poll is as safe, just quicker.
        setattr(self, UPLOAD_POLL_ATTRIBUTE, UPLOAD_POLL_SECONDS)

    def batch_end(self, state, logger) -> None:
        with _upload_errors():
            super().batch_end(state, logger)

    def fit_end(self, state, logger) -> None:
        with _upload_errors():
            super().fit_end(state, logger)


@contextlib.contextmanager
def _upload_errors():
    try:
        yield
    except (BotoCoreError, ClientError, RuntimeError) as err:  # RuntimeError: Composer's check timed out
        raise CheckpointUploadError(str(err)) from err


def build_checkpoint_saver(
    folder: str, save_interval: str, num_checkpoints_to_keep: int, upload_timeout: int
) -> CheckpointSaver:
    # As Composer names them; for a local folder nothing is uploaded, autoresume just needs them.
    path = parse_uri(folder)[2]
    return PollingCheckpointSaver(
        folder=folder,
        filename=FILENAME,
        latest_filename=LATEST,
        remote_file_name=os.path.join(path, FILENAME),
        latest_remote_file_name=os.path.join(path, LATEST),
        save_interval=save_interval,
        # A checkpoint half-written by a killed run is rewritten when the resumed run reaches it.
        overwrite=True,
        # For a bucket only the local staging copies rotate; every checkpoint stays in the bucket.
        num_checkpoints_to_keep=1 if is_remote(folder) else num_checkpoints_to_keep,
        upload_timeout_in_seconds=upload_timeout,
    )


# Besides tensors, a Composer checkpoint pickles timestamps (timedelta), numpy's RNG state (a
# uint32 array) and the torch version: plain data. Anything else is refused unless trusted.
SAFE_GLOBALS = [datetime.timedelta, np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct, TorchVersion]
TRUST_ENV = "CLIPSTREAM_TRUST_CHECKPOINTS"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, or holds objects that would run code when loaded."""


SHARDED_REFUSAL = (
    "is part of a sharded checkpoint, which torch.distributed.checkpoint unpickles. "
    "Use parallelism.state_dict_type=full, or set trust_checkpoints=true if you trust it."
)


def read_checkpoint(path: str, trust: bool = False) -> dict:
    """Load a monolithic Composer checkpoint fully, never running pickled code unless `trust`."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} {SHARDED_REFUSAL}")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("WeightsUnpickler error: ")[-1].splitlines()[0]
        raise CheckpointError(
            f"{path} holds more than tensors and plain data ({reason}), so it was not loaded. "
            "If you trust this checkpoint, set trust_checkpoints=true."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is corrupt or truncated, so it was not loaded: {err}") from None


def validate_checkpoint(path, specs=None) -> bool:
    """Composer's CHECKPOINT_VALIDATION_FUNCTION: runs before every checkpoint load."""
    trust = os.environ.get(TRUST_ENV) == "1"
    # Composer passes byte ranges (specs) for .distcp shards, and the sharded .metadata file.
    if specs is not None or str(path).endswith(".metadata"):
        if not trust:
            raise CheckpointError(f"{path} {SHARDED_REFUSAL}")
        return True
    read_checkpoint(str(path), trust)
    return True


def guard_checkpoint_loading(trust: bool) -> None:
    """Make Composer check every checkpoint with `validate_checkpoint` before it loads one."""
    os.environ["CHECKPOINT_VALIDATION_FUNCTION"] = f"{__name__}.validate_checkpoint"
    os.environ[TRUST_ENV] = "1" if trust else "0"
