"""img2dataset parquet output -> one filtered, deduplicated MDS stream, plus a summary JSON.

Every row of the URL list ends in exactly one bucket of the summary: written, or one of the
failure / drop reasons, so nothing is silently lost.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections import Counter
from glob import glob

import pyarrow.parquet as pq
from PIL import Image
from streaming import MDSWriter
from streaming.base.storage.upload import CloudUploader

from data_prep.sources import SourceConfig

# The columns every stream has; a source's extra_columns are added to these.
BASE_COLUMNS = {
    "image": "bytes",  # JPEG bytes as img2dataset encoded them (decoded at training time)
    "caption": "str",
    "source": "str",
    "key": "str",
    "url": "str",
    "width": "int32",
    "height": "int32",
}
SUMMARY_FILE = "summary.json"


def _decodes(image_bytes: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any decoder error means "undecodable"
        return False


def _drop_reason(row: dict, source: SourceConfig, seen_urls: set, seen_hashes: set) -> str | None:
    """Why this downloaded row is not written, or None to write it."""
    filters = source.filters
    if row["status"] != "success":
        return row["status"]  # failed_to_download / failed_to_resize, as img2dataset says
    if len((row["caption"] or "").strip()) < filters.min_caption_chars:
        return "caption_too_short"
    if min(row["width"], row["height"]) < filters.min_image_size:
        return "image_too_small"
    if filters.dedup_url and row["url"] in seen_urls:
        return "duplicate_url"
    if filters.dedup_image_hash and row["sha256"] in seen_hashes:
        return "duplicate_image"
    if not _decodes(row["jpg"]):
        return "undecodable"
    return None


def to_mds(name: str, source: SourceConfig, download_folder: str) -> dict:
    """Write the MDS stream for one downloaded source to `source.out`; returns the summary."""
    shards = sorted(glob(os.path.join(download_folder, "*.parquet")))
    if not shards:
        raise FileNotFoundError(f"source '{name}': no img2dataset parquet output in {download_folder}")
    columns = {**BASE_COLUMNS, **source.extra_columns}
    counts: Counter = Counter()
    seen_urls: set = set()
    seen_hashes: set = set()
    is_local = "://" not in source.out
    if is_local and os.path.isdir(source.out):
        shutil.rmtree(source.out)  # a rebuild replaces the stream; MDS shards can't be appended to
    with MDSWriter(out=source.out, columns=columns, exist_ok=True) as writer:
        for shard in shards:
            for row in pq.read_table(shard).to_pylist():
                counts["urls"] += 1
                reason = _drop_reason(row, source, seen_urls, seen_hashes)
                if reason is not None:
                    counts[reason] += 1
                    continue
                seen_urls.add(row["url"])
                seen_hashes.add(row["sha256"])
                sample = {
                    "image": row["jpg"],
                    "caption": row["caption"].strip(),
                    "source": name,
                    "key": row["key"],
                    "url": row["url"],
                    "width": row["width"],
                    "height": row["height"],
                }
                sample.update({col: row[col] for col in source.extra_columns})
                writer.write(sample)
                counts["written"] += 1
    summary = {"source": name, "out": source.out, **counts}
    _write_summary(source.out, summary)
    return summary


def _write_summary(out: str, summary: dict) -> None:
    """Put summary.json next to the shards, locally or in object storage."""
    if "://" not in out:
        with open(os.path.join(out, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        return
    with tempfile.TemporaryDirectory() as staging:
        with open(os.path.join(staging, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        CloudUploader.get(out=(staging, out), exist_ok=True).upload_file(SUMMARY_FILE)
