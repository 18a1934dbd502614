"""Sources whose images users already hold: webdataset tars, parquet with image bytes, image folders.

Nothing is downloaded. Spark executors read the input shards (a tar, a parquet file, or a slice of
an image folder per task; a tar is streamed member by member, never unpacked to disk) into rows of
img2dataset's parquet output: key, url, caption, jpg (the image's bytes as held), status, width,
height, sha256, plus `_json`, the sample's other fields (a tar's `.json`, the other parquet or
metadata columns), which `read_rows` turns into columns. From there a held source is built as a
downloaded one: `filters.where` on those columns, the caption and URL filters, image-hash and
semantic dedup, the CLIP score, decontamination.

Every sample is written or counted. A member that does not decode is `corrupt_image`; a sample with
no image member is `no_image`; a tar that ends early is read up to where it breaks, and the samples
lost are `truncated_tar` (those its img2dataset parquet lists as downloaded, or the one sample cut).
An img2dataset parquet beside a tar also gives the rows that failed to download, with their status,
so a build of img2dataset's webdataset output counts what a build of the URL list counts.

Each input shard becomes `<work_dir>/img2dataset/<source>/<shard>.parquet` and then its
`_stats.json`, as img2dataset writes them: a killed build redoes only the shards without one.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import itertools
import json
import os
import tarfile
from collections.abc import Iterator
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.common.storage as storage
from data_prep.sources import SourceConfig
from data_prep.url_lists import SourceError
from pipeline.common.images import open_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # an image folder's, as Hugging Face's imagefolder
IMAGES_PER_TASK = 10_000  # an image folder's slice per Spark task
SAMPLES_CHECKED = 100  # a column none of a tar's first samples has is a typo in the YAML
ROWS = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("jpg", pa.binary()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("_json", pa.string()),
        ("_row", pa.int64()),
    ]
)
FINGERPRINT = "held.json"


def input_shards(name: str, source: SourceConfig) -> list:
    """The input of each task: a tar's or parquet file's path, or (for an image folder) a list of
    (image path, key, caption, other fields). Sorted: shard numbers stay the same between runs."""
    path = source.path
    if source.input_format == "imagefolder":
        return _image_folder_slices(name, path, source.caption_col)
    suffix = ".tar" if source.input_format == "webdataset" else ".parquet"
    try:
        names = storage.list_names(path)
    except Exception as err:  # noqa: BLE001 - a bucket's errors: no endpoint, no bucket, no access
        raise SourceError(f"source '{name}': cannot list {path}: {str(err).splitlines()[0]}") from None
    shards = [os.path.join(path, n) for n in sorted(names) if n.endswith(suffix)]
    if not shards:
        raise SourceError(f"source '{name}': no {suffix} files in {path}")
    return shards


def _image_folder_slices(name: str, folder: str, caption_col: str) -> list:
    if storage.is_remote(folder) or not os.path.isdir(folder):
        raise SourceError(f"source '{name}': {folder} is not a local folder (imagefolder reads local folders)")
    images = sorted(
        os.path.relpath(os.path.join(parent, file), folder)
        for parent, _, files in os.walk(folder)
        for file in files
        if file.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise SourceError(f"source '{name}': no images in {folder}")
    metadata = _folder_metadata(name, folder, caption_col)
    rows = []
    for image in images:
        if metadata is not None:
            fields = dict(metadata.get(image, {}))
            caption = fields.pop(caption_col, None)
        else:
            fields, text = {}, os.path.join(folder, os.path.splitext(image)[0] + ".txt")
            caption = open(text, encoding="utf-8").read() if os.path.isfile(text) else None  # noqa: SIM115
        rows.append((os.path.join(folder, image), os.path.splitext(image)[0], caption, fields))
    return [rows[start : start + IMAGES_PER_TASK] for start in range(0, len(rows), IMAGES_PER_TASK)]


def _folder_metadata(name: str, folder: str, caption_col: str) -> Optional[dict]:
    """{image path relative to the folder: its row} from metadata.jsonl / .csv (file_name column)."""
    for file in METADATA_FILES:
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", newline="") as f:
            rows = (
                [json.loads(line) for line in f if line.strip()] if file.endswith(".jsonl") else list(csv.DictReader(f))
            )
        for column in ("file_name", caption_col):
            if rows and column not in rows[0]:
                raise SourceError(
                    f"source '{name}': {path} has no '{column}' column (its columns: {', '.join(rows[0])})"
                )
        return {os.path.normpath(row["file_name"]): row for row in rows}
    return None


def check_source(name: str, source: SourceConfig) -> None:
    """Before Spark starts: the input shards exist, the first tar holds an image, and the columns
    the YAML names are found (in the .json of the first tar's first samples, a parquet's schema, a
    metadata file's columns)."""
    shards = input_shards(name, source)
    wanted = list(source.carried_columns)
    if source.input_format == "webdataset":
        first = list(itertools.islice((s for s in _tar_samples(shards[0]) if "image" in s), SAMPLES_CHECKED))
        if not first:
            raise SourceError(f"source '{name}': {shards[0]} holds no image ({', '.join(IMAGE_EXTENSIONS)}) member")
        columns = list(dict.fromkeys(field for sample in first for field in json.loads(sample.get("json", b"{}"))))
        where = f"the .json of the first {len(first)} samples of {shards[0]}"
    elif source.input_format == "parquet":
        columns = _parquet_file(shards[0]).schema_arrow.names
        wanted, where = [source.image_column, source.caption_col, *wanted], shards[0]
    else:
        columns, where = list(shards[0][0][3]), f"the metadata of {source.path}"
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise SourceError(
            f"source '{name}': {where} has no {', '.join(map(repr, missing))} "
            f"(it has: {', '.join(columns) or 'nothing'}); "
            "set image_column / caption_col / extra_columns / caption_columns"
        )


def ingest(spark, name: str, source: SourceConfig, folder: str, show=None) -> dict:
    """Every input shard of the source as a parquet of rows in `folder` (those done before are kept
    when the source's input and settings are the same); {shards_done_before, shards_read}."""
    from data_prep.download import finished_shards

    shards = input_shards(name, source)
    fingerprint = {
        "format": source.input_format,
        "path": source.path,
        "caption_col": source.caption_col,
        "url_col": source.url_col,
        "image_column": source.image_column,
        "inputs": shards if source.input_format != "imagefolder" else [[row[:3] for row in s] for s in shards],
        "files": storage.local_file_stats(source.path),  # sizes and times: a tar replaced is read again
    }
    if storage.read_bytes(os.path.join(folder, FINGERPRINT)) != json.dumps(fingerprint).encode():
        storage.delete(folder)  # other data or settings: the shards read before are not these
        storage.write_text(os.path.join(folder, FINGERPRINT), json.dumps(fingerprint))
    done = {os.path.basename(path).removesuffix(".parquet") for path in finished_shards(folder)}
    todo = [(number, shard) for number, shard in enumerate(shards) if shard_name(number) not in done]
    if show:
        show(f"{len(done)}/{len(shards)} shards read before")
    if todo:
        settings = (source.input_format, source.caption_col, source.url_col, source.image_column)
        jobs = spark.sparkContext.parallelize(todo, len(todo))
        jobs.foreach(lambda job: write_shard(folder, job[0], job[1], *settings))
    return {"shards_done_before": len(done), "shards_read": len(todo)}


def shard_name(number: int) -> str:
    return f"{number:05d}"


def write_shard(folder: str, number: int, shard, input_format: str, caption_col: str, url_col: str, image_column):
    """One task: an input shard's rows -> <shard>.parquet, then <shard>_stats.json (its counts)."""
    if input_format == "webdataset":
        rows = _tar_rows(shard)
    elif input_format == "parquet":
        rows = _parquet_rows(shard, caption_col, url_col, image_column)
    else:
        rows = _folder_rows(shard)
    rows = sorted(rows, key=lambda row: row["key"])  # img2dataset's keys: the URL list's order
    for position, row in enumerate(rows):  # keys unique in the source; _row: the order URL dedup keeps
        row.update(key=f"{shard_name(number)}/{row['key']}", _row=(number << 32) + position)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=ROWS), buffer)
    storage.write_bytes(os.path.join(folder, f"{shard_name(number)}.parquet"), buffer.getvalue())
    stats = {
        "input": shard if isinstance(shard, str) else f"{len(shard)} images",
        "count": len(rows),
        "status_dict": dict(collections.Counter(row["status"] for row in rows)),
    }
    storage.write_json(os.path.join(folder, f"{shard_name(number)}_stats.json"), stats)


