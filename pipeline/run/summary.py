"""What a run leaves in its folder, drawn from its whole record: loss.csv, loss.png, summary.json."""

from __future__ import annotations

import os
from dataclasses import dataclass

from composer.core import State  # noqa: E402
from composer.utils import dist  # noqa: E402
from matplotlib.figure import Figure  # drawn without pyplot: no backend to choose, no global state

from pipeline.common import metric_keys
from pipeline.run.files import LOSS_FILE, LOSS_PLOT, METRICS_FILE, SUMMARY_FILE, write_summary  # noqa: E402


@dataclass(frozen=True)
class RunInfo:
    """What a run's report names besides its record, fixed by its config."""

    run_name: str
    run_dir: str
    model: str
    global_batch_size: int
    save_folder: str  # the checkpoints


def moving_average(values: list, window: int) -> list:
    chunks = [values[max(0, i - window + 1) : i + 1] for i in range(len(values))]
    return [sum(chunk) / len(chunk) for chunk in chunks]


def plot_losses(batches: list, losses: list, path: str, title: str) -> None:
    window = max(1, len(losses) // 20)
    smooth = moving_average(losses, window)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(batches, losses, alpha=0.35, label="per batch")
    ax.plot(batches, smooth, label=f"mean of {window}")
    ax.set_xlabel("batch")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(run: RunInfo, state: State, rows: list, final: bool = False) -> dict:
    """loss.csv, loss.png and summary.json from the run's metric rows [(batch, metric, value)]."""
    os.makedirs(run.run_dir, exist_ok=True)
    points = [(batch, value) for batch, metric, value in rows if metric == metric_keys.LOSS]
    batches, losses = [b for b, _ in points], [v for _, v in points]
    with open(os.path.join(run.run_dir, LOSS_FILE), "w") as f:
        f.write("batch,loss\n" + "".join(f"{batch},{loss:.6f}\n" for batch, loss in points))
    if losses:
        plot_losses(batches, losses, os.path.join(run.run_dir, LOSS_PLOT), f"{run.run_name}: {run.model}")
    summary = {
        "run_name": run.run_name,
        "batches": int(state.timestamp.batch),
        "samples": int(state.timestamp.sample),
        # Training only (Composer's total_wct: evaluation excluded), across resumptions.
        "wall_seconds": state.timestamp.total_wct.total_seconds(),
        "flops": sum(value for _, metric, value in rows if metric == metric_keys.FLOPS_PER_BATCH),
        "params": sum(p.numel() for p in state.model.parameters()),
        # Fit ends only at max_duration, which a wall-clock budget moves to where it is spent.
        "complete": final,
        "world_size": dist.get_world_size(),
        "global_batch_size": run.global_batch_size,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "checkpoints": run.save_folder,
        "loss_plot": os.path.join(run.run_dir, LOSS_PLOT),
        # The last value of every evaluator metric (zero-shot scores), if any ran.
        "eval": {metric: value for _, metric, value in rows if metric_keys.is_eval(metric)},
    }
    write_summary(run.run_dir, summary)
    if final:
        trend = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged"
        print(
            f"\nRun '{run.run_name}' finished: {summary['batches']} batches, {summary['samples']} samples, {trend}\n"
            f"  checkpoints: {run.save_folder}\n  loss plot:   {summary['loss_plot']}\n"
            f"  metrics:     {os.path.join(run.run_dir, METRICS_FILE)}\n"
            f"  summary:     {os.path.join(run.run_dir, SUMMARY_FILE)}"
        )
    return summary
