"""Checkpoints loaded safely: never a pickle that runs code, unless the user trusts it.

A full checkpoint is loaded with torch.load's weights_only and the few plain types Composer
pickles. A sharded one (DCP) is unpickled only if each file's sha256 is one its run signed
(pipeline/checkpoint/folder.py): Composer calls `validate_checkpoint` before every read, by name,
so `guard_checkpoint_loading` puts the trust setting and the signed digests in the environment.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pickle
import tempfile
import zipfile
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

# numpy has no public name for the function it pickles arrays with; tests/test_layout.py fails
# loudly if numpy stops pickling with this one.
from numpy._core.multiarray import _reconstruct
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.torch_version import TorchVersion

from pipeline.checkpoint.folder import (
    DCP_METADATA,
    MANIFEST,
    CheckpointError,
    SaveFolder,
    file_digest,
    is_sharded_checkpoint,
)
from pipeline.checkpoint.resume import ResumePoint
from pipeline.common import storage
from pipeline.common.storage import is_remote

# Besides tensors, a Composer checkpoint pickles timestamps (timedelta), numpy's RNG state (a
# uint32 array) and the torch version: plain data. Anything else is refused unless trusted.
SAFE_GLOBALS = [datetime.timedelta, np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct, TorchVersion]
TRUST_ENV = "CLIPSTREAM_TRUST_CHECKPOINTS"
SHARDED_REFUSAL = (
    "is part of a sharded checkpoint, which torch.distributed.checkpoint unpickles, and this run did not "
    "sign it. Set checkpoint.trust=true (eval: trust=true) if you trust it."
)
# The digests Composer's validator checks: {file name: sha256} of the sharded checkpoint being
# resumed, as JSON (Composer calls the validator by name, so it reads them from the environment).
SIGNED_DIGESTS_ENV = "CLIPSTREAM_SIGNED_DIGESTS"
MODEL_KEYS = "state.model."  # where a Composer checkpoint keeps the model (DCP flattens nested keys with dots)


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
            storage.download_file(path, os.path.join(staging, name))
            return read_checkpoint(os.path.join(staging, name), trust)["state"]["model"]
    signed = None if trust else folder.signed_files(name, folder.run_key())
    if signed is None and not trust:
        raise CheckpointError(f"{folder.path(name)} has no {MANIFEST}: its save did not finish")
    with tempfile.TemporaryDirectory() as staging:
        local = os.path.join(folder.folder, name) if not folder.remote else staging
        for file in folder.names(name) if folder.remote else []:
            storage.download_file(folder.path(f"{name}/{file}"), os.path.join(staging, file))
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
