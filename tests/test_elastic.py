"""Runs that outlive their nodes: the same config gives the same batches and losses on 1, 2 or 4
ranks; DDP's checkpoints and FSDP2's sharded ones in a bucket autoresume after kill -9, on the same
world size (bit for bit) or another one; checkpoints the run did not sign are refused."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from pipeline.checkpoint.folder import CHECKPOINT_NAME, CheckpointError
from pipeline.checkpoint.loading import (
    SIGNED_DIGESTS_ENV,
    TRUST_ENV,
    guard_checkpoint_loading,
    read_checkpoint_model,
    validate_checkpoint,
)
from pipeline.checkpoint.resume import resume_checkpoint
from pipeline.config.schema import ConfigError, TrainConfig, load
from pipeline.run.files import read_metrics
from pipeline.run.saved import pin_sample_order, resolve_run
from tests.conftest import (
    COMPOSER,
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

# Uploads run in threads, so `latest` names the first checkpoint a few seconds after it is saved;
# the killed runs are long enough to be killed before they finish.
BATCHES, SAVE_EVERY = 40, 5
MASKING = ["algorithms.patch_masking.ratio=0.5", "algorithms.text_masking.ratio=0.25"]


def small_run(cfg, run_dir, batches: int, *extra: str) -> list:
    """The demo recipe, small, global batch 16, deterministic, logging every batch."""
    return train_overrides(
        cfg,
        run_dir,
        f"max_duration={batches}ba",
        "data.global_batch_size=16",
        "scheduler.warmup=2ba",
        "deterministic=true",
        "loggers.console.log_interval=1ba",
        *SMALL_MODEL,
        *extra,
    )


def elastic(cfg, run_dir, *extra: str) -> list:
    """With patch and text masking, in a virtual epoch (1,024 of the sample's ~3,600) drawn in
    shard passes, as the recipes draw them; captions drawn from two columns (COCO's alt caption
    or one of its list of captions, data.captions), so equal losses mean equal captions too."""
    captions = ("data.captions.caption=0.5", "data.captions.captions=0.5")
    return small_run(
        cfg, run_dir, BATCHES, "data.epoch_size=1024", "data.sampling=shard_passes", *MASKING, *captions, *extra
    )


def in_bucket(cfg, run_dir, save_folder: str, *extra: str) -> list:
    """DDP (the default), checkpoints in the bucket, autoresume; no checkpoint.trust."""
    return elastic(
        cfg,
        run_dir,
        f"checkpoint.save_folder={save_folder}",
        f"checkpoint.save_interval={SAVE_EVERY}ba",
        "checkpoint.autoresume=true",
        *extra,
    )


def sharded(cfg, run_dir, save_folder: str, *extra: str) -> list:
    """As the recipes run: FSDP2 (HYBRID_SHARD on one machine is one replica, which builds
    FULL_SHARD's FSDP2Config exactly: replication across replicas needs GPUs), sharded checkpoints."""
    return in_bucket(
        cfg, run_dir, save_folder, "parallelism.sharding=HYBRID_SHARD", "parallelism.state_dict_type=sharded", *extra
    )


def per_batch(run_dir, metric: str) -> list:
    return [value for _, name, value in read_metrics(os.path.join(run_dir, "metrics.csv")) if name == metric]


def launcher(ranks: int) -> list:
    return PYTHON if ranks == 1 else [*COMPOSER, "-n", str(ranks)]


def assert_same_batches_and_losses(run_dir, reference_dir) -> None:
    hashes, reference_hashes = per_batch(run_dir, "data/sample_hash"), per_batch(reference_dir, "data/sample_hash")
    assert len(hashes) == BATCHES and len(set(hashes)) == BATCHES  # a new global batch every step, each once
    assert hashes == reference_hashes  # the very same samples in every global batch
    losses, reference = per_batch(run_dir, "loss/train/total"), per_batch(reference_dir, "loss/train/total")
    assert len(losses) == BATCHES
    assert losses == pytest.approx(reference, rel=1e-5)


@pytest.fixture(scope="module")
def one_rank(sample_build, tmp_path_factory):
    """The reference: one rank, DDP, the global batch of 16 as 4 micro-batches of 4."""
    cfg, _ = sample_build
    run_dir = tmp_path_factory.mktemp("world") / "1rank"
    train_here(elastic(cfg, run_dir, "device_train_microbatch_size=4"))
    return run_dir


def run_uninterrupted(sample_build, s3_server, tmp_path_factory, overrides) -> tuple:
    """(bucket, run folder) of a 2-rank run of overrides(cfg, run_dir, save_folder), never interrupted."""
    cfg, _ = sample_build
    bucket = s3_server.make_bucket()
    run_dir = tmp_path_factory.mktemp("world") / "whole"
    with s3_environment(s3_server):
        run_train(launcher(2), overrides(cfg, run_dir, f"s3://{bucket}/whole"))
    return bucket, run_dir


@pytest.fixture(scope="module")
def uninterrupted(sample_build, s3_server, tmp_path_factory):
    """(bucket, run folder) of a 2-rank sharded run that was never interrupted."""
    return run_uninterrupted(sample_build, s3_server, tmp_path_factory, sharded)


@pytest.fixture(scope="module")
def ddp_uninterrupted(sample_build, s3_server, tmp_path_factory):
    """(bucket, run folder) of a 2-rank DDP run that was never interrupted."""
    return run_uninterrupted(sample_build, s3_server, tmp_path_factory, in_bucket)


# ---------------------------------------------------------------------------
# The same config on any world size
# ---------------------------------------------------------------------------


@pytest.mark.slow
# 4 ranks: FSDP, in the kill-and-resume chain below; every mode on 1, 2 and 4 ranks: bench/world_size.py.
def test_ddp_on_2_ranks_trains_on_the_1_rank_batches_with_its_losses(ddp_uninterrupted, one_rank):
    _, run_dir = ddp_uninterrupted
    assert_same_batches_and_losses(run_dir, one_rank)
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["samples"] == BATCHES * 16  # 8 per rank, counted over all


@pytest.mark.slow
def test_fsdp_on_2_ranks_trains_on_the_1_rank_batches_with_its_losses(uninterrupted, one_rank):
    assert_same_batches_and_losses(uninterrupted[1], one_rank)


# ---------------------------------------------------------------------------
# Sharded checkpoints in the bucket: kill -9, autoresume
# ---------------------------------------------------------------------------


def latest_batch(s3, bucket: str, prefix: str) -> int:
    """The batch of the checkpoint the bucket's `latest` pointer names (0: none yet)."""
    client = s3.client()
    try:
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/latest-rank0.pt.symlink")["Body"].read()
    except client.exceptions.NoSuchKey:
        return 0
    return int(CHECKPOINT_NAME.match(os.path.basename(body.decode().strip())).group(1))


def kill_once_latest_passes(
    s3, bucket: str, prefix: str, processes: list, log_paths: list, after: int = 0, batches: int = BATCHES
) -> int:
    """SIGKILL the process groups of `processes` as soon as the bucket's `latest` names a
    checkpoint after batch `after`; returns its batch. (Start-up of several ranks on 2 busy cores
    can take minutes before the first checkpoint.) A failure shows where each process stood."""
    deadline = time.time() + 600
    while (batch := latest_batch(s3, bucket, prefix)) <= after:
        if not all(p.poll() is None for p in processes):
            pytest.fail(f"training ended first:\n{stacks_and_logs(processes, log_paths)}")
        if time.time() > deadline:
            pytest.fail(f"`latest` never passed batch {after}:\n{stacks_and_logs(processes, log_paths)}")
        time.sleep(0.1)
    for proc in processes:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert batch < batches, "killed too late: the run had finished"
    return batch


def stacks_and_logs(processes: list, log_paths: list) -> str:
    """SIGABRT what still runs, one process at a time, so faulthandler (see start) writes each
    thread's Python stack to its log; then the end of every log: a process that hangs says where."""
    for proc in processes:
        if proc.poll() is None:
            for running in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):  # ended with its child
                    running.send_signal(signal.SIGABRT)
                time.sleep(0.5)
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return "\n".join(f"--- {path}:\n{open(path).read()[-6000:]}" for path in log_paths)


def start(command: list, log_path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )


def train_command(ranks: int, overrides: list) -> list:
    return [*launcher(ranks), os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]


def resumed(output: str, killed_at: int, batches: int = BATCHES) -> bool:
    """The run's log starts at the batch after the checkpoint, not from scratch nor before it."""
    return f"[batch={killed_at + 1}/{batches}]" in output and f"[batch={killed_at}/" not in output


@pytest.mark.slow
def test_sharded_run_in_the_bucket_killed_and_resumed_on_2_ranks_ends_bitwise_equal(
    sample_build, s3, uninterrupted, tmp_path
):
    cfg, _ = sample_build
    bucket, whole = uninterrupted
    keys = s3.list_keys(bucket, "whole/")
    # Each rank wrote its own shard, rank 0 the metadata and the signed manifest; the run's key and config beside.
    last = f"whole/ep0-ba{BATCHES}"
    assert {f"{last}/{name}" for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "manifest.json")} <= set(keys)
    assert {"whole/checkpoints.key", "whole/config.yaml"} <= set(keys)
    overrides = sharded(cfg, tmp_path / "run", f"s3://{bucket}/killed-on-2")
    killed = start(train_command(2, overrides), tmp_path / "killed.log")
    killed_at = kill_once_latest_passes(s3, bucket, "killed-on-2", [killed], [tmp_path / "killed.log"])
    proc = run_train(launcher(2), overrides)  # the same command again
    assert resumed(proc.stdout + proc.stderr, killed_at)
    assert_same_batches_and_losses(tmp_path / "run", whole)  # every batch once in the record
    expected = read_checkpoint_model(f"s3://{bucket}/{last}")
    assert_bitwise_equal(read_checkpoint_model(f"s3://{bucket}/killed-on-2/ep0-ba{BATCHES}"), expected)


