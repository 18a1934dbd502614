"""A source's URL list -> the deduplicated, filtered list img2dataset downloads (Spark).

Runs before any download, so what it drops costs no bandwidth. Every input row ends written to the
list or counted under one reason: filtered_by_where, caption_too_short, duplicate_url (the first
occurrence in file order is kept). The list is written once; a re-run reuses it, which keeps
img2dataset's shard numbering, and so its incremental resume, stable.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

from data_prep.sources import SourceConfig
from pipeline.common.storage import exists, is_remote, local_file_stats, read_json, write_json

COUNTS_FILE = "counts.json"
LIST_FOLDER = "url_list"
# MDS column types -> the Spark types the URL list's extra columns are cast to.
SPARK_TYPES = {"int32": "int", "int64": "bigint", "float32": "float", "float64": "double", "str": "string"}
COCO_COLUMNS = ("url", "caption", "captions")
LATER_SETTINGS = ("path", "image_column", "caption_columns", "noisy_captions")
AFTER_DOWNLOAD = ("min_image_size", "dedup_image_hash", "clip_score", "dedup_semantic")


class SourceError(ValueError):
    """A URL list that cannot be used as the sources YAML describes it."""


def coco_captions_table(name: str, path: str, extra_columns: dict, min_caption_chars: int) -> list:
    """Rows of a COCO captions JSON: url (images[].coco_url), captions (a json list of the image's
    captions long enough to keep), caption (the first; empty when none is, so the row is counted)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key in ("images", "annotations"):
        if key not in data:
            raise SourceError(f"source '{name}': {path} is not a COCO captions file: it has no '{key}' key")
    by_image: dict = {}
    for i, annotation in enumerate(data["annotations"]):
        for key in ("image_id", "caption"):
            if key not in annotation:
                raise SourceError(f"source '{name}': {path}: annotations[{i}] has no '{key}'")
        by_image.setdefault(annotation["image_id"], []).append(annotation["caption"])
    rows = []
    for i, image in enumerate(data["images"]):
        for key in ("id", "coco_url", *extra_columns):
            if key not in image:
                raise SourceError(f"source '{name}': {path}: images[{i}] has no '{key}'")
        captions = [c.strip() for c in by_image.get(image["id"], []) if len(c.strip()) >= min_caption_chars]
        rows.append(
            {
                "url": image["coco_url"],
                "caption": captions[0] if captions else "",
                "captions": json.dumps(captions),
                **{col: image[col] for col in extra_columns},
            }
        )
    return rows


def check_url_list_exists(name: str, source: SourceConfig) -> None:
    """Before Spark starts: a local URL list, or one in S3-compatible storage, must be there."""
    path = source.input
    scheme, _, rest = path.partition("://") if is_remote(path) else ("", "", path)
    if scheme in ("s3", "s3a"):
        try:
            found = exists(f"s3://{rest}")
        except Exception as err:  # noqa: BLE001 - boto3's errors: no endpoint, no bucket, no access
            raise SourceError(f"source '{name}': cannot look up the URL list {path}: {_first_line(err)}") from None
    else:
        found = scheme != "" or os.path.exists(path)  # other stores: Spark finds out
    if not found:
        raise SourceError(f"source '{name}': the URL list {path} does not exist")


