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
import re
import zipfile
from typing import Optional
from urllib.parse import urlparse

import boto3
import numpy as np
import torch
from botocore.exceptions import BotoCoreError, ClientError
from composer.callbacks import CheckpointSaver
from composer.utils import dist, parse_uri
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
    """Composer's CheckpointSaver, checking every few seconds that an upload has landed, turning
    every way an upload can fail into one CheckpointUploadError, and keeping `keep` checkpoints
    (plus every `keep_every`-th batch's) in the save folder, local or in the bucket."""

    def __init__(self, folder: str, *args, keep: int = -1, keep_every: Optional[int] = None, **kwargs):
        super().__init__(folder, *args, **kwargs)
        self.save_folder = folder  # Composer's self.folder is the local staging folder for a bucket
        self.keep, self.keep_every = keep, keep_every
        # The `latest` pointer is written only after the checkpoint it names is in the bucket,
        # so a shorter poll is as safe, just quicker.
        setattr(self, UPLOAD_POLL_ATTRIBUTE, UPLOAD_POLL_SECONDS)

    def batch_checkpoint(self, state, logger) -> None:
        saves = len(self.all_saved_checkpoints_to_timestamp)
        super().batch_checkpoint(state, logger)
        if len(self.all_saved_checkpoints_to_timestamp) != saves:  # a save: rotate what `latest` allows
            self.rotate()

    def batch_end(self, state, logger) -> None:
        with _upload_errors():
            super().batch_end(state, logger)

    def fit_end(self, state, logger) -> None:
        with _upload_errors():
            super().fit_end(state, logger)

    def post_close(self) -> None:
        super().post_close()  # every upload, the last `latest` pointer included, has landed
        self.rotate()

    def rotate(self) -> None:
        """Delete checkpoints beyond the newest `keep`, only ever older than the one `latest` names
        (so never that one, nor one still uploading: `latest` moves only once an upload landed)."""
        if self.keep < 0 or dist.get_global_rank() != 0:
            return
        folder = SaveFolder(self.save_folder)
        latest = folder.latest_batch()
        if latest is None:
            return
        saved = sorted(batch for batch in folder.checkpoint_batches() if batch <= latest)
        kept_for_good = {b for b in saved if self.keep_every and b % self.keep_every == 0}
        recent = [b for b in saved if b not in kept_for_good][-self.keep:] if self.keep else []
        for batch in saved:
            if batch != latest and batch not in kept_for_good and batch not in recent:
                folder.delete(batch)


@contextlib.contextmanager
def _upload_errors():
    try:
        yield
    except (BotoCoreError, ClientError, RuntimeError) as err:  # RuntimeError: Composer's check timed out
        raise CheckpointUploadError(str(err)) from err


CHECKPOINT_NAME = re.compile(r"ep\d+-ba(\d+)-rank0\.pt$")


class SaveFolder:
    """The rank-0 checkpoints of a local save folder or a bucket prefix, by batch."""

    def __init__(self, folder: str):
        self.folder = folder
        self.remote = is_remote(folder)
        if self.remote:
            url = urlparse(folder)
            self.bucket, self.prefix = url.netloc, url.path.strip("/")
            self.client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL"))

    def names(self) -> list:
        if not self.remote:
            return os.listdir(self.folder) if os.path.isdir(self.folder) else []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        return [obj["Key"].rsplit("/", 1)[-1] for page in pages for obj in page.get("Contents", [])]

    def checkpoint_batches(self) -> dict:
        """{batch: file name} of every rank-0 checkpoint."""
        return {int(m.group(1)): name for name in self.names() if (m := CHECKPOINT_NAME.search(name))}

    def latest_batch(self) -> Optional[int]:
        """The batch of the checkpoint `latest` names (a symlink locally, a .symlink object in a bucket)."""
        latest = LATEST.format(rank=0)
        if not self.remote:
            path = os.path.join(self.folder, latest)
            target = os.readlink(path) if os.path.islink(path) else None
        else:
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{latest}.symlink")["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
            target = body.decode().strip()
        match = CHECKPOINT_NAME.search(target or "")
        return int(match.group(1)) if match else None

    def delete(self, batch: int) -> None:
        names = [n for n in self.names() if re.search(rf"ep\d+-ba{batch}-rank\d+\.pt$", n)]  # every rank's file
        for name in names:
            if self.remote:
                self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")
            else:
                os.remove(os.path.join(self.folder, name))


def build_checkpoint_saver(cfg) -> CheckpointSaver:
    """From the TrainConfig's save_* settings."""
    folder = cfg.save_folder
    # As Composer names them; for a local folder nothing is uploaded, autoresume just needs them.
    path = parse_uri(folder)[2]
    return PollingCheckpointSaver(
        folder=folder,
        filename=FILENAME,
        latest_filename=LATEST,
        remote_file_name=os.path.join(path, FILENAME),
        latest_remote_file_name=os.path.join(path, LATEST),
        save_interval=cfg.save_interval,
        # A checkpoint half-written by a killed run is rewritten when the resumed run reaches it.
        overwrite=True,
        # Composer rotates only the local staging copies (one, for a bucket); rotate() does the rest.
        num_checkpoints_to_keep=1 if is_remote(folder) else -1,
        upload_timeout_in_seconds=cfg.checkpoint_upload_timeout,
        keep=cfg.save_num_checkpoints_to_keep,
        keep_every=cfg.save_keep_every,
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
