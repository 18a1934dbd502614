"""Where a run resumes: the newest whole checkpoint in its save folder, local or in the bucket.

Composer's own autoresume looks in its local staging folder (and keeps a stale `./s3:/bucket/...`
copy), so the save folder itself is read here, and the Trainer loads what is found as its
load_path; DCP reshards model and optimizer state onto whatever world size loads it. What is
found is returned whole (the path and the digests its run signed): the loader is given those
digests, nothing is kept in a module.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

from pipeline.checkpoint.folder import MANIFEST, SaveFolder


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
