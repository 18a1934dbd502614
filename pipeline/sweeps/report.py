"""A sweep's report (report.md, report.png): each finished run's zero-shot scores, with FLIP's masked
inference for masked runs, plotted against training FLOPs. With seeds, each row's mean over seeds
with its 95% interval, and the paired differences between rows (run for run on the same seed) with
theirs: each row against the first, full against masked inference, a run started from another
run's weights against that run."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from pipeline.common import metric_keys
from pipeline.common.intervals import mean_interval, percent_interval
from pipeline.common.tables import markdown_table
from pipeline.config.schema import ConfigError, EvalConfig, SweepConfig, TrainConfig, load
from pipeline.run.files import CONFIG_FILE, MASKED_SCORES_FILE, read_summary
from pipeline.sweeps.grid import Run


@dataclass
class Finished:
    """A run with a summary: what the tables and the plot read of it."""

    run: Run
    summary: dict
    masking: float
    parent: str  # the row whose weights it started from, or ""
    full: dict  # {dataset/score: value}
    masked: dict  # the same with the training ratio of patches dropped at inference ({} if unmasked)
    flops: float  # training FLOPs, its parent's included


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


def finished_runs(runs: list) -> list:
    """The runs with a summary, in the sweep's order, masked inference scored for complete masked runs."""
    found = []
    for run in runs:
        summary = read_summary(run.run_dir)
        if not summary:
            continue
        cfg = load(TrainConfig, os.path.join(run.run_dir, CONFIG_FILE))
        ratio = cfg.algorithms.patch_masking.ratio if cfg.algorithms.patch_masking else 0.0
        masked = masked_scores(run, cfg) if ratio > 0 and summary["complete"] and cfg.eval_datasets else {}
        # A run that starts from another run's weights (FLIP's unmasked tuning) follows it in time.
        pretrained = cfg.model.pretrained.path if cfg.model.pretrained else ""
        parent = next((f for f in found if pretrained.startswith(f.run.run_dir.rstrip("/") + "/")), None)
        full = {short_metric(m): v for m, v in summary["eval"].items()}
        flops = summary["flops"] + (parent.flops if parent else 0.0)
        found.append(Finished(run, summary, ratio, parent.run.name if parent else "", full, masked, flops))
    return found


def percent(scores: dict, metric: str) -> str:
    return f"{100 * scores[metric]:.2f}" if metric in scores else "-"


def interval_cell(values: list, signed: bool = False) -> str:
    return percent_interval(values, signed) if values else "-"


def runs_table(finished: list, metrics: list, masked_columns: list) -> list:
    """One row per finished run, as it trained."""
    seeded = any(f.run.seed is not None for f in finished)
    header = ["run", *(["seed"] if seeded else []), "masking", "after", "batches", "samples", "train s"]
    header += ["samples/s", "FLOPs", "params (M)", *metrics, *(f"{m} (masked inference)" for m in masked_columns)]
    table = [header]
    for f in finished:
        samples, seconds = f.summary["samples"], f.summary["wall_seconds"]
        table.append(
            [
                f.run.name,
                *([str(f.run.seed)] if seeded else []),
                f"{f.masking:g}",
                f.parent or "-",
                str(f.summary["batches"]),
                str(samples),
                f"{seconds:.0f}",
                f"{samples / seconds:.0f}",
                f"{f.summary['flops']:.3g}",
                f"{f.summary['params'] / 1e6:.2f}",
                *(percent(f.full, m) for m in metrics),
                *(percent(f.masked, m) for m in masked_columns),
            ]
        )
    return table


def by_row(finished: list) -> dict:
    """{row name: {seed: Finished}} in the sweep's order."""
    rows: dict = {}
    for f in finished:
        rows.setdefault(f.run.name, {})[f.run.seed] = f
    return rows


