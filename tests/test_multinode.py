"""Two "nodes" on one machine: two composer launchers, one rank each, one job; killed, and
resumed on the one node left from the sharded checkpoint both wrote to the bucket.

Real nodes each have their own /dev/shm, where streaming keeps its per-node shared memory; here
each launcher gets a private one through a mount namespace (`unshare -m`, needs root).
"""

import json
import os
import subprocess

import pytest

from pipeline.config.schema import TrainConfig, load
from tests.conftest import COMPOSER, DEMO_YAML, PYTHON, REPO, run_train
from tests.s3server import rendezvous_port
from tests.test_elastic import BATCHES, SAVE_EVERY, elastic, kill_once_latest_passes, start


def own_dev_shm() -> list:
    """A command prefix giving a process its own /dev/shm, as a separate machine has."""
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root) to give each simulated node its own /dev/shm")
    return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"]


@pytest.mark.slow
def test_two_nodes_killed_resume_on_the_one_left(sample_build, s3, s3_bucket, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "run"
    overrides = elastic(
        cfg,
        run_dir,
        "parallelism.sharding=FULL_SHARD",  # HYBRID_SHARD would replicate across the nodes: GPUs only
        "parallelism.state_dict_type=sharded",
        f"checkpoint.save_folder=s3://{s3_bucket}/run",
        f"checkpoint.save_interval={SAVE_EVERY}ba",
        "checkpoint.autoresume=true",
    )
    port = rendezvous_port()
    node = own_dev_shm()
    launchers, logs = [], [tmp_path / "node0.log", tmp_path / "node1.log"]
    for node_rank in (0, 1):
        command = [
            *node,
            *COMPOSER,
            "--world_size",
            "2",
            "--nproc",
            "1",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            os.path.join(REPO, "pipeline", "train.py"),
            DEMO_YAML,
            *overrides,
        ]
        launchers.append(start(command, logs[node_rank]))
    killed_at = kill_once_latest_passes(s3, s3_bucket, "run", launchers, logs)
    # Both ranks wrote their shard of the checkpoint `latest` names.
    assert {f"run/ep0-ba{killed_at}/__{rank}_0.distcp" for rank in (0, 1)} <= set(s3.list_keys(s3_bucket, "run/"))

    proc = run_train(PYTHON, overrides)  # the same command on the one node left
    output = proc.stdout + proc.stderr
    assert f"[batch={killed_at + 1}/{BATCHES}]" in output and f"[batch={killed_at}/{BATCHES}]" not in output
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 1 and summary["samples"] == BATCHES * 16
    # The sample order was pinned on the two nodes of the first start.
    assert load(TrainConfig, str(run_dir / "config.yaml")).data.num_canonical_nodes == 2
