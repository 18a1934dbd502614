"""Sweeps: one training recipe, many named runs (FLIP's ablations, scaling-law grids).

    python -m pipeline.sweep yamls/sweeps/flip_ablation.yaml [key=value ...]  # here, one after another
    python -m pipeline.sweep --print yamls/sweeps/scaling.yaml                # one launch command per run
    python -m pipeline.sweep --report yamls/sweeps/flip_ablation.yaml         # table + plot of its runs

A sweep YAML (SweepConfig in pipeline/config.py) names a training YAML, overrides common to every
run, a `grid:` (one run per point of the cartesian product) and/or a `runs:` list (one run per
entry). Each run is an ordinary pipeline/train.py run with checkpoint.autoresume in <folder>/<run name>: a
killed sweep, started again, continues the run it was in from its last checkpoint, and runs whose
summary.json says complete are skipped. key=value arguments override the sweep's own keys
(folder=..., overrides.max_wall_clock=60, ...). `run_dirs(path)` lists the run folders for
collectors such as pipeline/scaling.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, EvalConfig, SweepConfig, TrainConfig, load
from pipeline.run_folder import CONFIG_FILE, MASKED_SCORES_FILE, METRICS_FILE, read_metrics, read_summary
from pipeline.tables import markdown_table

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
TRAIN_HOURS = "time/train"  # SpeedMonitor's training wall-clock (Composer's total_wct), in hours


@dataclass
class Run:
    name: str
    run_dir: str
    args: list  # pipeline/train.py's key=value overrides


# ---------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict:
    """{dotted key: leaf} of nested (or already dotted) keys; an empty dict is a leaf."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def cli_value(value: Any) -> str:
    """A value as omegaconf reads it back from key=value: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def name_part(label: str, value: Any) -> str:
    """A key's part of a run name; a group of keys (a mapping in the grid) by its `name`."""
    if isinstance(value, dict) and "name" in value:
        return str(value["name"])
    text = "x".join(map(cli_value, value)) if isinstance(value, list) else cli_value(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{label}{text}")


def run_keys(own: dict) -> dict:
    """Training keys of a run's own values: a grid value that is a mapping is a group of keys."""
    keys = {}
    for key, value in own.items():
        group = isinstance(value, dict) and bool(value)
        keys.update(flatten({k: v for k, v in value.items() if k != "name"}) if group else {key: value})
    return keys


def expand(sweep: SweepConfig) -> list:
    """The sweep's runs in order: the grid's points, then the `runs` entries."""
    points = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())] if sweep.grid else []
    entries = [flatten(entry) for entry in sweep.runs]
    names = [None] * len(points) + [entry.pop("name", None) for entry in entries]
    own = points + entries
    if not own:  # neither grid nor runs: one run of the common overrides
        own, names = [{}], [None]
    # A run is named by its values that are not the same in every run.
    varying = [
        k for k in dict.fromkeys(k for o in own for k in o) if any(k not in o or o[k] != own[0].get(k) for o in own)
    ]
    common = flatten(sweep.overrides)
    runs = []
    for name, values in zip(names, own):
        parts = [name_part(sweep.labels.get(k, k.rsplit(".", 1)[-1]), values[k]) for k in varying if k in values]
        name = name or "-".join(parts) or "run"
        run_dir = os.path.join(sweep.folder, name)
        managed = {"run_name": f"{sweep.name}-{name}", "run_dir": run_dir, "checkpoint.autoresume": True}
        if sweep.save_folder is not None:
            managed["checkpoint.save_folder"] = f"{sweep.save_folder.rstrip('/')}/{name}"
        args = [f"{k}={cli_value(v)}" for k, v in {**common, **run_keys(values), **managed}.items()]
        runs.append(Run(name, run_dir, args))
    duplicates = sorted({r.name for r in runs if [s.name for s in runs].count(r.name) > 1})
    if duplicates:
        raise ConfigError(f"runs share the names {', '.join(duplicates)}: give the `runs` entries a `name`")
    return runs


