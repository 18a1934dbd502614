"""Two "nodes" on one machine: two composer launchers, one rank each, one job (HYBRID_SHARD).

Real nodes each have their own /dev/shm, where streaming keeps its per-node shared memory; here
each launcher gets a private one through a mount namespace (`unshare -m`, needs root).
"""

import json
import os
import subprocess

import pytest

from tests.conftest import COMPOSER, DEMO_YAML, REPO, train_overrides
from tests.s3server import free_ports


def own_dev_shm() -> list:
    """A command prefix giving a process its own /dev/shm, as a separate machine has."""
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"]
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root) to give each simulated node its own /dev/shm")
    return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node"]


@pytest.mark.slow
def test_two_launchers_form_one_hybrid_sharded_job(sample_build, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "run"
    overrides = train_overrides(cfg, run_dir, "max_duration=3ba", "data.global_batch_size=32",
                                "parallelism.sharding=HYBRID_SHARD", "save_interval=3ba")  # fmt: skip
    port = free_ports(1)[0]
    node = own_dev_shm()
    launchers = []
    for node_rank in (0, 1):
        command = [*node, *COMPOSER, "--world_size", "2", "--nproc", "1", "--node_rank", str(node_rank),
                   "--master_addr", "127.0.0.1", "--master_port", str(port),
                   os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]  # fmt: skip
        launchers.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=300)[0] for proc in launchers]
    assert [proc.returncode for proc in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2 and summary["samples"] == 3 * 32
    # Rank 0 wrote one full (gathered) checkpoint.
    assert "ep0-ba3-rank0.pt" in os.listdir(run_dir / "checkpoints")
