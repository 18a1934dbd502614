"""img2dataset parquet output -> filtered, image-deduplicated MDS streams (Spark), plus summaries.

Every downloaded row ends in one bucket: written, or img2dataset's failure status, image_too_small,
duplicate_image, eval_overlap (with `decontaminate:`), semantic_duplicate and low_clip_score (for a
source with `filters.clip_score`, whose score is then a column of the stream; data_prep/curation.py).
Images are not decoded again: img2dataset's `success` means its resizer decoded and re-encoded the
image (this project never passes its skip_reencode options), so a second decode
would only repeat that check. Decisions are made on narrow columns (key, sha256, sizes); the image
bytes move once, from img2dataset's parquet into `dataframe_to_mds`, one MDS folder per partition
and one merged index written last, so a killed conversion never leaves a stream that looks complete.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional, TextIO

from data_prep import curation
from data_prep.download import finished_shards
from data_prep.sources import SourceConfig, SourcesConfig
from data_prep.terminal import StageLine
from pipeline.common.storage import check_bucket, delete, is_remote, read_json, write_json

# The columns every stream has; a source's extra and caption columns (and a COCO source's captions) are added.
BASE_COLUMNS = {
    "image": "bytes",  # JPEG bytes as img2dataset encoded them (decoded at training time)
    "caption": "str",
    "source": "str",
    "key": "str",
    "url": "str",
    "width": "int32",
    "height": "int32",
    "sha256": "str",  # of the bytes downloaded (img2dataset's): decontamination against this stream matches it
}
SUMMARY_FILE = "summary.json"
# Per shard, written at build time and checked when training first reads the shard.
SHARD_HASHES = ["sha1", "xxh64"]


def mds_columns(source: SourceConfig) -> dict:
    columns = {**BASE_COLUMNS, **source.recorded_columns}
    if source.filters.clip_score is not None:
        columns["clip_score"] = "float32"
    if source.input_format == "coco_captions":
        columns["captions"] = "json"  # all of the image's captions; training picks one per epoch
    return columns


def mds_records(frame, name: str, columns: dict):
    """dataframe_to_mds's per-batch function (runs on the executors): pandas rows -> MDS samples."""
    for row in frame.to_dict("records"):
        sample = {col: row[col] for col in columns if col not in ("image", "source", "captions")}
        sample.update({col: "" for col, kind in columns.items() if kind == "str" and sample.get(col) is None})
        sample.update(image=row["jpg"], source=name, caption=row["caption"].strip(), url=row["url"] or "")
        if "captions" in columns:
            sample["captions"] = json.loads(row["captions"])
        yield sample


def downloaded_rows(spark, name: str, folder: str, expected: int):
    """img2dataset's output for one source, after checking that every URL sent has its row."""
    shards = finished_shards(folder)
    frame = spark.read.parquet(*shards) if shards else None
    found = frame.count() if frame is not None else 0
    if found != expected:
        raise RuntimeError(
            f"source '{name}': img2dataset returned {found} rows for {expected} URLs in {folder} "
            "(some shards failed). Run the same command again: finished shards are kept."
        )
    return frame


def decide(spark, frames: dict, cfg: SourcesConfig, scores: dict) -> tuple:
    """(one narrow DataFrame of (_source, key, _reason) for every downloaded row of every source,
    [eval overlaps]). `scores`: {source: clip_score.read_scores} for the sources scored."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    narrow = None
    for rank, (name, frame) in enumerate(frames.items()):
        filters = cfg.sources[name].filters
        reason = F.when(F.col("status") != "success", F.col("status")).when(
            F.least("width", "height") < filters.min_image_size, "image_too_small"
        )
        part = frame.select(
            F.lit(name).alias("_source"),
            F.lit(rank).alias("_rank"),
            F.lit(filters.dedup_image_hash).alias("_dedup"),
            "key",
            "sha256",
            reason.alias("_reason"),
        )
        narrow = part if narrow is None else narrow.unionByName(part)
    group = ["sha256"] if cfg.dedup_across_sources else ["sha256", "_source"]
    first = Window.partitionBy(*group).orderBy(F.col("_reason").isNotNull(), "_rank", "key")
    duplicate = F.col("_reason").isNull() & F.col("_dedup") & (F.row_number().over(first) > 1)
    narrow = narrow.withColumn("_reason", F.when(duplicate, "duplicate_image").otherwise(F.col("_reason")))
    return curate(spark, narrow.select("_source", "_rank", "key", "sha256", "_reason"), cfg, scores)


def curate(spark, narrow, cfg: SourcesConfig, scores: dict) -> tuple:
    """The decisions the CLIP-score stage's output makes (data_prep/curation.py), in their order."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    embeddings = {
        name: frame.select(F.lit(name).alias("_source"), "key", "image_embedding") for name, frame in scores.items()
    }
    overlaps = []
    if cfg.decontaminate is not None:
        clips = {name: cfg.sources[name].filters.clip_score for name in scores}
        found = curation.eval_overlaps(spark, narrow, embeddings, clips, cfg.decontaminate)
        overlaps = [row.asDict() for row in found.orderBy("_source", "key").collect()]
        narrow = curation.mark(narrow, found, "eval_overlap").persist(StorageLevel.DISK_ONLY)
    semantic = [name for name in scores if cfg.sources[name].filters.dedup_semantic is not None]
    if semantic:
        groups = [semantic] if cfg.dedup_across_sources else [[name] for name in semantic]
        for names in groups:
            rows = curation.candidates(
                narrow, functools.reduce(type(narrow).unionByName, (embeddings[n] for n in names))
            )
            dedup = cfg.sources[names[0]].filters.dedup_semantic
            found = curation.semantic_duplicates(rows, dedup, cfg.dedup_across_sources)
            narrow = curation.mark(narrow, found, "semantic_duplicate").persist(StorageLevel.DISK_ONLY)
    for name, frame in scores.items():
        low = curation.low_clip_scores(narrow, name, frame, cfg.sources[name].filters.clip_score)
        narrow = curation.mark(narrow, low, "low_clip_score")
    return narrow.select("_source", "key", "_reason"), overlaps