@pytest.mark.slow
def test_ddp_run_in_the_bucket_killed_and_resumed_on_2_ranks_ends_bitwise_equal(
    sample_build, s3, ddp_uninterrupted, tmp_path
):
    cfg, _ = sample_build
    bucket, _ = ddp_uninterrupted
    last = f"ep0-ba{BATCHES}-rank0.pt"
    # The run's resolved config sits next to its checkpoints in the bucket: eval needs no model section.
    model, checkpoint = resolve_run(f"s3://{bucket}/whole/{last}", None)
    assert model.custom["vision_cfg"]["width"] == 32 and checkpoint.endswith(last)
    overrides = in_bucket(cfg, tmp_path / "killed", f"s3://{bucket}/killed")
    killed = start(train_command(2, overrides), tmp_path / "killed.log")
    killed_at = kill_once_latest_passes(s3, bucket, "killed", [killed], [tmp_path / "killed.log"])
    proc = run_train(launcher(2), overrides)  # the same command again
    assert resumed(proc.stdout + proc.stderr, killed_at)
    expected = read_checkpoint_model(f"s3://{bucket}/whole/{last}")
    assert_bitwise_equal(read_checkpoint_model(f"s3://{bucket}/killed/{last}"), expected)
    with open(tmp_path / "killed" / "summary.json") as f:
        assert json.load(f)["batches"] == BATCHES
    # The whole run's record: every batch once, though the killed run had logged past its checkpoint.
    with open(tmp_path / "killed" / "loss.csv") as f:
        assert [int(row["batch"]) for row in csv.DictReader(f)] == list(range(BATCHES))
    record = {f"killed/{name}" for name in ("metrics.csv", "loss.csv", "loss.png", "summary.json", "config.yaml")}
    assert record <= set(s3.list_keys(bucket, "killed/"))


