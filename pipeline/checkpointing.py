"""Checkpoints to a folder or a bucket, resumed from where they stopped, loaded safely.

Composer's CheckpointSaver writes them: a full checkpoint is one file from rank 0; a sharded one
is a torch.distributed.checkpoint (DCP) folder, `ep0-ba20/`, with each rank's `__<rank>_0.distcp`
and rank 0's `.metadata`, uploaded in the background while training goes on. The `latest` pointer
moves only once every rank's files have landed.

What is built here:
- Resuming: Composer's own autoresume looks in its local staging folder (and keeps a stale
  `./s3:/bucket/...` copy), so `resume_checkpoint` finds the newest whole checkpoint in the save
  folder itself, local or in the bucket, and the Trainer loads it as its load_path. DCP reshards
  model and optimizer state onto whatever world size loads it.
- Signing: DCP's `.metadata` and the non-tensor parts of each shard are pickles. After every
  sharded save each rank hashes its own shard and rank 0 writes `manifest.json` (the sha256 of
  every file, HMAC-signed with the run's key, `checkpoints.key` in the save folder) before the
  pointer can move. A shard is unpickled only if its digest is in a manifest this run's key
  signed; anything else needs checkpoint.trust.
- Retention, and upload errors turned into one clear CheckpointUploadError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import hmac
import json
import os
import pickle
import re
import secrets
import shutil
import sys
import tempfile
import threading
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from botocore.exceptions import BotoCoreError, ClientError
from composer.callbacks import CheckpointSaver
from composer.utils import dist, get_file, parse_uri, remote_uploader

# numpy has no public name for the function it pickles arrays with; tests/test_layout.py fails
# loudly if numpy stops pickling with this one.
from numpy._core.multiarray import _reconstruct
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.torch_version import TorchVersion

from pipeline.config import CheckpointConfig
from pipeline.paths import is_remote, s3_client

FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST = "latest-rank{rank}.pt"
UPLOAD_POLL_SECONDS = 0.5
# Composer's CheckpointSaver has no public argument for its wait between checks that an upload
# landed (30 s); tests/test_layout.py fails loudly if this private name disappears.
UPLOAD_POLL_ATTRIBUTE = "_symlink_upload_wait_before_next_try_in_seconds"


class CheckpointUploadError(RuntimeError):
    """A checkpoint did not reach the object store (unreachable, refused, or timed out)."""


@contextlib.contextmanager
def threads_for_upload_processes():
    """Composer's RemoteUploader, built inside this, uploads and checks uploads in threads where it
    would spawn processes. Each spawned process re-imports the training script (torch, Composer:
    ~15 s of a core), and each rank spawns a manager, uploaders and checkers: on a busy node the
    first checkpoint landed a minute late. Uploads wait on the network, as well in threads.
    tests/test_layout.py fails loudly if Composer stops building its pools from these names."""
    threads = types.SimpleNamespace(Manager=lambda: types.SimpleNamespace(Event=threading.Event))
    saved = remote_uploader.ProcessPoolExecutor, remote_uploader.multiprocessing
    remote_uploader.ProcessPoolExecutor = lambda max_workers, mp_context: ThreadPoolExecutor(max_workers)
    remote_uploader.multiprocessing = types.SimpleNamespace(get_context=lambda method: threads)
    try:
        yield
    finally:
        remote_uploader.ProcessPoolExecutor, remote_uploader.multiprocessing = saved


class PollingCheckpointSaver(CheckpointSaver):
    """Composer's CheckpointSaver, uploading in threads, checking every few seconds that an upload
    has landed, turning every way an upload can fail into one CheckpointUploadError, and keeping
    `keep` checkpoints (plus every `keep_every`-th batch's) in the save folder, local or in the bucket."""

    def __init__(self, folder: str, *args, keep: int = -1, keep_every: Optional[int] = None, **kwargs):
        with threads_for_upload_processes():
            super().__init__(folder, *args, **kwargs)
        self.save_folder = folder  # Composer's self.folder is the local staging folder for a bucket
        self.keep, self.keep_every = keep, keep_every
        self.closed = False
        # The `latest` pointer is written only after the checkpoint it names is in the bucket,
        # so a shorter poll is as safe, just quicker.
        setattr(self, UPLOAD_POLL_ATTRIBUTE, UPLOAD_POLL_SECONDS)

    def batch_checkpoint(self, state, logger) -> None:
        self._after_a_save(super().batch_checkpoint, state, logger)

    def epoch_checkpoint(self, state, logger) -> None:
        self._after_a_save(super().epoch_checkpoint, state, logger)

    def _after_a_save(self, event, state, logger) -> None:
        """Run Composer's handler of a checkpoint event; if it saved (on every rank), sign a sharded
        checkpoint and rotate what `latest` allows."""
        saves = len(self.all_saved_checkpoints_to_timestamp)
        event(state, logger)
        if len(self.all_saved_checkpoints_to_timestamp) == saves:
            return
        if state.fsdp_sharded_state_dict_enabled:
            self.sign(os.path.dirname(list(self.all_saved_checkpoints_to_timestamp)[-1]))
        self.rotate()

    def sign(self, local_checkpoint: str) -> None:
        """Each rank hashes the shard it wrote; rank 0 writes the signed manifest of them all into the
        checkpoint folder, and uploads it now (before `latest` can move, in a later batch_end)."""
        rank = dist.get_global_rank()
        own = [f"__{rank}_0.distcp"] + ([DCP_METADATA] if rank == 0 else [])
        digests = {
            name: file_digest(os.path.join(local_checkpoint, name))
            for name in own
            if os.path.isfile(os.path.join(local_checkpoint, name))
        }
        every = dist.all_gather_object(digests)  # HYBRID_SHARD: replicas other than the first write nothing
        if rank != 0:
            return
        folder = SaveFolder(self.save_folder)
        manifest = signed_manifest({k: v for d in every for k, v in d.items()}, folder.run_key(create=True))
        path = os.path.join(local_checkpoint, MANIFEST)
        with open(path, "w") as f:
            json.dump(manifest, f)
        if folder.remote:
            folder.upload(path, f"{os.path.basename(local_checkpoint)}/{MANIFEST}")

    def batch_end(self, state, logger) -> None:
        with _upload_errors():
            super().batch_end(state, logger)

    def fit_end(self, state, logger) -> None:
        with _upload_errors():
            super().fit_end(state, logger)

    def post_close(self) -> None:
        if self.closed:  # Composer's hook at exit calls it again, even after Trainer.close()
            return
        self.closed = True
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
        recent = [b for b in saved if b not in kept_for_good][-self.keep :] if self.keep else []
        for batch in saved:
            if batch != latest and batch not in kept_for_good and batch not in recent:
                folder.delete(batch)


@contextlib.contextmanager
def _upload_errors():
    try:
        yield
    except (BotoCoreError, ClientError, RuntimeError) as err:  # RuntimeError: Composer's check timed out
        raise CheckpointUploadError(str(err)) from err


# ep0-ba20-rank0.pt (full, rank 0's file) or ep0-ba20 (a sharded checkpoint's folder)
CHECKPOINT_NAME = re.compile(r"^ep\d+-ba(\d+)(-rank0\.pt)?$")
DCP_METADATA = ".metadata"
MANIFEST = "manifest.json"  # in each sharded checkpoint's folder
KEY_FILE = "checkpoints.key"  # the run's signing key, in the save folder next to config.yaml


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _signature(files: dict, key: bytes) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def signed_manifest(files: dict, key: bytes) -> dict:
    return {"files": files, "signature": _signature(files, key)}


class SaveFolder:
    """The checkpoints of a local save folder or a bucket prefix, by batch: rank 0's file of a
    full checkpoint, or a sharded checkpoint's folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.remote = is_remote(folder)
        if self.remote:
            url = urlparse(folder)
            self.bucket, self.prefix = url.netloc, url.path.strip("/")
            self.client = s3_client()

    def path(self, name: str) -> str:
        return f"{self.folder.rstrip('/')}/{name}"

    def names(self, sub: str = "") -> list:
        """What is directly in the folder, or in its sub-folder `sub`: files and sub-folders."""
        if not self.remote:
            path = os.path.join(self.folder, sub)
            return os.listdir(path) if os.path.isdir(path) else []
        prefix = f"{self.prefix}/{sub}/" if sub else f"{self.prefix}/"
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        ):
            names += [obj["Key"][len(prefix) :] for obj in page.get("Contents", [])]
            names += [folder["Prefix"][len(prefix) :].rstrip("/") for folder in page.get("CommonPrefixes", [])]
        return names

    def read(self, name: str) -> Optional[bytes]:
        """A file's bytes (name relative to the folder), or None when it is not there."""
        if not self.remote:
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path):
                return None
            with open(path, "rb") as f:
                return f.read()
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def upload(self, local: str, name: str) -> None:
        self.client.upload_file(local, self.bucket, f"{self.prefix}/{name}")

    def run_key(self, create: bool = False) -> Optional[bytes]:
        """The run's signing key (made by its rank 0 at its first sharded save)."""
        key = self.read(KEY_FILE)
        if key is not None or not create:
            return key
        key = secrets.token_bytes(32)
        if self.remote:
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{KEY_FILE}", Body=key)
        else:
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, KEY_FILE), "wb") as f:
                f.write(key)
        return key

    def checkpoint_batches(self) -> dict:
        """{batch: name} of every checkpoint."""
        return {int(m.group(1)): name for name in self.names() if (m := CHECKPOINT_NAME.search(name))}

    def latest_batch(self) -> Optional[int]:
        """The batch of the checkpoint `latest` names (a symlink locally, a .symlink object in a bucket)."""
        latest = LATEST.format(rank=0)
        if not self.remote:
            path = os.path.join(self.folder, latest)
            target = os.readlink(path) if os.path.islink(path) else None
        else:
            body = self.read(f"{latest}.symlink")
            target = None if body is None else body.decode().strip()
        match = CHECKPOINT_NAME.search(os.path.basename((target or "").rstrip("/")))
        return int(match.group(1)) if match else None

    def delete(self, batch: int) -> None:
        pattern = re.compile(rf"^ep\d+-ba{batch}(-rank\d+\.pt)?$")  # every rank's file, or the sharded folder
        for name in (n for n in self.names() if pattern.match(n)):
            if not self.remote:
                path = os.path.join(self.folder, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                continue
            for key in [f"{name}/{file}" for file in self.names(name)] or [name]:
                self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")

    def signed_files(self, name: str, key: Optional[bytes]) -> Optional[dict]:
        """{file: sha256} of a sharded checkpoint whose manifest `key` signed; None when it has no
        manifest (a save that did not finish). Raises CheckpointError when the signature or a file is wrong."""
        manifest = self.read(f"{name}/{MANIFEST}")
        if manifest is None:
            return None
        manifest = json.loads(manifest)
        files, signature = manifest.get("files", {}), manifest.get("signature", "")
        if key is None or not hmac.compare_digest(_signature(files, key), signature):
            raise CheckpointError(
                f"{self.path(name)}/{MANIFEST} is not signed by this run's key ({self.path(KEY_FILE)}): "
                "this run did not write it. If you trust it, set checkpoint.trust=true (eval: trust=true)."
            )
        missing = sorted(set(files) - set(self.names(name)))
        if missing or DCP_METADATA not in files:
            raise CheckpointError(f"{self.path(name)}/{(missing or [DCP_METADATA])[0]} is missing from the checkpoint")
        return files


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """A whole checkpoint to resume from, and the sha256 of each of its files that its run signed
    ({} for a full checkpoint, which is loaded with weights_only instead)."""

    path: str
    digests: dict = dataclasses.field(default_factory=dict)


def resume_checkpoint(save_folder: str) -> Optional[ResumePoint]:
    """The newest whole checkpoint in `save_folder` (at or before the one `latest` names), or None.
    A sharded one must be signed by this run; its shards' digests are then trusted when loaded.
    A sharded save without its manifest (killed while saving) is skipped, saying so."""
    folder = SaveFolder(save_folder)
    latest = folder.latest_batch()
    if latest is None:
        return None
    candidates = sorted(((b, n) for b, n in folder.checkpoint_batches().items() if b <= latest), reverse=True)
    for _, name in candidates:
        if name.endswith(".pt"):
            return ResumePoint(folder.path(name))
        files = folder.signed_files(name, folder.run_key())
        if files is not None:
            return ResumePoint(folder.path(name), files)
        print(f"Skipping {folder.path(name)}: it has no {MANIFEST}, so its save did not finish.", file=sys.stderr)
    return None


def build_checkpoint_saver(cfg: CheckpointConfig) -> CheckpointSaver:
    """From the run's `checkpoint:` section."""
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
        upload_timeout_in_seconds=cfg.upload_timeout,
        keep=cfg.keep,
        keep_every=cfg.keep_every,
    )