def load_sweep(path: str, overrides: list = ()) -> tuple:
    """(sweep, runs), every run's training config checked (typos fail before anything trains)."""
    sweep = load(SweepConfig, path, overrides)
    runs = expand(sweep)
    for run in runs:
        try:
            load(TrainConfig, sweep.train, run.args)
        except ConfigError as err:
            raise ConfigError(f"run {run.name}: {err}") from None
    return sweep, runs


def run_dirs(path: str) -> list:
    """The run folders of a sweep YAML, in the sweep's order."""
    return [run.run_dir for run in load_sweep(path)[1]]


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def is_complete(run_dir: str) -> bool:
    return bool((read_summary(run_dir) or {}).get("complete"))


def launch_command(sweep: SweepConfig, run: Run) -> str:
    return shlex.join([*shlex.split(sweep.launcher), "pipeline/train.py", sweep.train, *run.args])


def run_all(sweep: SweepConfig, runs: list) -> None:
    for number, run in enumerate(runs, 1):
        if is_complete(run.run_dir):
            print(f"[{number}/{len(runs)}] {run.name}: complete, skipped", flush=True)
            continue
        print(f"[{number}/{len(runs)}] {run.name}: training in {run.run_dir}", flush=True)
        # Same process group: a sweep killed as a group takes its run with it.
        code = subprocess.run([sys.executable, TRAIN_SCRIPT, sweep.train, *run.args]).returncode
        if code != 0:
            sys.exit(
                f"Sweep stopped: run {run.name} failed (exit {code}). Run the same command again to "
                "continue it from its last checkpoint."
            )
        if not is_complete(run.run_dir):
            print(f"warning: {run.name} ended without a complete summary.json", file=sys.stderr)


# ---------------------------------------------------------------------------
# Report: one table, one plot (zero-shot scores against training wall-clock)
# ---------------------------------------------------------------------------


def short_metric(metric: str) -> str:
    """metrics/<evaluator>/<dataset>/<score> (Composer's evaluator metric) -> <dataset>/<score>."""
    return metric.removeprefix("metrics/").split("/", 1)[-1]


def masked_scores(run: Run, cfg: TrainConfig) -> dict:
    """{dataset/score} with FLIP's masked inference at the run's training ratio (cached in the run folder)."""
    path = os.path.join(run.run_dir, MASKED_SCORES_FILE)
    if not os.path.isfile(path):
        from pipeline.eval import evaluate  # torch and the model code: only when an eval runs

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
    seconds = {batch: offset + 3600 * value for batch, metric, value in rows if metric == TRAIN_HOURS}
    curves: dict = {}
    for batch, metric, value in rows:
        if metric.startswith("metrics/") and batch in seconds:
            curves.setdefault(short_metric(metric), []).append((seconds[batch], value))
    return curves


def masking_ratio(cfg: TrainConfig) -> float:
    return cfg.algorithms.patch_masking.ratio if cfg.algorithms.patch_masking else 0.0


def percent(scores: dict, metric: str) -> str:
    return f"{100 * scores[metric]:.2f}" if metric in scores else "-"


def report(sweep: SweepConfig, runs: list) -> str:
    """Write <folder>/report.md (one row per finished run) and <folder>/report.png; return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, run_curves in curves.items():
            points = run_curves.get(metric, [])
            ax.plot([t for t, _ in points], [100 * v for _, v in points], marker=".", label=name)
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{sweep.name}: {metric}")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(sweep.folder, exist_ok=True)
    fig.savefig(os.path.join(sweep.folder, "report.png"), dpi=100)
    plt.close(fig)
    with open(os.path.join(sweep.folder, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


def main(argv: list) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", help="a sweep YAML (yamls/sweeps/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the sweep's keys")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", dest="print_only", help="print one launch command per run")
    mode.add_argument("--report", action="store_true", help="write the table and plot of the finished runs")
    args = parser.parse_args(argv)
    try:
        sweep, runs = load_sweep(args.sweep, args.overrides)
        if args.print_only:
            print("\n".join(launch_command(sweep, run) for run in runs))
        elif args.report:
            print(f"{report(sweep, runs)}\n\ntable: {sweep.folder}/report.md\nplot:  {sweep.folder}/report.png")
        else:
            run_all(sweep, runs)
    except ConfigError as err:
        sys.exit(f"ConfigError: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
