"""Shards go to and stream from a real S3-compatible server (SeaweedFS on loopback, tests/s3server.py)."""

import io
import json
import os
import socket
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from PIL import Image
from streaming import StreamingDataset

from data_prep.sources import SourceConfig, SourcesConfig
from data_prep.to_mds import SUMMARY_FILE, convert
from pipeline.common.storage import StorageError
from tests.conftest import train_here, train_overrides
from tests.s3server import free_ports

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "brown", "cyan"]


def _jpeg(color: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_download(folder, n: int, bad: int = 0) -> list:
    """An img2dataset-like parquet of n good rows (plus `bad` failed downloads); returns the good rows."""
    rows = [
        dict(
            key=f"{i:05d}",
            url=f"http://img/{i}",
            caption=f"a {COLORS[i % 12]} square number {i}",
            jpg=_jpeg((i * 37 % 256, i * 91 % 256, i * 13 % 256)),
            sha256=f"h{i}",
            status="success",
            width=40,
            height=30,
        )
        for i in range(n)
    ]
    failed = [
        dict(
            key=f"f{i}",
            url=f"http://gone/{i}",
            caption="gone",
            jpg=None,
            sha256=None,
            status="failed_to_download",
            width=None,
            height=None,
        )
        for i in range(bad)
    ]
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows + failed), os.path.join(folder, "00000.parquet"))
    with open(os.path.join(folder, "00000_stats.json"), "w") as f:
        json.dump({"count": n + bad}, f)
    return rows


def _mds_to_s3(spark, tmp_path, remote: str, name: str, n: int, bad: int = 0):
    """make shards' conversion (Spark, dataframe_to_mds) of an img2dataset-like output to `remote`."""
    rows = _write_download(tmp_path / f"i2d_{name}", n, bad)
    cfg = SourcesConfig(work_dir=str(tmp_path / "work"), sources={name: SourceConfig(url_list="unused", out=remote)})
    (summary,) = convert(spark, cfg, {name: (str(tmp_path / f"i2d_{name}"), {"urls": n + bad, "to_download": n + bad})})
    return rows, summary


def test_server_binds_loopback_only_and_enforces_keys(s3, s3_bucket):
    listening = s3.listening()  # what `ss -ltunp` shows for the weed process
    assert ("tcp", "127.0.0.1", s3.ports["s3.port"]) in listening
    assert all(ip == "127.0.0.1" for _, ip, _ in listening), listening  # nothing on other interfaces
    assert {port for _, _, port in listening} <= set(s3.ports.values())  # only the ports we picked

    s3.client().put_object(Bucket=s3_bucket, Key="k", Body=b"secret")
    for access, secret, code in [
        (s3.access_key, "wrong-secret", "SignatureDoesNotMatch"),
        ("nobody", "wrong-secret", "InvalidAccessKeyId"),
    ]:
        intruder = s3.client(access_key=access, secret_key=secret, max_attempts=1)
        for call in (intruder.list_buckets, lambda intruder=intruder: intruder.get_object(Bucket=s3_bucket, Key="k")):
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["Error"]["Code"] == code
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_to_mds_writes_straight_to_s3_and_streams_back_exactly(spark, s3, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/streams/web"
    rows, summary = _mds_to_s3(spark, tmp_path, remote, "web", n=40, bad=3)
    assert summary["written"] == 40 and summary["failed_to_download"] == 3 and summary["urls"] == 43

    keys = s3.list_keys(s3_bucket)
    assert {"streams/web/index.json", f"streams/web/{SUMMARY_FILE}"} <= set(keys)
    index = json.loads(s3.client().get_object(Bucket=s3_bucket, Key="streams/web/index.json")["Body"].read())
    shards = {f"streams/web/{shard['raw_data']['basename']}" for shard in index["shards"]}
    assert shards and shards <= set(keys)  # one MDS folder per Spark partition, merged into one index
    in_bucket = json.loads(s3.client().get_object(Bucket=s3_bucket, Key=f"streams/web/{SUMMARY_FILE}")["Body"].read())
    assert in_bucket == summary and in_bucket["out"] == remote

    cache = tmp_path / "cache"
    dataset = StreamingDataset(remote=remote, local=str(cache), batch_size=1, shuffle=False)
    assert dataset.num_samples == 40
    got = sorted((dataset[i] for i in range(dataset.num_samples)), key=lambda s: s["key"])
    assert [(s["key"], s["url"], s["caption"], s["image"], s["width"], s["height"], s["source"]) for s in got] == [
        (r["key"], r["url"], r["caption"], r["jpg"], 40, 30, "web") for r in rows
    ]
    cached = {os.path.relpath(os.path.join(d, f), cache) for d, _, files in os.walk(cache) for f in files}
    assert {s[len("streams/web/") :] for s in shards} <= cached  # fetched from the bucket


@pytest.mark.timeout(120)
def test_stopped_server_is_a_fast_clear_error_and_data_survives_a_restart(spark, s3, s3_bucket, tmp_path):
    remote = f"s3://{s3_bucket}/ds"
    _mds_to_s3(spark, tmp_path, remote, "ds", n=8)
    s3.stop(kill=True)  # a crash, not a clean shutdown
    with pytest.raises(EndpointConnectionError, match="Could not connect to the endpoint URL"):
        StreamingDataset(remote=remote, local=str(tmp_path / "c1"), batch_size=1)
    with pytest.raises(EndpointConnectionError):
        _mds_to_s3(spark, tmp_path, f"s3://{s3_bucket}/other", "other", n=2)
    s3.start()
    dataset = StreamingDataset(remote=remote, local=str(tmp_path / "c2"), batch_size=1, shuffle=False)
    assert sorted(dataset[i]["key"] for i in range(dataset.num_samples)) == [f"{i:05d}" for i in range(8)]


@pytest.mark.timeout(120)
def test_missing_bucket_or_prefix_is_a_clear_error(spark, s3, s3_bucket, tmp_path):
    with pytest.raises(ClientError, match=r"s3://no-such-bucket/x/index.json not found"):
        StreamingDataset(remote="s3://no-such-bucket/x", local=str(tmp_path / "a"), batch_size=1)
    with pytest.raises(ClientError, match=rf"s3://{s3_bucket}/nothing/index.json not found"):
        StreamingDataset(remote=f"s3://{s3_bucket}/nothing", local=str(tmp_path / "b"), batch_size=1)
    # make shards checks the bucket before it downloads or writes anything.
    with pytest.raises(
        StorageError, match=r"s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist at http://127.0.0.1:"
    ):
        _mds_to_s3(spark, tmp_path, "s3://no-such-bucket/x", "x", n=2)


@pytest.mark.timeout(60)
def test_endpoint_that_never_answers_times_out(monkeypatch, tmp_path):
    """Connect succeeds, no reply ever: bounded by download_timeout x download_retry x AWS_MAX_ATTEMPTS.

    With streaming's defaults (download_timeout=60 s, download_retry=2, botocore's 3 attempts)
    this takes about 6 minutes before it raises.
    """
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)  # the kernel completes the handshake; nobody ever reads or answers
    with blackhole:
        endpoint = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
        _set_env(monkeypatch, endpoint)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's attempts per request (default 3)
        with pytest.raises(ReadTimeoutError, match="Read timeout on endpoint URL"):
            StreamingDataset(
                remote="s3://bucket/x", local=str(tmp_path / "c"), batch_size=1, download_timeout=1, download_retry=1
            )


