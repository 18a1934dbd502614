"""The run folder: every file a run leaves, by name, with the readers and writers of the plain ones.
No torch here, so that the sweep and scaling CLIs stay quick; pipeline/run/saved.py reads a run's
config and model back.

    runs/demo/config.yaml                   the resolved config, written at the start (pipeline/run/saved.py)
    runs/demo/metrics.csv                   every metric logged (pipeline/run/record.py)
    runs/demo/loss.csv, loss.png            drawn from metrics.csv (pipeline/run/summary.py)
    runs/demo/summary.json                  batches, samples, wall time, last scores, complete
    runs/demo/zeroshot_masked.json          a sweep's masked-inference scores (pipeline/sweep.py)
    runs/demo/checkpoints/                  checkpoints, config.yaml again, and in a bucket the files above
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
LOSS_FILE, LOSS_PLOT = "loss.csv", "loss.png"
SUMMARY_FILE = "summary.json"
MASKED_SCORES_FILE = "zeroshot_masked.json"
# Copied next to the checkpoints for a bucket save folder (where config.yaml already is).
PUBLISHED = (METRICS_FILE, LOSS_FILE, LOSS_PLOT, SUMMARY_FILE)


def read_metrics(path: str) -> list:
    """[(batch, metric, value)] of a metrics file, in the order logged."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(int(row["batch"]), row["metric"], float(row["value"])) for row in csv.DictReader(f)]


def read_summary(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_summary(run_dir: str, summary: dict) -> None:
    with open(os.path.join(run_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
