"""Small files and folders that may live locally or in S3-compatible storage (S3_ENDPOINT_URL)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from glob import glob
from urllib.parse import urlparse

from pipeline.paths import is_remote, s3_client


class StorageError(RuntimeError):
    """Object storage that cannot be written as the config asks."""


def check_bucket(path: str) -> None:
    """Fails at once, naming the bucket, when an s3:// path's bucket is missing or refuses us."""
    if not is_remote(path):
        return
    from botocore.exceptions import ClientError

    bucket = urlparse(path).netloc
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "?")
        problem = "does not exist" if code in ("404", "NoSuchBucket") else f"refuses access ({code})"
        raise StorageError(f"{path}: bucket '{bucket}' {problem} at {s3_client().meta.endpoint_url}") from err


def remove_tree(path: str) -> None:
    """Delete a folder, or every object under an s3:// prefix."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    url = urlparse(path)
    client = s3_client()
    prefix = url.path.lstrip("/").rstrip("/") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=url.netloc, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=url.netloc, Delete={"Objects": keys})


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    url = urlparse(path)
    found = s3_client().list_objects_v2(Bucket=url.netloc, Prefix=url.path.lstrip("/"), MaxKeys=1)
    return found.get("KeyCount", 0) > 0


def local_file_stats(path: str) -> list:
    """[file, size, mtime_ns] of a local file, or of every file under a local folder, sorted (none if
    the path does not exist): what a result cached from those files depends on."""
    files = sorted(glob(os.path.join(path, "**"), recursive=True)) if os.path.isdir(path) else [path]
    return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]


def write_text(path: str, text: str) -> None:
    """A small file, locally (never half-written) or as one object in a bucket."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        return
    from streaming.base.storage.upload import CloudUploader

    folder, name = path.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as staging:
        with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
            f.write(text)
        CloudUploader.get(out=(staging, folder), exist_ok=True).upload_file(name)


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def read_json(path: str):
    if not is_remote(path):
        with open(path) as f:
            return json.load(f)
    url = urlparse(path)
    body = s3_client().get_object(Bucket=url.netloc, Key=url.path.lstrip("/"))["Body"].read()
    return json.loads(body)