def _set_env(monkeypatch, endpoint: str) -> None:
    for key, value in dict(
        S3_ENDPOINT_URL=endpoint,
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
        AWS_DEFAULT_REGION="us-east-1",
    ).items():
        monkeypatch.setenv(key, value)


@pytest.mark.timeout(30)
def test_closed_port_is_refused_at_once(monkeypatch, tmp_path):
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"
    _set_env(monkeypatch, endpoint)
    with pytest.raises(EndpointConnectionError, match=endpoint):
        StreamingDataset(remote="s3://bucket/x", local=str(tmp_path / "c"), batch_size=1)


def test_training_streams_its_shards_from_the_bucket(spark, s3, s3_bucket, tmp_path):
    remotes = {name: f"s3://{s3_bucket}/sample/{name}" for name in ("web", "coco")}
    for name, remote in remotes.items():
        _mds_to_s3(spark, tmp_path, remote, name, n=24)
    caches = {name: tmp_path / "cache" / name for name in remotes}

    # train_overrides points data.streams.<name>.local at cfg.sources[name].out: the empty caches.
    cfg = SimpleNamespace(sources={name: SimpleNamespace(out=str(cache)) for name, cache in caches.items()})
    run_dir = tmp_path / "run"
    overrides = train_overrides(
        cfg,
        run_dir,
        "max_duration=3ba",
        "data.global_batch_size=8",
        "scheduler.warmup=1ba",
        "checkpoint.save_interval=3ba",
        *(f"data.streams.{n}.remote={r}" for n, r in remotes.items()),
    )
    train_here(overrides)

    with open(run_dir / "summary.json") as f:
        assert json.load(f)["batches"] == 3
    assert "ep0-ba3-rank0.pt" in os.listdir(run_dir / "checkpoints")
    for name in remotes:  # the caches were empty: everything read came from the bucket
        cached = {
            os.path.relpath(os.path.join(d, f), caches[name]) for d, _, files in os.walk(caches[name]) for f in files
        }
        assert "index.json" in cached and any(f.endswith("shard.00000.mds") for f in cached), (name, cached)


def test_a_bucket_folder_lists_one_level_like_a_local_folder(s3, s3_bucket, tmp_path):
    """A save folder holds every rank's shards of every kept checkpoint: listing it must not walk them."""
    from pipeline.common import storage

    files = ["latest", "run.json", "ep0-ba5/__0_0.distcp", "ep0-ba5/.metadata", "ep0-ba10/__1_0.distcp"]
    files += [f"ep0-ba10/deep/{i}" for i in range(1200)]  # more than one page of a recursive listing
    for name in files:
        os.makedirs(os.path.dirname(tmp_path / "local" / name), exist_ok=True)
        (tmp_path / "local" / name).write_bytes(b"x")
        s3.client().put_object(Bucket=s3_bucket, Key=f"run/{name}", Body=b"x")
    listed_keys = []
    client = storage._s3_client(f"s3://{s3_bucket}/run")
    client.meta.events.register(
        "after-call.s3.ListObjectsV2",
        lambda parsed, **_: listed_keys.extend(entry["Key"] for entry in parsed.get("Contents", [])),
    )

    assert storage.list_names(f"s3://{s3_bucket}/run") == sorted(os.listdir(tmp_path / "local"))
    assert storage.list_names(f"s3://{s3_bucket}/run/ep0-ba5/") == sorted(os.listdir(tmp_path / "local/ep0-ba5"))
    assert sorted(listed_keys) == ["run/ep0-ba5/.metadata", "run/ep0-ba5/__0_0.distcp", "run/latest", "run/run.json"]
    assert storage.list_names(f"s3://{s3_bucket}/nothing-here") == []
