"""Loggers and callbacks from the config, and the project's own loss guard.

Loggers are Composer's (ConsoleLogger, TensorboardLogger, MLFlowLogger, WandBLogger); callbacks are
Composer's, found by name (`memory_monitor` or `MemoryMonitor`) with their keyword arguments.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import statistics
import time
from collections import deque
from typing import Optional

import composer.callbacks
import torch
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import ConsoleLogger, Logger, MLFlowLogger, TensorboardLogger, WandBLogger
from composer.utils import dist

from pipeline.algorithms.unwrap import composer_model_of
from pipeline.common import metric_keys
from pipeline.config.schema import ConfigError, LoggersConfig, LossGuardConfig, SpikeAction


def build_loggers(cfg: LoggersConfig, run_name: str) -> list:
    loggers = []
    if cfg.console is not None:
        loggers.append(
            ConsoleLogger(log_interval=cfg.console.log_interval, stream="stderr")
        )  # resolved now, not at import
    if cfg.tensorboard is not None:
        loggers.append(TensorboardLogger(log_dir=cfg.tensorboard.log_dir, flush_interval=10))
    if cfg.mlflow is not None:
        mlflow = cfg.mlflow
        loggers.append(
            MLFlowLogger(
                experiment_name=mlflow.experiment_name,
                run_name=run_name,
                tracking_uri=mlflow.tracking_uri,
                resume=mlflow.resume,
                log_system_metrics=False,
            )
        )
    if cfg.wandb is not None:
        wandb = cfg.wandb
        os.makedirs(wandb.dir, exist_ok=True)  # wandb falls back to a temporary folder otherwise
        loggers.append(
            WandBLogger(
                project=wandb.project,
                entity=wandb.entity,
                name=run_name,
                init_kwargs={"mode": wandb.mode, "dir": wandb.dir},
            )
        )
    return loggers


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# Composer's callbacks by snake_case name (its own class names work too).
COMPOSER_CALLBACKS = {_snake(name): getattr(composer.callbacks, name) for name in composer.callbacks.__all__}


def build_callbacks(callbacks: dict) -> list:
    built = []
    for name, kwargs in callbacks.items():
        found = COMPOSER_CALLBACKS.get(name) or COMPOSER_CALLBACKS.get(_snake(name))
        if found is None:
            raise ConfigError(
                f"callbacks.{name} is not a Composer callback; one of: {', '.join(sorted(COMPOSER_CALLBACKS))}"
            )
        try:
            built.append(found(**kwargs))
        except TypeError as err:
            raise ConfigError(f"callbacks.{name}: {err}") from None
    return built


class LossSpikeError(RuntimeError):
    """Training stopped on a non-finite or spiking loss."""


class LossGuard(Callback):
    """On a non-finite loss, or one above `factor` x the median of the last `window` batches, skip
    the batch's update (its gradients are dropped on every rank, so no parameter or optimizer state
    moves) or stop with a message naming the batch and the last good checkpoint. Runs after the
    micro-batches' gradients are summed and before the optimizer step."""

    def __init__(self, cfg: LossGuardConfig, save_folder: str):
        self.cfg, self.save_folder = cfg, save_folder
        self.history: deque = deque(maxlen=cfg.window)
        self.skipped_in_a_row = 0
        self.skipped = 0

    def state_dict(self) -> dict:  # resumed runs judge spikes against the same history
        return {"history": list(self.history), "skipped_in_a_row": self.skipped_in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state["history"])
        self.skipped_in_a_row, self.skipped = state["skipped_in_a_row"], state["skipped"]

    def after_train_batch(self, state: State, logger: Logger) -> None:
        loss = composer_model_of(state.model).last_batch_loss.float().reshape(1).clone()
        dist.all_reduce(loss)  # every rank decides on the same, global, value (SigLIP's rank losses differ)
        loss = float(loss) / dist.get_world_size()
        full = len(self.history) == self.cfg.window
        reason = "not finite" if not math.isfinite(loss) else None
        if reason is None and full and loss > self.cfg.factor * statistics.median(self.history):
            reason = f"{loss:.4f} > {self.cfg.factor} x the median of the last {self.cfg.window} batches"
        logger.log_metrics({metric_keys.LOSS_GUARD_SKIPPED: self.skipped + (reason is not None)})
        if reason is None:
            self.history.append(loss)
            self.skipped_in_a_row = 0
            return
        batch = int(state.timestamp.batch)
        if self.cfg.action == SpikeAction.stop or self.skipped_in_a_row >= self.cfg.max_skips:
            raise LossSpikeError(
                f"loss at batch {batch} is {reason}. The last good checkpoint is the one `latest` names under "
                f"{self.save_folder}; resume from it (lower the lr or precision risk) by running the same command."
            )
        for param in state.model.parameters():
            param.grad = None  # optimizers skip parameters without a gradient: no update, no moment decay
        self.skipped_in_a_row += 1
        self.skipped += 1
        print(f"loss guard: skipped batch {batch}: loss {reason}", flush=True)