def write_stream(spark, name: str, source: SourceConfig, frame, keys, work_dir: str, scores=None) -> int:
    """dataframe_to_mds of the rows whose key is in `keys`; returns the samples in the merged index."""
    from streaming.base.converters import dataframe_to_mds

    check_bucket(source.out)
    delete(source.out)  # a rebuild replaces the stream; the merged index is written last
    from pyspark import StorageLevel

    # Sorted by key within each partition: the same streams on every run. Persisted, so that
    # dataframe_to_mds's emptiness check and its write share one shuffle of the image bytes.
    rows = frame.join(keys, "key", "left_semi")
    if scores is not None:  # the score becomes a column of the stream
        rows = rows.join(scores.select("key", "clip_score"), "key", "left")
    rows = rows.sortWithinPartitions("key").persist(StorageLevel.DISK_ONLY)
    columns = mds_columns(source)
    out = (
        (os.path.join(os.path.abspath(work_dir), "mds_parts", name), source.out)
        if is_remote(source.out)
        else source.out
    )
    if is_remote(source.out):
        delete(out[0])
    dataframe_to_mds(
        rows,
        merge_index=True,
        mds_kwargs={"out": out, "columns": columns, "compression": None, "hashes": SHARD_HASHES},
        udf_iterable=mds_records,
        udf_kwargs={"name": name, "columns": columns},
    )
    rows.unpersist()
    index = read_json(os.path.join(source.out, "index.json"))
    return sum(shard["samples"] for shard in index["shards"])


def convert(
    spark, cfg: SourcesConfig, downloads: dict, scores: Optional[dict] = None, terminal: Optional[TextIO] = None
) -> list:
    """{name: (img2dataset folder or held rows, URL-list counts)} -> one MDS stream and summary per source; a
    progress line per source on `terminal` (stdout if None). `scores`: {name: clip_score.read_scores}."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    frames = {  # a held source's rows come as a DataFrame (data_prep/held.py)
        name: downloaded_rows(spark, name, rows, counts.get("to_download", 0)) if isinstance(rows, str) else rows
        for name, (rows, counts) in downloads.items()
    }
    frames = {name: frame for name, frame in frames.items() if frame is not None}
    scores = {name: frame for name, frame in (scores or {}).items() if name in frames}
    decisions, overlaps = decide(spark, frames, cfg, scores) if frames else (None, [])
    decisions = decisions.persist(StorageLevel.DISK_ONLY) if decisions is not None else None
    found = decisions.groupBy("_source", "_reason").count().collect() if decisions is not None else []
    summaries = []
    for name, (_, url_counts) in downloads.items():
        source = cfg.sources[name]
        counts = {k: v for k, v in url_counts.items() if k != "to_download"}
        counts.update({row["_reason"] or "written": row["count"] for row in found if row["_source"] == name})
        line = StageLine("write", name, terminal)
        if counts.get("written"):
            line.show(f"{counts['written']} rows")
            keys = decisions.filter((F.col("_source") == name) & F.col("_reason").isNull()).select("key")
            written = write_stream(spark, name, source, frames[name], keys, cfg.work_dir, scores.get(name))
            if written != counts.get("written", 0):
                raise RuntimeError(
                    f"source '{name}': {written} samples in the MDS index, {counts.get('written')} expected"
                )
        line.done(f"{counts.get('written', 0)} rows written to {source.out}")
        summary = {"source": name, "out": source.out, "urls": counts.pop("urls"), "written": counts.pop("written", 0)}
        summary.update(sorted(counts.items()))
        if cfg.decontaminate is not None:  # each training row dropped, with the eval image it matched
            summary["eval_overlaps"] = [
                {k: v for k, v in o.items() if k != "_source"} for o in overlaps if o["_source"] == name
            ]
        write_json(os.path.join(source.out, SUMMARY_FILE), summary)
        summaries.append(summary)
    if decisions is not None:
        decisions.unpersist()
    return summaries
