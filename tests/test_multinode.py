"""Two "nodes" on one machine: two composer launchers, one rank each, one job; killed, and
resumed on the one node left from the sharded checkpoint both wrote to the bucket.

Real nodes each have their own /dev/shm, where streaming keeps its per-node shared memory; here
each launcher gets a private one through a mount namespace (`unshare -m`, needs root).
"""

import json
import os
import signal
import subprocess
import time

import pytest

from pipeline.config import TrainConfig, load
from tests.conftest import COMPOSER, DEMO_YAML, PYTHON, REPO, SMALL_MODEL, run_train, train_overrides
from tests.s3server import free_ports
from tests.test_elastic import latest_batch


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
    # Long enough for the first `latest` pointer to land while it runs (tests/test_elastic.py).
    overrides = train_overrides(
        cfg,
        run_dir,
        "max_duration=100ba",
        "data.global_batch_size=16",
        "checkpoint.save_interval=10ba",
        *SMALL_MODEL,
        "parallelism.sharding=FULL_SHARD",
        "parallelism.state_dict_type=sharded",
        f"checkpoint.save_folder=s3://{s3_bucket}/run",
        "checkpoint.autoresume=true",
        "loggers.console.log_interval=1ba",
    )
    port = free_ports(1)[0]
    node = own_dev_shm()
    launchers = []
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
        log = open(tmp_path / f"node{node_rank}.log", "w")
        launchers.append(
            subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    deadline = time.time() + 300
    while (killed_at := latest_batch(s3, s3_bucket, "run")) == 0:
        assert all(proc.poll() is None for proc in launchers), (tmp_path / "node0.log").read_text()[-3000:]
        assert time.time() < deadline, "`latest` never named a checkpoint"
        time.sleep(0.1)
    for proc in launchers:  # both nodes lost
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_at < 100
    # Both ranks wrote their shard of the checkpoint `latest` names.
    assert {f"run/ep0-ba{killed_at}/__{rank}_0.distcp" for rank in (0, 1)} <= set(s3.list_keys(s3_bucket, "run/"))

    proc = run_train(PYTHON, overrides)  # the same command on the one node left
    output = proc.stdout + proc.stderr
    assert f"[batch={killed_at + 1}/100]" in output and f"[batch={killed_at}/100]" not in output
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 1 and summary["samples"] == 100 * 16
    # The sample order was pinned on the two nodes of the first start.
    assert load(TrainConfig, str(run_dir / "config.yaml")).data.num_canonical_nodes == 2
