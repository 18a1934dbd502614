"""Composer's CheckpointSaver, with what a run on many nodes needs: uploads in threads that are
checked every half second, every way an upload can fail turned into one CheckpointUploadError, a
signed manifest after each sharded save, and retention in the save folder, local or in the bucket.
The `latest` pointer moves only once every rank's files have landed.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

from botocore.exceptions import BotoCoreError, ClientError
from composer.callbacks import CheckpointSaver
from composer.utils import dist, parse_uri

from pipeline.checkpoint.folder import (
    DCP_METADATA,
    FILENAME,
    LATEST,
    MANIFEST,
    SaveFolder,
    file_digest,
    signed_manifest,
)
from pipeline.common import storage
from pipeline.common.storage import is_remote
from pipeline.compat.composer_uploads import threads_for_upload_processes
from pipeline.config.schema import CheckpointConfig

UPLOAD_POLL_SECONDS = 0.5
# Composer's CheckpointSaver has no public argument for its wait between checks that an upload
# landed (30 s); tests/test_layout.py fails loudly if this private name disappears.
UPLOAD_POLL_ATTRIBUTE = "_symlink_upload_wait_before_next_try_in_seconds"


class CheckpointUploadError(RuntimeError):
    """A checkpoint did not reach the object store (unreachable, refused, or timed out)."""


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
            storage.upload_file(path, folder.path(f"{os.path.basename(local_checkpoint)}/{MANIFEST}"))

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