def read_url_list(spark, name: str, source: SourceConfig, held_rows=None):
    """The URL list as a DataFrame with url, caption and the extra columns (renamed, cast). Reads
    the schema (a COCO file whole), checks the columns and `where:`, and reads no rows.
    For a held source, `held_rows` (data_prep/held.py's read_rows) stand for the list."""
    from pyspark.sql import functions as F

    fmt, path = source.input_format, source.input
    try:
        if held_rows is not None:
            url_col, caption_col = "url", "caption"
            frame = held_rows
        elif fmt == "coco_captions":
            url_col, caption_col = "url", "caption"
            frame = spark.createDataFrame(
                coco_captions_table(name, path, source.extra_columns, source.filters.min_caption_chars)
            )
        elif fmt == "parquet":
            url_col, caption_col = source.url_col, source.caption_col
            frame = spark.read.parquet(path)
        elif fmt in ("csv", "tsv"):
            url_col, caption_col = source.url_col, source.caption_col
            frame = spark.read.options(header=True, sep="\t" if fmt == "tsv" else ",").csv(path)
        else:  # jsonl (sources.py checks the format's name)
            url_col, caption_col = source.url_col, source.caption_col
            frame = spark.read.json(path)
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 - Spark's errors are Java exceptions in disguise
        raise SourceError(f"source '{name}': cannot read the URL list {path} as {fmt}: {_first_line(err)}") from None
    needed = [url_col, caption_col, *source.carried_columns]
    missing = [col for col in needed if col not in frame.columns]
    if missing:
        raise SourceError(
            f"source '{name}': the URL list {path} has no column {', '.join(map(repr, missing))} "
            f"(its columns: {', '.join(frame.columns)}); set url_col / caption_col / extra_columns / caption_columns"
        )
    if source.filters.where:
        try:
            _ = frame.select(F.expr(source.filters.where)).schema  # resolves column names, reads nothing
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"source '{name}': filters.where {source.filters.where!r}: {_first_line(err)}") from None
    columns = [F.col(url_col).cast("string").alias("url"), F.col(caption_col).cast("string").alias("caption")]
    columns += [
        F.col(col).cast(SPARK_TYPES.get(kind, "string")).alias(col) for col, kind in source.carried_columns.items()
    ]
    coco = ["captions"] if fmt == "coco_captions" else []
    columns += map(F.col, coco)
    # once each: a column selected twice would be two columns once one of them is rewritten (noisy_captions)
    keep_for_where = [c for c in frame.columns if c not in {url_col, caption_col, *source.carried_columns, *coco}]
    frame = frame.select(*columns, *map(F.col, keep_for_where))
    return frame if "_row" in frame.columns else frame.withColumn("_row", F.monotonically_increasing_id())


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def mark_rows(frame, source: SourceConfig):
    """Adds `_reason`: null for rows to download, else why the row is dropped before download."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    filters = source.filters
    reason = F.lit(None).cast("string")
    if filters.where:
        reason = F.when(~F.coalesce(F.expr(filters.where), F.lit(False)), "filtered_by_where").otherwise(reason)
    caption_chars = F.length(F.trim(F.coalesce(F.col("caption"), F.lit(""))))
    reason = F.when(reason.isNull() & (caption_chars < filters.min_caption_chars), "caption_too_short").otherwise(
        reason
    )
    frame = frame.withColumn("_reason", reason)
    if filters.dedup_url:  # rows without a URL (an image folder's) are not duplicates of each other
        first = Window.partitionBy("url").orderBy(F.col("_reason").isNotNull(), "_row")
        duplicate = F.col("_reason").isNull() & F.col("url").isNotNull() & (F.row_number().over(first) > 1)
        frame = frame.withColumn("_reason", F.when(duplicate, "duplicate_url").otherwise(F.col("_reason")))
    return frame


def fingerprint(source: SourceConfig) -> dict:
    """What the prepared list depends on: the source's settings (but the filters that run after the
    download) and its URL files' sizes and times."""
    settings = {k: v for k, v in dataclasses.asdict(source).items() if k != "out"}
    # Settings added since lists were first prepared, left out while unset: a list prepared before them stays valid.
    settings = {k: v for k, v in settings.items() if not (k in LATER_SETTINGS and v in (None, []))}
    # Filters applied after the download don't change the list: changing them downloads nothing again.
    settings["filters"] = {k: v for k, v in settings["filters"].items() if k not in AFTER_DOWNLOAD}
    return {"settings": settings, "files": local_file_stats(source.input)}


class PreparedList(NamedTuple):
    folder: str  # of the list to download
    counts: dict  # rows before download, by reason
    reused: bool  # prepared by an earlier build from the same files and settings


def prepare_url_list(spark, name: str, source: SourceConfig, source_dir: str, frame=None) -> PreparedList:
    """The list to download of a source. A list prepared from the
    same files and settings is reused; otherwise it is prepared again from `frame` (read_url_list's,
    read here if not given), and the caller must then start that source's download again, since
    img2dataset numbers its shards by list position."""
    list_dir = os.path.join(source_dir, LIST_FOLDER)
    counts_path = os.path.join(source_dir, COUNTS_FILE)
    current = fingerprint(source)
    if exists(counts_path):
        saved = read_json(counts_path)
        if saved.pop("fingerprint", None) == current:
            return PreparedList(list_dir, saved, True)
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    frame = frame if frame is not None else read_url_list(spark, name, source)
    marked = mark_rows(frame, source).persist(StorageLevel.DISK_ONLY)
    counts = {row["_reason"] or "to_download": row["count"] for row in marked.groupBy("_reason").count().collect()}
    counts["urls"] = sum(counts.values())
    kept = marked.filter(F.col("_reason").isNull())
    coco = ["captions"] if source.input_format == "coco_captions" else []
    if source.noisy_captions is not None:
        kept = swap_captions(kept, source.noisy_captions, ["caption", *source.caption_columns, *coco])
    # A held source's rows, images and all, are already in the work folder: its list is their keys.
    keep = ["key"] if source.held else ["url", "caption", *source.recorded_columns, *coco]
    (
        kept.orderBy("_row")  # file order: the shard numbering img2dataset resumes by
        .select(*keep)
        .write.mode("overwrite")
        .parquet(list_dir)
    )
    marked.unpersist()
    write_json(counts_path, {**counts, "fingerprint": current})  # last: its presence means the list is complete
    return PreparedList(list_dir, counts, False)


def swap_captions(rows, noisy, caption_columns: list):
    """`rows` with the captions of exactly round(share * rows) of them, chosen by a seeded hash of
    their URL, passed on among themselves (sources.NoisyCaptionsConfig), recorded per row. One
    ordering of all the rows: a tool for experiments, not for billions of rows."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    chosen = round(noisy.share * rows.count())
    order = Window.orderBy(F.xxhash64(F.lit(noisy.seed), "url"), "_row")
    rows = rows.withColumn("_rank", F.row_number().over(order))
    swapped = F.col("_rank") <= chosen
    passed_on = Window.orderBy("_rank")
    rows = rows.withColumn("original_caption", F.col("caption"))
    for column in caption_columns:  # each chosen row takes the next chosen row's; the last, the first's
        first = F.first(F.when(F.col("_rank") == 1, F.col(column)), ignorenulls=True).over(
            passed_on.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
        )
        following = F.when(F.col("_rank") == chosen, first).otherwise(F.lead(column).over(passed_on))
        rows = rows.withColumn(column, F.when(swapped, following).otherwise(F.col(column)))
    return rows.withColumn("caption_swapped", swapped.cast("int")).drop("_rank")
