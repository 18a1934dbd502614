"""A sweep's report: one table (report.md) and one plot (report.png) of zero-shot scores against
training wall-clock, one row per finished run, with FLIP's masked inference for masked runs."""

from __future__ import annotations

import json
import os

from pipeline.common import metric_keys
from pipeline.common.tables import markdown_table
from pipeline.config.schema import ConfigError, EvalConfig, SweepConfig, TrainConfig, load
from pipeline.run.files import CONFIG_FILE, MASKED_SCORES_FILE, METRICS_FILE, read_metrics, read_summary
from pipeline.sweeps.grid import Run


def short_metric(metric: str) -> str:
    """metrics/<evaluator>/<dataset>/<score> (Composer's evaluator metric) -> <dataset>/<score>."""
    return metric_keys.eval_score(metric).split("/", 1)[-1]


def masked_scores(run: Run, cfg: TrainConfig) -> dict:
    """{dataset/score} with FLIP's masked inference at the run's training ratio (cached in the run folder)."""
    path = os.path.join(run.run_dir, MASKED_SCORES_FILE)
    if not os.path.isfile(path):
        from pipeline.evaluation.evaluate import evaluate  # torch and the model code: only when an eval runs

        ratio = cfg.algorithms.patch_masking.ratio
        eval_cfg = EvalConfig(
            load_path=run.run_dir,
            datasets=cfg.eval_datasets,
            patch_masking=ratio,
            num_workers=cfg.data.num_workers,
            seed=cfg.seed,
        )
        with open(path, "w") as f:
            json.dump(evaluate(eval_cfg), f, indent=2)
    with open(path) as f:
        datasets = json.load(f)["datasets"]
    return {
        f"{name}/{score}": value
        for name, scores in datasets.items()
        for score, value in scores.items()
        if isinstance(value, float)
    }


def eval_curves(run_dir: str, offset: float) -> dict:
    """{dataset/score: [(training seconds, value)]} from the run's metrics.csv."""
    rows = read_metrics(os.path.join(run_dir, METRICS_FILE))
    seconds = {batch: offset + 3600 * value for batch, metric, value in rows if metric == metric_keys.TRAIN_HOURS}
    curves: dict = {}
    for batch, metric, value in rows:
        if metric_keys.is_eval(metric) and batch in seconds:
            curves.setdefault(short_metric(metric), []).append((seconds[batch], value))
    return curves


def masking_ratio(cfg: TrainConfig) -> float:
    return cfg.algorithms.patch_masking.ratio if cfg.algorithms.patch_masking else 0.0


def percent(scores: dict, metric: str) -> str:
    return f"{100 * scores[metric]:.2f}" if metric in scores else "-"


def report(sweep: SweepConfig, runs: list) -> str:
    """Write <folder>/report.md (one row per finished run) and <folder>/report.png; return the table."""
    done = [(run, read_summary(run.run_dir)) for run in runs]
    done = [
        (run, summary, load(TrainConfig, os.path.join(run.run_dir, CONFIG_FILE))) for run, summary in done if summary
    ]
    if not done:
        raise ConfigError(f"no run of {sweep.name} has a summary yet under {sweep.folder}")
    metrics = sweep.metrics or list(dict.fromkeys(short_metric(m) for _, s, _ in done for m in s["eval"]))
    header = ["run", "masking", "after", "batches", "samples", "train s", "samples/s", "FLOPs", "params (M)", *metrics]
    # FLIP's masked inference, for the runs that trained with masking (columns only if any did)
    masked_columns = [m for m in metrics if any(masking_ratio(cfg) > 0 for _, _, cfg in done)]
    header += [f"{m} (masked inference)" for m in masked_columns]
    table, curves = [header], {}
    for run, summary, cfg in done:
        ratio = masking_ratio(cfg)
        full = {short_metric(m): v for m, v in summary["eval"].items()}
        masked = masked_scores(run, cfg) if ratio > 0 and summary["complete"] and cfg.eval_datasets else {}
        # A run that starts from another run's weights (FLIP's unmasked tuning) follows it in time.
        pretrained = cfg.model.pretrained.path if cfg.model.pretrained else ""
        parent = next((p for p, s, _ in done if pretrained.startswith(p.run_dir.rstrip("/") + "/")), None)
        offset = next((s["wall_seconds"] for p, s, _ in done if p is parent), 0.0)
        samples, seconds = summary["samples"], summary["wall_seconds"]
        table.append(
            [
                run.name,
                f"{ratio:g}",
                parent.name if parent else "-",
                str(summary["batches"]),
                str(samples),
                f"{seconds:.0f}",
                f"{samples / seconds:.0f}",
                f"{summary['flops']:.3g}",
                f"{summary['params'] / 1e6:.2f}",
                *(percent(full, m) for m in metrics),
                *(percent(masked, m) for m in masked_columns),
            ]
        )
        curves[run.name] = eval_curves(run.run_dir, offset)
    text = markdown_table(table)
    os.makedirs(sweep.folder, exist_ok=True)
    plot_curves(sweep, metrics, curves)
    with open(os.path.join(sweep.folder, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


def plot_curves(sweep: SweepConfig, metrics: list, curves: dict) -> None:
    """<folder>/report.png: each metric against training wall-clock, a line per run."""
    from matplotlib.figure import Figure  # drawn without pyplot: no backend to choose, no global state

    fig = Figure(figsize=(5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, run_curves in curves.items():
            points = run_curves.get(metric, [])
            ax.plot([t for t, _ in points], [100 * v for _, v in points], marker=".", label=name)
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{sweep.name}: {metric}")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(sweep.folder, "report.png"), dpi=100)