def image_row(key: str, image: Optional[bytes], caption, url, fields: dict) -> dict:
    """A sample as img2dataset's parquet has it; an image that does not decode is corrupt_image."""
    row = {"key": key, "url": url, "caption": caption, "_json": json.dumps(fields, default=str)}
    if image is None:
        return {**row, "status": "no_image"}
    try:
        with open_image(image) as decoded:
            decoded.load()
            width, height = decoded.size
    except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for bad bytes
        return {
            **row,
            "status": "corrupt_image",
            "error_message": str(err).splitlines()[0] if str(err) else type(err).__name__,
        }
    return {
        **row,
        "jpg": image,
        "status": "success",
        "width": width,
        "height": height,
        "sha256": hashlib.sha256(image).hexdigest(),
    }


def _tar_samples(path: str) -> Iterator[dict]:
    """The samples of a webdataset tar, member by member: {key, image, txt, json}; a tar that ends
    early gives a last {key, truncated} (key: the sample it cut, or None)."""
    current = None
    with storage.open_read(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = os.path.split(member.name)
                    key, _, extension = base.partition(".")
                    key = os.path.join(directory, key)
                    data = tar.extractfile(member).read()
                    if current is None or current["key"] != key:
                        if current is not None:
                            yield current
                        current = {"key": key}
                    extension = extension.lower()
                    if extension in IMAGE_EXTENSIONS and "image" not in current:
                        current["image"] = data
                    elif extension in ("txt", "json"):
                        current[extension] = data
        except (tarfile.TarError, EOFError, OSError):  # the sample being read may have lost members
            yield {"key": current["key"] if current else None, "truncated": True}
            return
    if current is not None:
        yield current


def _tar_rows(path: str) -> list:
    samples = list(_tar_samples(path))
    shard = os.path.basename(path).removesuffix(".tar")
    beside = _img2dataset_rows(path.removesuffix(".tar") + ".parquet")
    rows, read = [], set()
    for sample in samples:
        if "truncated" in sample:
            continue
        fields = json.loads(sample["json"]) if "json" in sample else {}
        caption = sample["txt"].decode("utf-8") if "txt" in sample else fields.get("caption")
        rows.append(image_row(sample["key"], sample.get("image"), caption, fields.get("url"), _other(fields)))
        read.add(sample["key"])
    truncated = samples and "truncated" in samples[-1]
    for fields in beside:  # img2dataset's failures, and what a truncated tar lost
        if fields.get("status") != "success":
            rows.append(_failed_row(fields, fields.get("status") or "failed", fields.get("error_message")))
        elif truncated and fields.get("key") not in read:
            rows.append(_failed_row(fields, "truncated_tar", f"{shard}.tar ends before this sample"))
    if truncated and not beside:
        rows.append({"key": samples[-1]["key"] or "truncated", "status": "truncated_tar", "_json": "{}"})
    return rows


def _img2dataset_rows(path: str) -> list:
    """The rows of the parquet img2dataset writes beside each tar (every URL sent), or none."""
    data = storage.read_bytes(path)
    return pq.read_table(io.BytesIO(data)).to_pylist() if data is not None else []


def _failed_row(fields: dict, status: str, message) -> dict:
    return {
        "key": fields.get("key"),
        "url": fields.get("url"),
        "caption": fields.get("caption"),
        "status": status,
        "error_message": message,
        "_json": json.dumps(_other(fields), default=str),
    }


def _other(fields: dict) -> dict:
    """A sample's fields but those the row has as its own columns."""
    return {k: v for k, v in fields.items() if k not in ROWS.names}


def _parquet_rows(path: str, caption_col: str, url_col: str, image_column: str) -> list:
    stem, rows = os.path.basename(path).removesuffix(".parquet"), []
    for fields in (row for batch in _parquet_file(path).iter_batches(1000) for row in batch.to_pylist()):
        image = fields.pop(image_column)
        if isinstance(image, dict):  # Hugging Face's Image feature: {bytes, path}
            image = image.get("bytes")
        caption, url = fields.pop(caption_col), fields.pop(url_col, None)
        rows.append(image_row(f"{stem}/{len(rows):09d}", image, caption, url, _other(fields)))
    return rows


def _parquet_file(path: str) -> pq.ParquetFile:
    """A local parquet file read in place; a bucket's, downloaded into memory (parquet needs seeks)."""
    return pq.ParquetFile(io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path)


def _folder_rows(images: list) -> list:
    rows = []
    for path, key, caption, fields in images:
        with open(path, "rb") as f:
            rows.append(image_row(key, f.read(), caption, None, _other(fields)))
    return rows


def read_rows(spark, folder: str):
    """The rows read, their `_json` fields as columns (a field named like a row column is dropped).
    Lazy: the image bytes are read only where a query uses the `jpg` column."""
    from pyspark.sql import functions as F

    from data_prep.download import finished_shards

    frame = spark.read.parquet(*finished_shards(folder))
    from pyspark.sql.types import StructType

    inferred = spark.read.json(frame.select("_json").rdd.map(lambda row: row[0])).schema
    fields = StructType([field for field in inferred.fields if field.name not in ROWS.names])
    if fields.fields:
        frame = frame.withColumn("_fields", F.from_json("_json", fields)).select("*", "_fields.*").drop("_fields")
    return frame.drop("_json")


def kept_rows(spark, rows, prepared):
    """The `rows` (read_rows') of a held source that its prepared list (url_lists.prepare_url_list:
    the keys the URL-list filters kept) keeps; None when it keeps none."""
    if not prepared.counts.get("to_download"):
        return None
    return rows.join(spark.read.parquet(prepared.folder), "key", "left_semi")
