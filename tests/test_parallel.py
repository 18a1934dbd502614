"""Every parallel mode on 2 CPU ranks: the same losses as DDP, parameters really sharded."""

import os
import subprocess

import pytest
import torch

from tests.conftest import COMPOSER, DEMO_YAML, REPO, run_check_script, s3_environment, train_overrides

MODES = ["ddp", "FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"]  # HYBRID_SHARD: one replica of 2 on one machine


# FULL_SHARD on 2 ranks with checkpoints in the bucket, or sharded in the run folder, each started
# again with a longer max_duration below: their first 2 batches run in the `runs` launch.
AUTORESUMED = [("full", "bucket"), ("sharded", "local")]


def autoresumed(cfg, folder, bucket: str, state_dict_type: str, where: str) -> list:
    run_dir = folder / state_dict_type
    save_folder = f"s3://{bucket}/{state_dict_type}" if where == "bucket" else str(run_dir / "checkpoints")
    return train_overrides(
        cfg,
        run_dir,
        "parallelism.sharding=FULL_SHARD",
        f"parallelism.state_dict_type={state_dict_type}",
        f"checkpoint.save_folder={save_folder}",
        "checkpoint.autoresume=true",
        "checkpoint.save_interval=2ba",
        "data.global_batch_size=16",
        "model.custom.vision_cfg.layers=2",
        "model.custom.text_cfg.layers=2",
        "loggers.console.log_interval=1ba",
    )


@pytest.fixture(scope="module")
def runs(sample_build, s3_server, tmp_path_factory) -> dict:
    """parallel_check.py on 2 ranks: 2 batches of each autoresumed run (train.py's main, the recipe's
    Trainer), then every mode. Also ("first legs", folder, bucket) for the autoresume tests."""
    cfg, _ = sample_build
    folder, bucket = tmp_path_factory.mktemp("parallel"), s3_server.make_bucket()
    first_legs = [
        arg for kind in AUTORESUMED for arg in ("run", *autoresumed(cfg, folder, bucket, *kind), "max_duration=2ba")
    ]
    with s3_environment(s3_server):
        results = run_check_script("parallel_check.py", 2, folder / "runs.pt", *MODES, *first_legs)
    return {**results, "first legs": (folder, bucket)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES[1:])
def test_each_fsdp_mode_follows_ddps_loss_curve_with_sharded_parameters(runs, mode):
    assert len(runs[mode]["losses"]) == 3
    assert runs[mode]["losses"] == pytest.approx(runs["ddp"]["losses"], rel=1e-5)
    assert runs["ddp"]["local"] == runs["ddp"]["total"]  # DDP: every rank holds the whole model
    assert runs[mode]["local"] < 0.6 * runs[mode]["total"]  # FSDP: about half on each of 2 ranks


@pytest.mark.slow
# Sharded in the bucket, killed and resumed on other world sizes: tests/test_elastic.py.
@pytest.mark.parametrize("state_dict_type, where", AUTORESUMED)
def test_fsdp_checkpoints_autoresume(sample_build, runs, s3, state_dict_type, where):
    """FULL_SHARD on 2 ranks, started again with a longer max_duration: the second start resumes from
    batch 2 (it logs only batches 3 and 4 of 4), without checkpoint.trust: the run signed its own."""
    cfg, _ = sample_build
    folder, bucket = runs["first legs"]
    overrides = autoresumed(cfg, folder, bucket, state_dict_type, where)
    command = [*COMPOSER, "-n", "2", os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]
    proc = subprocess.run([*command, "max_duration=4ba"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = proc.stdout + proc.stderr
    assert "[batch=3/4]" in second and "[batch=4/4]" in second
    assert "[batch=1/4]" not in second  # resumed, not started again from scratch
    with open(folder / state_dict_type / "loss.csv") as f:
        assert [int(line.split(",")[0]) for line in f.read().split()[1:]] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_two_rank_run_makes_one_process_group_before_its_streams(runs):
    """Composer's group is made before any StreamingDataset, which otherwise makes and destroys one
    of its own on the same MASTER_PORT: a second rendezvous there can hang (1 of 2 ranks joined)."""
    assert runs["groups_made"] == 1


def test_hybrid_shard_builds_composers_replicate_by_shard_mesh(monkeypatch):
    from composer.utils.parallelism import FSDP2Config

    from pipeline.config.schema import ConfigError, ParallelismConfig, Sharding
    from pipeline.training.parallel import HybridShardConfig, build_parallelism

    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the layout a 2-node GPU job gets
    fsdp = build_parallelism(ParallelismConfig(sharding=Sharding.HYBRID_SHARD))["fsdp"]
    assert isinstance(fsdp, HybridShardConfig) and fsdp.data_parallel_replicate_degree == 2
    assert fsdp.data_parallel_shard_degree == -1  # Composer fills in 8: shard within a node
    assert build_parallelism(ParallelismConfig(sharding=Sharding.HYBRID_SHARD, shard_size=4))["fsdp"].replicas == 4
    one_replica = build_parallelism(ParallelismConfig(sharding=Sharding.HYBRID_SHARD, shard_size=16))["fsdp"]
    assert type(one_replica) is FSDP2Config  # all ranks in one replica: FSDP's 1-D mesh
    with pytest.raises(ConfigError, match="shard_size=3 does not divide the world size 16"):
        build_parallelism(ParallelismConfig(sharding=Sharding.HYBRID_SHARD, shard_size=3))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="HYBRID_SHARD with 2 replicas needs GPUs"):
        build_parallelism(ParallelismConfig(sharding=Sharding.HYBRID_SHARD))