class DataLoaderWait(Callback):
    """Logs `time/dataloader_wait`: seconds each batch waited for the loader (near 0 when the
    workers keep up; with FLIP masking the loader, not the accelerator, often sets the pace)."""

    def __init__(self):
        self.started = 0.0

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self.started = time.perf_counter()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        logger.log_metrics({metric_keys.DATALOADER_WAIT: time.perf_counter() - self.started})


class SampleHash(Callback):
    """Logs `data/sample_hash`: a 48-bit hash (exact as a float) of the sorted sample ids of the
    whole global batch, gathered from every rank, so two runs on any world sizes, or a run and
    its resumption, can be compared batch by batch in metrics.csv."""

    def after_dataloader(self, state: State, logger: Logger) -> None:
        ids = torch.cat(dist.all_gather(state.batch[2].contiguous())).sort().values
        digest = hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=6).digest()
        logger.log_metrics({metric_keys.SAMPLE_HASH: int.from_bytes(digest, "big")})


class TrainingFlops(Callback):
    """Logs `flops/batch`: the training FLOPs of each batch over all ranks (the model's
    flops_per_batch, so masked patches are not counted). The run's total is their sum over
    metrics.csv, which keeps every batch once across resumptions (pipeline/run/record.py)."""

    def after_train_batch(self, state: State, logger: Logger) -> None:  # before the step counter moves on
        flops = composer_model_of(state.model).flops_per_batch(state.batch)
        logger.log_metrics({metric_keys.FLOPS_PER_BATCH: flops * dist.get_world_size()})


class WallClockBudget(Callback):
    """Ends training when `seconds` of Composer's training wall-clock (timestamp.total_wct,
    restored on resume, evaluation excluded) are spent. After every batch it sets max_duration to
    the batch where the budget runs out at the pace so far (at most `max_batches`), so the elapsed
    "dur" fraction is the budget's, and the run stops once it is spent."""

    def __init__(self, seconds: float, max_batches: int):
        self.seconds, self.max_batches = seconds, max_batches

    def fit_start(self, state: State, logger: Logger) -> None:
        self.batch_end(state, logger)  # a resumed run: the fraction already spent

    def batch_end(self, state: State, logger: Logger) -> None:
        spent, batch = state.timestamp.total_wct.total_seconds(), int(state.timestamp.batch)
        if batch == 0 or spent <= 0:
            return
        # ceil: past `batch` exactly while budget remains, so the run ends as it is spent
        at_pace = math.ceil(batch * self.seconds / spent)
        state.max_duration = Time(max(batch, min(self.max_batches, at_pace)), TimeUnit.BATCH)


def build_run_callbacks(
    named: dict,
    loss_guard: Optional[LossGuardConfig],
    save_folder: str,
    max_wall_clock: Optional[float],
    max_duration: str,
) -> list:
    """The loader-wait timer, the global batch's sample hash, the FLOPs count, the `named`
    Composer callbacks and, when asked, the loss guard and the wall-clock budget."""
    callbacks = [DataLoaderWait(), SampleHash(), TrainingFlops(), *build_callbacks(named)]
    if loss_guard is not None:
        callbacks.append(LossGuard(loss_guard, save_folder))
    if max_wall_clock is not None:
        callbacks.append(WallClockBudget(max_wall_clock, int(Time.from_timestring(max_duration).value)))
    return callbacks
