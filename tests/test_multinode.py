"""Two "nodes" on one machine: two composer launchers, one rank each, one job (HYBRID_SHARD)."""

import json
import os
import subprocess

import pytest

from tests.conftest import COMPOSER, DEMO_YAML, REPO, train_overrides
from tests.s3server import free_ports


@pytest.mark.slow
def test_two_launchers_form_one_hybrid_sharded_job(sample_build, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "run"
    overrides = train_overrides(cfg, run_dir, "max_duration=3ba", "data.global_batch_size=32",
                                "parallelism.sharding=HYBRID_SHARD", "save_interval=3ba")  # fmt: skip
    port = free_ports(1)[0]
    launchers = []
    for node_rank in (0, 1):
        command = [*COMPOSER, "--world_size", "2", "--nproc", "1", "--node_rank", str(node_rank),
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
