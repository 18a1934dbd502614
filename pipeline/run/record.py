"""The whole run's record: every logged metric, kept across resumptions, published with the checkpoints.

`<run_dir>/metrics.csv` holds one row per (batch, metric, value) for every metric any part of the
run logs (loss, lr per group, throughput, MFU, masking ratio, zero-shot scores, ...). A resumed run
first drops the rows logged after the checkpoint it resumed from (they are logged again), so every
batch appears exactly once however often the run was killed. At every checkpoint and at the end
(after the final evaluation), loss.csv, loss.png and summary.json are drawn from that file, and
for an `s3://` save folder they, the metrics file and any TensorBoard events are copied next to
the checkpoints (where pipeline/run/saved.py put the resolved config).
"""

from __future__ import annotations

import csv
import glob
import os
from typing import Optional

from composer.core import Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import create_interval_scheduler, dist

from pipeline.common import storage
from pipeline.common.storage import is_remote
from pipeline.run.files import METRICS_FILE, PUBLISHED, read_metrics
from pipeline.run.summary import RunInfo, write_report


class RunRecord(LoggerDestination):
    """Rank 0 keeps the record; the other ranks' metrics are the same or rank-local and not kept."""

    def __init__(self, run: RunInfo, save_interval: str):
        super().__init__()
        self.run = run
        self.path = os.path.join(run.run_dir, METRICS_FILE)
        self.pending: list = []
        self.is_save_batch = create_interval_scheduler(save_interval)  # publish with each checkpoint
        self.fit_ended = False

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        resumed_at = int(state.timestamp.batch)  # 0 for a new run: nothing is kept
        kept = [row for row in read_metrics(self.path) if row[0] < resumed_at]
        os.makedirs(self.run.run_dir, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["batch", "metric", "value"])
            writer.writerows(kept)

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if dist.get_global_rank() == 0:
            self.pending.extend((step, name, float(value)) for name, value in metrics.items())

    def flush(self) -> None:
        if self.pending and os.path.exists(self.path):
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerows(self.pending)
        self.pending = []

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            self.flush()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0 and self.is_save_batch(state, Event.BATCH_CHECKPOINT):
            self.publish(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self.fit_ended = True
        # Composer evaluates once more after FIT_END when eval_interval does not divide the run
        # (asking at FIT_END changes no scheduler state): then the final record waits for its scores.
        final_eval_follows = any(evaluator.eval_interval(state, Event.FIT_END) for evaluator in state.evaluators)
        if dist.get_global_rank() == 0 and not final_eval_follows:
            self.publish(state, final=True)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0 and self.fit_ended:
            self.publish(state, final=True)

    def publish(self, state: State, final: bool = False) -> None:
        """Draw the run's files from the whole record and copy them next to the checkpoints."""
        self.flush()
        write_report(self.run, state, read_metrics(self.path), final)
        files = [os.path.join(self.run.run_dir, name) for name in PUBLISHED]
        files += glob.glob(os.path.join(self.run.run_dir, "tensorboard", "**", "*"), recursive=True)
        files = [f for f in files if os.path.isfile(f)]
        if is_remote(self.run.save_folder):
            for path in files:
                storage.upload_file(
                    path, f"{self.run.save_folder.rstrip('/')}/{os.path.relpath(path, self.run.run_dir)}"
                )
