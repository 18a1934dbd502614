"""A run's save folder, local or in a bucket: its checkpoints by batch, the `latest` pointer, the
run's signing key and the signed manifest of each sharded checkpoint.

Composer's CheckpointSaver writes the checkpoints: a full one is one file from rank 0; a sharded
one is a torch.distributed.checkpoint (DCP) folder, `ep0-ba20/`, with each rank's
`__<rank>_0.distcp` and rank 0's `.metadata`. DCP's `.metadata` and the non-tensor parts of each
shard are pickles: after every sharded save each rank hashes its own shard and rank 0 writes
`manifest.json` (the sha256 of every file, HMAC-signed with the run's key, `checkpoints.key` in the
save folder) before the pointer can move (pipeline/checkpoint/saver.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from typing import Optional

from pipeline.common import storage
from pipeline.common.storage import is_remote

FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST = "latest-rank{rank}.pt"
# ep0-ba20-rank0.pt (full, rank 0's file) or ep0-ba20 (a sharded checkpoint's folder)
CHECKPOINT_NAME = re.compile(r"^ep\d+-ba(\d+)(-rank0\.pt)?$")
DCP_METADATA = ".metadata"
MANIFEST = "manifest.json"  # in each sharded checkpoint's folder
KEY_FILE = "checkpoints.key"  # the run's signing key, in the save folder next to config.yaml


class CheckpointError(ValueError):
    """A checkpoint that is corrupt, truncated, unsigned, or holds objects that would run code when loaded."""


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
        self.folder = folder.rstrip("/")
        self.remote = is_remote(folder)

    def path(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def names(self, sub: str = "") -> list:
        """What is directly in the folder, or in its sub-folder `sub`: files and sub-folders."""
        return storage.list_names(self.path(sub) if sub else self.folder)

    def read(self, name: str) -> Optional[bytes]:
        """A file's bytes (name relative to the folder), or None when it is not there."""
        return storage.read_bytes(self.path(name))

    def run_key(self, create: bool = False) -> Optional[bytes]:
        """The run's signing key (made by its rank 0 at its first sharded save)."""
        key = self.read(KEY_FILE)
        if key is not None or not create:
            return key
        key = secrets.token_bytes(32)
        storage.write_bytes(self.path(KEY_FILE), key)
        return key

    def checkpoint_batches(self) -> dict:
        """{batch: name} of every checkpoint."""
        return {int(m.group(1)): name for name in self.names() if (m := CHECKPOINT_NAME.search(name))}

    def latest_batch(self) -> Optional[int]:
        """The batch of the checkpoint `latest` names (a symlink locally, a .symlink object in a bucket)."""
        latest = LATEST.format(rank=0)
        if not self.remote:
            path = self.path(latest)
            target = os.readlink(path) if os.path.islink(path) else None
        else:
            body = self.read(f"{latest}.symlink")
            target = None if body is None else body.decode().strip()
        match = CHECKPOINT_NAME.search(os.path.basename((target or "").rstrip("/")))
        return int(match.group(1)) if match else None

    def delete(self, batch: int) -> None:
        pattern = re.compile(rf"^ep\d+-ba{batch}(-rank\d+\.pt)?$")  # every rank's file, or the sharded folder
        for name in (n for n in self.names() if pattern.match(n)):
            storage.delete(self.path(name))

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