def seeds_table(rows: dict, metrics: list, masked_columns: list) -> list:
    """Each row's mean over its seeds with the 95% interval (Student's t), scores in %."""
    header = ["run", "seeds", "samples/s", "train s", *metrics, *(f"{m} (masked inference)" for m in masked_columns)]
    table = [header]
    for name, seeds in rows.items():
        runs = list(seeds.values())
        table.append(
            [
                name,
                str(len(runs)),
                f"{statistics.fmean(f.summary['samples'] / f.summary['wall_seconds'] for f in runs):.0f}",
                f"{statistics.fmean(f.summary['wall_seconds'] for f in runs):.0f}",
                *(interval_cell([f.full[m] for f in runs if m in f.full]) for m in metrics),
                *(interval_cell([f.masked[m] for f in runs if m in f.masked]) for m in masked_columns),
            ]
        )
    return table


def comparisons(rows: dict) -> list:
    """(label, [(a scores, b scores) per seed both have]) for FLIP's questions: each row against the
    first, full against masked inference, and a run against the run whose weights it started from."""
    names = list(rows)
    pairs = []

    def paired(a: str, b: str, a_scores, b_scores) -> list:
        return [(a_scores(rows[a][s]), b_scores(rows[b][s])) for s in rows[a] if s in rows[b]]

    for name in names[1:]:
        pairs.append((f"{name} - {names[0]}", paired(name, names[0], lambda f: f.full, lambda f: f.full)))
    for name in names:
        if any(f.masked for f in rows[name].values()):
            pairs.append((f"{name}: full - masked inference", paired(name, name, lambda f: f.full, lambda f: f.masked)))
        parent = next(iter(rows[name].values())).parent
        if parent and parent != names[0]:
            pairs.append((f"{name} - {parent}", paired(name, parent, lambda f: f.full, lambda f: f.full)))
    return pairs


def differences_table(rows: dict, metrics: list) -> list:
    """Paired differences in points, mean over seeds with the 95% interval (Student's t)."""
    table = [["difference", "seeds", *metrics]]
    for label, pairs in comparisons(rows):
        cells = [[a[m] - b[m] for a, b in pairs if m in a and m in b] for m in metrics]
        table.append([label, str(len(pairs)), *(interval_cell(c, signed=True) for c in cells)])
    return table


def report(sweep: SweepConfig, runs: list) -> str:
    """Write <folder>/report.md and <folder>/report.png; return the tables."""
    finished = finished_runs(runs)
    if not finished:
        raise ConfigError(f"no run of {sweep.name} has a summary yet under {sweep.folder}")
    metrics = sweep.metrics or list(dict.fromkeys(m for f in finished for m in f.full))
    masked_columns = metrics if any(f.masking > 0 for f in finished) else []
    rows = by_row(finished)
    tables = [markdown_table(runs_table(finished, metrics, masked_columns))]
    if any(len(seeds) > 1 for seeds in rows.values()):
        tables += [
            "Mean over seeds [95% interval], %:\n\n" + markdown_table(seeds_table(rows, metrics, masked_columns)),
            "Paired differences, same seed, points [95% interval]:\n\n"
            + markdown_table(differences_table(rows, metrics)),
        ]
    text = "\n\n".join(tables)
    os.makedirs(sweep.folder, exist_ok=True)
    plot_scores(sweep, metrics, rows)
    with open(os.path.join(sweep.folder, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


def plot_scores(sweep: SweepConfig, metrics: list, rows: dict) -> None:
    """<folder>/report.png: each row's final scores against its training FLOPs (the machine's load
    plays no part), means over seeds with 95% error bars; masked inference as open markers."""
    from matplotlib.figure import Figure  # drawn without pyplot: no backend to choose, no global state

    def bars(values: list) -> tuple:
        mean, low, high = mean_interval(values)
        return mean, (0.0 if len(values) < 2 else mean - low)

    fig = Figure(figsize=(5 * len(metrics), 4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for number, (name, seeds) in enumerate(rows.items()):
            runs = list(seeds.values())
            x = statistics.fmean(f.flops for f in runs)
            color = f"C{number}"
            for masked in (False, True):
                values = [100 * s[metric] for s in (f.masked if masked else f.full for f in runs) if metric in s]
                if values:
                    y, y_err = bars(values)
                    face, label = ("none", f"{name}, masked inference") if masked else (color, name)
                    ax.errorbar(x, y, yerr=y_err, fmt="o", color=color, mfc=face, capsize=3, label=label)
        ax.set_xlabel("training FLOPs (a tuning run's include its parent's)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{sweep.name}: {metric}")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(sweep.folder, "report.png"), dpi=100)
