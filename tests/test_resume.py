"""Exact resumption from a real S3 server after SIGKILL, an outage, and bad checkpoints."""

import csv
import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from pipeline.checkpoint.loading import read_checkpoint
from pipeline.run.saved import resolve_run
from tests.conftest import (
    DEMO_YAML,
    PYTHON,
    REPO,
    SMALL_MODEL,
    assert_bitwise_equal,
    run_train,
    s3_environment,
    train_here,
    train_overrides,
)

pytestmark = pytest.mark.slow
MAX_BATCHES = 8


def resumable(cfg, tmp_path, name: str, save_folder: str, *extra: str) -> list:
    return train_overrides(
        cfg,
        tmp_path / name,
        f"max_duration={MAX_BATCHES}ba",
        "data.global_batch_size=16",
        "scheduler.warmup=2ba",
        "checkpoint.save_interval=2ba",
        "checkpoint.autoresume=true",
        "deterministic=true",
        "algorithms.patch_masking.ratio=0.5",
        f"checkpoint.save_folder={save_folder}",
        *SMALL_MODEL,
        *extra,
    )


def start(launcher: list, overrides: list, log) -> subprocess.Popen:
    command = [*launcher, os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_key(s3, bucket: str, key: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while key not in s3.list_keys(bucket):
        assert proc.poll() is None, f"training ended before {key} appeared"
        assert time.time() < deadline, f"{key} never appeared"
        time.sleep(0.2)


def final_weights(s3, bucket: str, prefix: str, tmp_path) -> dict:
    local = tmp_path / f"final-{bucket}-{prefix.replace('/', '_')}.pt"
    s3.client().download_file(bucket, f"{prefix}/ep0-ba{MAX_BATCHES}-rank0.pt", str(local))
    return read_checkpoint(str(local))["state"]["model"]


# The plain cases: one rank augmenting on the host is killed and resumed bitwise in the outage test, and
# two ranks with checkpoints in the bucket in tests/test_elastic.py.
def test_sigkill_at_a_random_batch_resumes_exactly_with_the_batches_finished_on_the_device(
    sample_build, s3, s3_bucket, tmp_path
):
    cfg, _ = sample_build
    data = ["data.augment_on=device", "data.decode_on_device=true"]
    train_here(resumable(cfg, tmp_path, "whole", f"s3://{s3_bucket}/whole", *data))
    expected = final_weights(s3, s3_bucket, "whole", tmp_path)
    # The run's resolved config sits next to its checkpoints in the bucket: eval needs no model section.
    model, checkpoint = resolve_run(f"s3://{s3_bucket}/whole/ep0-ba{MAX_BATCHES}-rank0.pt", None)
    assert model.custom["vision_cfg"]["width"] == 32 and checkpoint.endswith(f"ba{MAX_BATCHES}-rank0.pt")

    kill_after = random.choice([2, 4, 6])
    print(f"killing after the checkpoint at batch {kill_after}")
    overrides = resumable(cfg, tmp_path, "killed", f"s3://{s3_bucket}/killed", *data)
    with open(tmp_path / "killed.log", "w") as log:
        proc = start(PYTHON, overrides, log)
        wait_for_key(s3, s3_bucket, f"killed/ep0-ba{kill_after}-rank0.pt", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_train(PYTHON, overrides)  # the same command again
    assert_bitwise_equal(final_weights(s3, s3_bucket, "killed", tmp_path), expected)
    with open(tmp_path / "killed" / "summary.json") as f:
        assert json.load(f)["batches"] == MAX_BATCHES
    # The whole run's record: every batch once, though the killed run had logged past its checkpoint.
    with open(tmp_path / "killed" / "loss.csv") as f:
        assert [int(row["batch"]) for row in csv.DictReader(f)] == list(range(MAX_BATCHES))
    keys = s3.list_keys(s3_bucket)
    assert {f"killed/{name}" for name in ("metrics.csv", "loss.csv", "loss.png", "summary.json", "config.yaml")} <= set(
        keys
    )


def test_bucket_keeps_the_newest_checkpoints_and_every_kth(sample_build, s3, s3_bucket, tmp_path):
    cfg, _ = sample_build
    overrides = resumable(
        cfg,
        tmp_path,
        "kept",
        f"s3://{s3_bucket}/kept",
        "checkpoint.save_interval=1ba",
        "checkpoint.keep=2",
        "checkpoint.keep_every=4",
    )
    train_here(overrides)
    kept = sorted(k for k in s3.list_keys(s3_bucket) if k.startswith("kept/ep"))
    # Every 4th for good (4, 8: also `latest`), and the newest 2 of the others (6, 7).
    assert kept == [f"kept/ep0-ba{b}-rank0.pt" for b in (4, 6, 7, 8)]


def test_store_outage_while_saving_stops_clearly_and_resumes(sample_build, s3, s3_bucket, tmp_path):
    """The store dies mid-run: the run stops with a clear message, `latest` names a whole
    checkpoint, and the same command resumes there once the store is back."""
    cfg, _ = sample_build
    # Long and slow enough (~0.5 s a batch) that the run is still saving when the first `latest`
    # pointer lands, a few seconds in (uploads run in threads: about 2 s after the save).
    longer = [
        "max_duration=24ba",
        "data.global_batch_size=64",
        "checkpoint.save_interval=4ba",
        "checkpoint.upload_timeout=20",
    ]
    train_here(resumable(cfg, tmp_path, "whole", f"s3://{s3_bucket}/whole", *longer))
    s3.client().download_file(s3_bucket, "whole/ep0-ba24-rank0.pt", str(tmp_path / "whole.pt"))
    expected = read_checkpoint(str(tmp_path / "whole.pt"))["state"]["model"]

    overrides = resumable(cfg, tmp_path, "outage", f"s3://{s3_bucket}/outage", *longer)
    with open(tmp_path / "outage.log", "w") as log:
        proc = start(PYTHON, overrides, log)
        wait_for_key(s3, s3_bucket, "outage/latest-rank0.pt.symlink", proc)
        s3.stop(kill=True)
        try:
            returncode = proc.wait(timeout=180)
        finally:
            s3.start()
    output = (tmp_path / "outage.log").read_text()
    assert returncode != 0
    assert "Object storage failed" in output and "Run the same command again to resume" in output
    # The latest pointer names a checkpoint that is wholly in the bucket.
    pointer = s3.client().get_object(Bucket=s3_bucket, Key="outage/latest-rank0.pt.symlink")["Body"].read().decode()
    s3.client().download_file(s3_bucket, pointer.strip(), str(tmp_path / "latest.pt"))
    resumed_from = read_checkpoint(str(tmp_path / "latest.pt"))["state"]["timestamp"]["Timestamp"]["batch"]
    assert 4 <= resumed_from < 24

    run_train(PYTHON, overrides)  # the same command, the store back
    s3.client().download_file(s3_bucket, "outage/ep0-ba24-rank0.pt", str(tmp_path / "outage.pt"))
    assert_bitwise_equal(read_checkpoint(str(tmp_path / "outage.pt"))["state"]["model"], expected)
    # The record covers the whole run, each batch once, across the outage and the resumption.
    rows = (tmp_path / "outage" / "loss.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(24))


@pytest.fixture(scope="module")
def four_batches(sample_build, s3_server, tmp_path_factory) -> str:
    """The bucket of a finished 4-batch run, in `run/`: each test below corrupts a copy of it."""
    cfg, _ = sample_build
    bucket = s3_server.make_bucket()
    with s3_environment(s3_server):
        tmp_path = tmp_path_factory.mktemp("four")
        train_here(resumable(cfg, tmp_path, "run", f"s3://{bucket}/run", "max_duration=4ba"))
    return bucket


def corrupt_latest_and_resume(cfg, s3, bucket, tmp_path, corrupt) -> subprocess.CompletedProcess:
    """A copy of the 4-batch run with its last checkpoint corrupted, resumed to 6 batches."""
    client, prefix = s3.client(), tmp_path.name
    for key in s3.list_keys(bucket, "run/"):
        client.copy_object(Bucket=bucket, Key=f"{prefix}/{key[4:]}", CopySource={"Bucket": bucket, "Key": key})
    local = tmp_path / "ckpt.pt"
    client.download_file(bucket, f"{prefix}/ep0-ba4-rank0.pt", str(local))
    client.put_object(Bucket=bucket, Key=f"{prefix}/ep0-ba4-rank0.pt", Body=corrupt(local.read_bytes(), local))
    overrides = resumable(cfg, tmp_path, "run", f"s3://{bucket}/{prefix}", "max_duration=6ba")
    command = [*PYTHON, os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_truncated_checkpoint_is_refused_not_half_loaded(sample_build, s3, four_batches, tmp_path):
    cfg, _ = sample_build
    proc = corrupt_latest_and_resume(cfg, s3, four_batches, tmp_path, lambda data, _: data[: len(data) // 2])
    assert proc.returncode != 0
    assert "Refusing to resume" in proc.stderr and "corrupt or truncated" in proc.stderr
    assert f"{tmp_path.name}/ep0-ba6-rank0.pt" not in s3.list_keys(four_batches)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_checkpoint_with_arbitrary_objects_is_not_unpickled(sample_build, s3, four_batches, tmp_path, monkeypatch):
    cfg, _ = sample_build
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))

    def add_payload(_, local):
        checkpoint = torch.load(local, weights_only=False)  # the test's own file
        checkpoint["state"]["payload"] = RunsCode()
        torch.save(checkpoint, local)
        return local.read_bytes()

    proc = corrupt_latest_and_resume(cfg, s3, four_batches, tmp_path, add_payload)
    assert proc.returncode != 0
    assert "holds more than tensors and plain data" in proc.stderr and "checkpoint.trust=true" in proc.stderr
    assert not marker.exists()


def test_sharded_checkpoint_files_the_run_did_not_sign_need_trust(monkeypatch, tmp_path):
    from pipeline.checkpoint.folder import CheckpointError
    from pipeline.checkpoint.loading import SIGNED_DIGESTS_ENV, TRUST_ENV, guard_checkpoint_loading, validate_checkpoint

    for name in ("CHECKPOINT_VALIDATION_FUNCTION", TRUST_ENV, SIGNED_DIGESTS_ENV):  # restored after the test
        monkeypatch.setenv(name, "")
    guard_checkpoint_loading(trust=False)  # no resumed checkpoint: no signed digests
    with pytest.raises(CheckpointError, match="this run did not sign it"):
        validate_checkpoint(tmp_path / "__0_0.distcp", specs=[(0, 10)])
    with pytest.raises(CheckpointError, match="sharded checkpoint"):
        validate_checkpoint(tmp_path / ".metadata")
    guard_checkpoint_loading(trust=True)
    assert validate_checkpoint(tmp_path / ".metadata")