@pytest.mark.slow
def test_sharded_run_killed_on_2_ranks_resumes_on_4_killed_again_resumes_on_1(
    sample_build, s3, uninterrupted, tmp_path
):
    """The same command on whatever ranks there are, twice: the same samples as the uninterrupted
    2-rank run, batch by batch, and the same losses; the sample order pinned at the first start."""
    cfg, _ = sample_build
    bucket, whole = uninterrupted
    overrides = sharded(cfg, tmp_path / "run", f"s3://{bucket}/elastic")
    killed = start(train_command(2, overrides), tmp_path / "on2.log")
    first_kill = kill_once_latest_passes(s3, bucket, "elastic", [killed], [tmp_path / "on2.log"])
    killed = start(train_command(4, overrides), tmp_path / "on4.log")
    second_kill = kill_once_latest_passes(s3, bucket, "elastic", [killed], [tmp_path / "on4.log"], after=first_kill)
    assert resumed((tmp_path / "on4.log").read_text(), first_kill)
    proc = run_train(launcher(1), overrides)
    assert resumed(proc.stdout + proc.stderr, second_kill)
    assert_same_batches_and_losses(tmp_path / "run", whole)
    saved = load(TrainConfig, str(tmp_path / "run" / "config.yaml"))
    assert saved.data.num_canonical_nodes == 1 and saved.data.shuffle_block_size == 4_000_000


TUNING_BATCHES = 20


