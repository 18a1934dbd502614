"""The one module that talks to object storage: checkpoints' folders, the run record, run configs,
weights and `make shards`' summaries all go through here (the libraries' own writers aside: Composer's
checkpoint uploads and streaming's MDS writer).

A path is local, or a URL (`s3://bucket/key`), told apart the same way everywhere. Buckets are
reached through Composer's object stores (s3:// at S3_ENDPOINT_URL; the other schemes Composer
knows for reading and writing files); what those stores lack (listing a folder, deleting, asking
whether a bucket exists) is done for s3:// with the S3 store's own client. Adding a scheme is this
module. Torch-free to import: Composer is imported when a bucket is first used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from glob import glob
from typing import Optional
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """Object storage that cannot be used as the config asks."""


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _key(path: str) -> str:
    return urlparse(path).path.lstrip("/")


def _store(path: str):
    """Composer's object store for the bucket of `path`."""
    url = urlparse(path)
    return _store_for(url.scheme, url.netloc, os.getpid(), *(os.environ.get(k) for k in _STORE_ENV))


_STORE_ENV = ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@functools.cache
def _store_for(scheme: str, bucket: str, pid: int, *environment):
    """A documented cache: one store (and client) per bucket, process and endpoint settings (making
    a boto3 client costs ~0.15 s of CPU; a forked process makes its own)."""
    from composer.utils import maybe_create_object_store_from_uri

    return maybe_create_object_store_from_uri(f"{scheme}://{bucket}/")


def _s3_client(path: str):
    if urlparse(path).scheme != "s3":
        raise StorageError(f"{path}: only s3:// supports this here (pipeline/common/storage.py)")
    return _store(path).client


def check_bucket(path: str) -> None:
    """Fails at once, naming the bucket, when an s3:// path's bucket is missing or refuses us."""
    if not is_remote(path):
        return
    from botocore.exceptions import ClientError

    client, bucket = _s3_client(path), urlparse(path).netloc
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "?")
        problem = "does not exist" if code in ("404", "NoSuchBucket") else f"refuses access ({code})"
        raise StorageError(f"{path}: bucket '{bucket}' {problem} at {client.meta.endpoint_url}") from err


def upload_file(local: str, path: str) -> None:
    _store(path).upload_object(_key(path), local)


def download_file(path: str, local: str) -> None:
    """Raises FileNotFoundError when there is no such object."""
    _store(path).download_object(_key(path), local, overwrite=True)


def read_bytes(path: str) -> Optional[bytes]:
    """A file's bytes, local or remote, or None when it is not there."""
    if not is_remote(path):
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()
    with tempfile.TemporaryDirectory() as staging:
        local = os.path.join(staging, "object")
        try:
            download_file(path, local)
        except FileNotFoundError:
            return None
        with open(local, "rb") as f:
            return f.read()


@contextlib.contextmanager
def open_read(path: str):
    """A file object to read from start to end: a bucket object is streamed, not downloaded first
    (a webdataset tar is read member by member)."""
    if not is_remote(path):
        with open(path, "rb") as f:
            yield f
        return
    body = _s3_client(path).get_object(Bucket=urlparse(path).netloc, Key=_key(path))["Body"]
    try:
        yield body
    finally:
        body.close()


def write_bytes(path: str, data: bytes) -> None:
    """A small file, locally (never half-written) or as one object in a bucket."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
        return
    with tempfile.TemporaryDirectory() as staging:
        local = os.path.join(staging, "object")
        with open(local, "wb") as f:
            f.write(data)
        upload_file(local, path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, data) -> None:
    write_text(path, json.dumps(data, indent=2))


def read_json(path: str):
    data = read_bytes(path)
    if data is None:
        raise FileNotFoundError(path)
    return json.loads(data)


def list_names(folder: str) -> list:
    """What is directly in a folder (files and sub-folders), local or under a bucket prefix."""
    if not is_remote(folder):
        return os.listdir(folder) if os.path.isdir(folder) else []
    prefix = _key(folder).rstrip("/") + "/"
    if urlparse(folder).scheme != "s3":  # Composer's stores list only recursively
        return sorted({key[len(prefix) :].split("/", 1)[0] for key in _store(folder).list_objects(prefix)})
    # One level, as a folder is listed: a save folder holds every rank's shards of every kept checkpoint.
    pages = _s3_client(folder).get_paginator("list_objects_v2")
    names = set()
    for page in pages.paginate(Bucket=urlparse(folder).netloc, Prefix=prefix, Delimiter="/"):
        names.update(entry["Key"][len(prefix) :] for entry in page.get("Contents", []))
        names.update(entry["Prefix"][len(prefix) :].rstrip("/") for entry in page.get("CommonPrefixes", []))
    return sorted(names)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    found = _s3_client(path).list_objects_v2(Bucket=urlparse(path).netloc, Prefix=_key(path), MaxKeys=1)
    return found.get("KeyCount", 0) > 0


def delete(path: str) -> None:
    """Delete a file or a folder, or an object and every object under it as a prefix."""
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)
        return
    client, bucket, key = _s3_client(path), urlparse(path).netloc, _key(path).rstrip("/")
    keys = [key, *(k for k in _store(path).list_objects(key + "/"))]
    for start in range(0, len(keys), 1000):  # S3's most a request
        client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]]})


def local_file_stats(path: str) -> list:
    """[file, size, mtime_ns] of a local file, or of every file under a local folder, sorted (none if
    the path does not exist): what a result cached from those files depends on."""
    files = sorted(glob(os.path.join(path, "**"), recursive=True)) if os.path.isdir(path) else [path]
    return [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files if os.path.isfile(f)]
