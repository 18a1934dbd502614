import csv
import os

import pytest

from tests.conftest import train_here, train_overrides


def read_losses(run_dir) -> list:
    with open(os.path.join(run_dir, "loss.csv")) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_short_run_loss_decreases_and_leaves_checkpoint_and_plot(sample_build, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "run"
    train_here(
        train_overrides(
            cfg,
            run_dir,
            "max_duration=40ba",
            "data.global_batch_size=64",
            "scheduler.warmup=5ba",
            "checkpoint.save_interval=20ba",
        ),
    )
    losses = read_losses(run_dir)
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    with open(run_dir / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    checkpoints = sorted(os.listdir(run_dir / "checkpoints"))
    assert "ep0-ba20-rank0.pt" in checkpoints and "ep0-ba40-rank0.pt" in checkpoints


# `composer -n 2` splitting the global batch over the ranks: tests/test_elastic.py.


def test_indivisible_global_batch_is_rejected():
    from pipeline.config.schema import ConfigError
    from pipeline.data.loader import per_rank_batch_size

    assert per_rank_batch_size(64, 2) == 32
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        per_rank_batch_size(64, 3)