def tuning(cfg, run_dir, save_folder: str, pretrained: str) -> list:
    """FLIP's second phase as yamls/flip_b16_unmasked_tuning.yaml runs it: from the pre-training
    run's save folder (its newest sharded checkpoint), no patch masking, sharded checkpoints of its
    own in the bucket, autoresume."""
    return small_run(
        cfg,
        run_dir,
        TUNING_BATCHES,
        "algorithms.patch_masking=null",
        f"model.pretrained.path={pretrained}",
        "parallelism.sharding=HYBRID_SHARD",
        "parallelism.state_dict_type=sharded",
        f"checkpoint.save_folder={save_folder}",
        f"checkpoint.save_interval={SAVE_EVERY}ba",
        "checkpoint.autoresume=true",
    )


@pytest.mark.slow
def test_flip_unmasked_tuning_from_a_sharded_pretraining_run_killed_and_resumed_ends_bitwise_equal(
    sample_build, s3, uninterrupted, tmp_path
):
    """Both phases chained as the recipes run them: the masked 2-rank sharded pre-training in the
    bucket, then unmasked tuning from its save folder, sharded too. Both runs sign their shards
    with their own keys and name them alike: the tuning run's resume must check its own."""
    cfg, _ = sample_build
    bucket, _ = uninterrupted
    pretrained = f"s3://{bucket}/whole"
    train_here(tuning(cfg, tmp_path / "whole", f"s3://{bucket}/tuned-whole", pretrained))
    overrides = tuning(cfg, tmp_path / "run", f"s3://{bucket}/tuned", pretrained)
    killed = start(train_command(1, overrides), tmp_path / "killed.log")
    killed_at = kill_once_latest_passes(
        s3, bucket, "tuned", [killed], [tmp_path / "killed.log"], batches=TUNING_BATCHES
    )
    proc = run_train(launcher(1), overrides)  # the same command again
    assert resumed(proc.stdout + proc.stderr, killed_at, TUNING_BATCHES)
    for metric in ("data/sample_hash", "loss/train/total"):
        whole = per_batch(tmp_path / "whole", metric)
        assert len(whole) == TUNING_BATCHES and per_batch(tmp_path / "run", metric) == whole
    expected = read_checkpoint_model(f"s3://{bucket}/tuned-whole/ep0-ba{TUNING_BATCHES}")
    assert_bitwise_equal(read_checkpoint_model(f"s3://{bucket}/tuned/ep0-ba{TUNING_BATCHES}"), expected)
    pretrained_weights = read_checkpoint_model(f"{pretrained}/ep0-ba{BATCHES}")
    assert not all(torch.equal(expected[k], pretrained_weights[k]) for k in expected)  # it did tune


# ---------------------------------------------------------------------------
# Checkpoints the run did not write, or did not finish
# ---------------------------------------------------------------------------


def copy_prefix(s3, bucket: str, source: str, target: str) -> None:
    client = s3.client()
    for key in s3.list_keys(bucket, f"{source}/"):
        client.copy_object(
            Bucket=bucket, Key=f"{target}/{key[len(source) + 1 :]}", CopySource={"Bucket": bucket, "Key": key}
        )


@pytest.mark.slow
def test_unfinished_missing_foreign_and_tampered_sharded_checkpoints(s3, uninterrupted, tmp_path, capsys, monkeypatch):
    bucket, _ = uninterrupted
    client, last = s3.client(), f"ep0-ba{BATCHES}"
    for name in ("CHECKPOINT_VALIDATION_FUNCTION", TRUST_ENV, SIGNED_DIGESTS_ENV):  # restored after the test
        monkeypatch.setenv(name, "")

    copy_prefix(s3, bucket, "whole", "unfinished")  # killed between the shards and the manifest
    client.delete_object(Bucket=bucket, Key=f"unfinished/{last}/manifest.json")
    unfinished = resume_checkpoint(f"s3://{bucket}/unfinished")
    assert unfinished.path == f"s3://{bucket}/unfinished/ep0-ba{BATCHES - SAVE_EVERY}"
    assert f"Skipping s3://{bucket}/unfinished/{last}: it has no manifest.json" in capsys.readouterr().err

    copy_prefix(s3, bucket, "whole", "missing")  # one rank's shard lost
    client.delete_object(Bucket=bucket, Key=f"missing/{last}/__1_0.distcp")
    with pytest.raises(CheckpointError, match=rf"missing/{last}/__1_0.distcp is missing"):
        resume_checkpoint(f"s3://{bucket}/missing")

    copy_prefix(s3, bucket, "whole", "foreign")  # put there by another run (its own key)
    client.put_object(Bucket=bucket, Key="foreign/checkpoints.key", Body=os.urandom(32))
    with pytest.raises(CheckpointError, match=rf"foreign/{last}/manifest.json is not signed by this run's key"):
        resume_checkpoint(f"s3://{bucket}/foreign")

    # A shard replaced after signing: refused before torch.distributed.checkpoint unpickles it.
    resume = resume_checkpoint(f"s3://{bucket}/whole")
    assert resume.path == f"s3://{bucket}/whole/{last}" and set(resume.digests) == {
        "__0_0.distcp",
        "__1_0.distcp",
        ".metadata",
    }
    guard_checkpoint_loading(trust=False, resume=resume)  # what the validator is given to check
    shard = tmp_path / "__0_0.distcp"
    client.download_file(bucket, f"whole/{last}/__1_0.distcp", str(shard))  # another rank's (signed) bytes
    with pytest.raises(CheckpointError, match="does not match the digest its run signed"):
        validate_checkpoint(shard, specs=[(0, 10)])
    client.download_file(bucket, f"whole/{last}/__0_0.distcp", str(shard))
    assert validate_checkpoint(shard, specs=[(0, 10)])
    unsigned = tmp_path / "unsigned" / "__7_0.distcp"
    unsigned.parent.mkdir()
    unsigned.write_bytes(shard.read_bytes())
    with pytest.raises(CheckpointError, match="this run did not sign it"):
        validate_checkpoint(unsigned, specs=[(0, 10)])
    guard_checkpoint_loading(trust=False)  # nothing resumed: no sharded file is trusted
    with pytest.raises(CheckpointError, match="this run did not sign it"):
        validate_checkpoint(shard, specs=[(0, 10)])