# Besides tensors, a Composer checkpoint pickles timestamps (timedelta), numpy's RNG state (a
# uint32 array) and the torch version: plain data. Anything else is refused unless trusted.
SAFE_GLOBALS = [datetime.timedelta, np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct, TorchVersion]
TRUST_ENV = "CLIPSTREAM_TRUST_CHECKPOINTS"


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, or holds objects that would run code when loaded."""


SHARDED_REFUSAL = (
    "is part of a sharded checkpoint, which torch.distributed.checkpoint unpickles, and this run did not "
    "sign it. Set checkpoint.trust=true (eval: trust=true) if you trust it."
)
# The digests Composer's validator checks: {file name: sha256} of the sharded checkpoint being
# resumed, as JSON (Composer calls the validator by name, so it reads them from the environment).
SIGNED_DIGESTS_ENV = "CLIPSTREAM_SIGNED_DIGESTS"


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
            "If you trust this checkpoint, set checkpoint.trust=true (eval: trust=true)."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is corrupt or truncated, so it was not loaded: {err}") from None


@functools.cache
def _digest_of_unchanged_file(path: str, size: int, mtime_ns: int) -> str:
    """A documented cache: Composer validates a shard at each of its reads; each file is hashed once
    per process (while its size and time stay those it had)."""
    return file_digest(path)


def validate_checkpoint(path, specs=None) -> bool:
    """Composer's CHECKPOINT_VALIDATION_FUNCTION: runs before every checkpoint load, with what
    guard_checkpoint_loading put in the environment."""
    trust = os.environ.get(TRUST_ENV) == "1"
    # Composer passes byte ranges (specs) for .distcp shards, and the sharded .metadata file.
    if specs is not None or str(path).endswith(DCP_METADATA):
        if trust:
            return True
        name, signed = os.path.basename(str(path)), json.loads(os.environ.get(SIGNED_DIGESTS_ENV) or "{}")
        if name not in signed:
            raise CheckpointError(f"{path} {SHARDED_REFUSAL}")
        stat = os.stat(path)
        if _digest_of_unchanged_file(str(path), stat.st_size, stat.st_mtime_ns) != signed[name]:
            raise CheckpointError(f"{path} does not match the digest its run signed for it: corrupt, or replaced")
        return True
    read_checkpoint(str(path), trust)
    return True


def guard_checkpoint_loading(trust: bool, resume: Optional[ResumePoint] = None) -> None:
    """Make Composer check every checkpoint with `validate_checkpoint` before it loads one: a sharded
    one only against the digests `resume` carries (signed by the run being resumed), unless `trust`."""
    os.environ["CHECKPOINT_VALIDATION_FUNCTION"] = f"{__name__}.validate_checkpoint"
    os.environ[TRUST_ENV] = "1" if trust else "0"
    os.environ[SIGNED_DIGESTS_ENV] = json.dumps(resume.digests if resume else {})


MODEL_KEYS = "state.model."  # where a Composer checkpoint keeps the model (DCP flattens nested keys with dots)


def _listable(path: str) -> bool:
    return not is_remote(path) or path.startswith("s3://")


def is_sharded_checkpoint(path: str) -> bool:
    """A sharded checkpoint's folder (it holds DCP's .metadata), local or in an S3 bucket."""
    if not _listable(path):
        return False
    folder, name = SaveFolder(os.path.dirname(path.rstrip("/"))), os.path.basename(path.rstrip("/"))
    return folder.read(f"{name}/{DCP_METADATA}") is not None


def is_save_folder(path: str) -> bool:
    """A run's save folder (it has a `latest` pointer), local or in an S3 bucket."""
    return _listable(path) and SaveFolder(path.rstrip("/")).latest_batch() is not None


