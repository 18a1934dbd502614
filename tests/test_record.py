"""Watching a run: loggers and callbacks from the config, the whole-run record, retention, the loss guard."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config.schema import ConfigError, LossGuardConfig, SpikeAction
from pipeline.run.files import read_metrics
from pipeline.training.callbacks import COMPOSER_CALLBACKS, LossGuard, LossSpikeError, build_callbacks
from tests.conftest import DEMO_YAML, REPO, train_here, train_overrides
from tests.tiny import GradCapture, make_trainer, synthetic_dataset, tiny_model


def short_run(cfg, run_dir, *extra) -> list:
    return train_overrides(
        cfg,
        run_dir,
        "data.global_batch_size=16",
        "max_duration=4ba",
        "checkpoint.save_interval=2ba",
        "scheduler.warmup=1ba",
        *extra,
    )


def test_tensorboard_mlflow_and_console_loggers_read_back_with_their_own_readers(sample_build, tmp_path, capfd):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = sample_build
    run_dir = tmp_path / "watched"
    train_here(
        short_run(
            cfg,
            run_dir,
            f"loggers.tensorboard.log_dir={run_dir}/tb",
            f"loggers.mlflow.tracking_uri=file:{run_dir}/mlruns",
            "loggers.console.log_interval=1ba",
            "callbacks.optimizer_monitor.batch_log_interval=1",
        )
    )
    events = EventAccumulator(str(run_dir / "tb" / "demo"))  # Composer writes under the run name
    events.Reload()
    losses = [e.value for e in events.Scalars("loss/train/total")]
    assert len(losses) == 4
    record = [v for _, metric, v in read_metrics(str(run_dir / "metrics.csv")) if metric == "loss/train/total"]
    assert losses == pytest.approx(record)
    client = MlflowClient(tracking_uri=f"file:{run_dir}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("clipstream").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "demo"
    history = client.get_metric_history(runs[0].info.run_id, "loss/train/total")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(record)
    logged = {metric for _, metric, _ in read_metrics(str(run_dir / "metrics.csv"))}
    assert {"l2_norm/grad/global", "time/dataloader_wait"} <= logged
    assert "Train loss/train/total" in "".join(capfd.readouterr())  # progress_bar=false still shows the metrics


def test_callbacks_by_name_and_a_clear_error_for_an_unknown_one():
    built = build_callbacks(
        {"memory_monitor": {}, "RuntimeEstimator": {}, "optimizer_monitor": {"log_optimizer_metrics": True}}
    )
    assert [type(c).__name__ for c in built] == ["MemoryMonitor", "RuntimeEstimator", "OptimizerMonitor"]
    with pytest.raises(
        ConfigError, match=r"callbacks.memory_monitr is not a Composer callback; one of: .*memory_monitor"
    ):
        build_callbacks({"memory_monitr": {}})
    with pytest.raises(ConfigError, match="callbacks.memory_monitor: .*unexpected keyword"):
        build_callbacks({"memory_monitor": {"every": 3}})
    assert "speed_monitor" in COMPOSER_CALLBACKS


def test_compiled_model_trains_with_the_eager_loss():
    """Dynamo traces the model and loss and AOTAutograd builds their backward, as with any backend;
    inductor's code generation (torch's own, and 100 s of C++ compiling on a CPU) is left out."""
    losses = {}
    for name, compile_config in (("eager", None), ("compiled", {"backend": "aot_eager"})):
        capture = GradCapture()
        make_trainer(tiny_model(), max_duration="2ba", callbacks=[capture], compile_config=compile_config).fit()
        losses[name] = capture.losses
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


def test_retention_keeps_the_newest_and_every_kth_and_never_latest(sample_build, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "kept"
    train_here(
        short_run(
            cfg,
            run_dir,
            "max_duration=6ba",
            "checkpoint.save_interval=1ba",
            "checkpoint.keep=2",
            "checkpoint.keep_every=4",
        )
    )
    files = sorted(f for f in os.listdir(run_dir / "checkpoints") if f.startswith("ep"))
    assert files == ["ep0-ba4-rank0.pt", "ep0-ba5-rank0.pt", "ep0-ba6-rank0.pt"]
    assert os.readlink(run_dir / "checkpoints" / "latest-rank0.pt") == "ep0-ba6-rank0.pt"


def test_the_checkpoint_saver_closes_once_though_composer_closes_it_again_at_exit(tmp_path, monkeypatch):
    """Composer's exit hook runs every callback's post_close again after Trainer.close(): by then a
    process that goes on (a notebook, a sweep) may have dropped the store's settings."""
    from pipeline.checkpoint.saver import build_checkpoint_saver
    from pipeline.config.schema import CheckpointConfig

    saver = build_checkpoint_saver(CheckpointConfig(save_folder=str(tmp_path), save_interval="1ba", keep=1))
    trainer = make_trainer(tiny_model(), max_duration="3ba", callbacks=[saver])
    trainer.fit()
    trainer.close()
    assert sorted(os.listdir(tmp_path)) == ["ep0-ba3-rank0.pt", "latest-rank0.pt"]  # rotated on close
    rotations = []
    monkeypatch.setattr(saver, "rotate", lambda: rotations.append("again"))
    saver.post_close()  # what the exit hook calls
    assert rotations == []


def test_a_finished_job_started_again_exits_0_saying_so(sample_build, tmp_path):
    cfg, _ = sample_build
    overrides = short_run(cfg, tmp_path / "done", "checkpoint.autoresume=true")
    train_here(overrides)
    command = [sys.executable, os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Run 'demo' is already complete (4 batches, max_duration 4ba)" in proc.stdout
    with open(tmp_path / "done" / "loss.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # the record is untouched


def spiky_loader(bad_batch: int, value: float) -> DataLoader:
    images, texts, sample_ids = synthetic_dataset(64)[:]
    images = images.clone()
    images[bad_batch * 16 : (bad_batch + 1) * 16] = value  # NaN images: a NaN loss at that batch
    return DataLoader(TensorDataset(images, texts, sample_ids), batch_size=16)


@pytest.mark.parametrize("action", [SpikeAction.skip, SpikeAction.stop])
def test_loss_guard_skips_or_stops_on_a_non_finite_loss(action):
    model = tiny_model()
    guard = LossGuard(LossGuardConfig(window=2, action=action), save_folder="s3://bucket/run")
    weights = []

    class Weights(GradCapture):
        def batch_end(self, state, logger):
            weights.append({k: v.clone() for k, v in state.model.state_dict().items()})

    trainer = make_trainer(
        model, max_duration="4ba", callbacks=[guard, Weights()], train_dataloader=spiky_loader(2, float("nan"))
    )
    if action == SpikeAction.stop:
        with pytest.raises(LossSpikeError, match=r"loss at batch 2 is not finite.*latest.*s3://bucket/run"):
            trainer.fit()
        return
    trainer.fit()
    assert guard.skipped == 1
    for key in weights[1]:
        assert torch.equal(weights[2][key], weights[1][key]), key  # the NaN batch changed nothing
    assert all(torch.isfinite(v).all() for v in weights[3].values() if v.is_floating_point())


def test_wandb_logs_offline_with_no_network(sample_build, tmp_path):
    from tests.conftest import PYTHON, run_train

    cfg, _ = sample_build
    run_dir = tmp_path / "wandb_run"
    run_train(PYTHON, short_run(cfg, run_dir, "loggers.wandb.mode=offline"))  # its own process: wandb flushes at exit
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))[0].stat().st_size > 0