@pytest.mark.slow
def test_eval_and_weights_read_a_sharded_checkpoint_only_when_signed(s3, uninterrupted):
    bucket, _ = uninterrupted
    weights = read_checkpoint_model(f"s3://{bucket}/whole/ep0-ba{BATCHES}")
    assert weights["clip.logit_scale"].shape == (1,) and all(key.startswith("clip.") for key in weights)
    s3.client().put_object(Bucket=bucket, Key="whole-copy/checkpoints.key", Body=os.urandom(32))
    copy_prefix(s3, bucket, f"whole/ep0-ba{BATCHES}", f"whole-copy/ep0-ba{BATCHES}")
    with pytest.raises(CheckpointError, match="not signed by this run's key"):
        read_checkpoint_model(f"s3://{bucket}/whole-copy/ep0-ba{BATCHES}")
    assert read_checkpoint_model(f"s3://{bucket}/whole-copy/ep0-ba{BATCHES}", trust=True).keys() == weights.keys()


# ---------------------------------------------------------------------------
# The sample order is pinned at the first start
# ---------------------------------------------------------------------------


def test_sample_order_is_pinned_at_the_first_start_and_a_resume_may_not_change_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    first = pin_sample_order(load(TrainConfig, DEMO_YAML), saved=None)
    assert first.data.num_canonical_nodes == 2  # the nodes at the first start, as streaming picks
    assert first.data.shuffle_block_size == 2_000_000  # streaming's default for 2 canonical nodes
    monkeypatch.setenv("WORLD_SIZE", "8")  # resumed on one node: the run's own values, from its config
    resumed = pin_sample_order(load(TrainConfig, DEMO_YAML), saved=first)
    assert resumed.data.num_canonical_nodes == 2 and resumed.data.shuffle_block_size == 2_000_000
    assert pin_sample_order(load(TrainConfig, DEMO_YAML, ["max_duration=900ba", "data.num_workers=4"]), saved=first)
    changes = {
        "data.global_batch_size=64": "data.global_batch_size",
        "seed=3": "seed",
        "data.num_canonical_nodes=4": "data.num_canonical_nodes",
        "data.streams.web.proportion=0.9": "data.streams",
        "data.sampling=shard_passes": "data.sampling",
    }
    for override, key in changes.items():
        with pytest.raises(ConfigError, match=rf"^{key}=.* would change the sample order of the run being resumed"):
            pin_sample_order(load(TrainConfig, DEMO_YAML, [override]), saved=first)
    remote = ["data.streams.web.remote=s3://bucket/web"]
    first = pin_sample_order(load(TrainConfig, DEMO_YAML, remote), saved=None)
    # Where a node caches a remote stream does not change the order.
    assert pin_sample_order(load(TrainConfig, DEMO_YAML, [*remote, "data.streams.web.local=/elsewhere"]), saved=first)
    with pytest.raises(ConfigError, match=r"^data.streams="):
        pin_sample_order(load(TrainConfig, DEMO_YAML, ["data.streams.web.remote=s3://bucket/other"]), saved=first)