def read_checkpoint_model(path: str, trust: bool = False) -> dict:
    """The Composer model state ({key: tensor}) of a checkpoint, local or remote: a full checkpoint
    file, or a sharded checkpoint's folder gathered on this one process. A sharded one must be signed
    by the key of the save folder it sits in (a copy that is corrupt, half-uploaded or mixed from
    several saves is refused) unless `trust`."""
    folder, name = SaveFolder(os.path.dirname(path.rstrip("/"))), os.path.basename(path.rstrip("/"))
    if not is_sharded_checkpoint(path):
        if not is_remote(path):
            return read_checkpoint(path, trust)["state"]["model"]
        with tempfile.TemporaryDirectory() as staging:
            get_file(path, os.path.join(staging, name))
            return read_checkpoint(os.path.join(staging, name), trust)["state"]["model"]
    signed = None if trust else folder.signed_files(name, folder.run_key())
    if signed is None and not trust:
        raise CheckpointError(f"{folder.path(name)} has no {MANIFEST}: its save did not finish")
    with tempfile.TemporaryDirectory() as staging:
        local = os.path.join(folder.folder, name) if not folder.remote else staging
        for file in folder.names(name) if folder.remote else []:
            folder.client.download_file(folder.bucket, f"{folder.prefix}/{name}/{file}", os.path.join(staging, file))
        for file, digest in (signed or {}).items():
            if file_digest(os.path.join(local, file)) != digest:
                raise CheckpointError(f"{folder.path(name)}/{file} does not match the digest its run signed for it")
        reader = dcp.FileSystemReader(local)
        model = {
            key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in reader.read_metadata().state_dict_metadata.items()
            if key.startswith(MODEL_KEYS) and isinstance(meta, TensorStorageMetadata)
        }
        dcp.load(model, storage_reader=reader, no_dist=True)
        return {key.removeprefix(MODEL_KEYS): value for key, value in model.items()}
