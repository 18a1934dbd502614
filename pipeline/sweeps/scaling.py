"""Scaling laws over many runs (Cherti et al. 2022, OpenCLIP): zero-shot error E = beta * x^alpha.

The law is fitted on the Pareto frontier (for each x, the best error reached at or below it), as the
paper does: runs off the frontier are badly configured for their budget, not evidence about scale.
x is training compute (FLOPs), samples seen or model size (parameters). Runs of one configuration over
several seeds (a sweep's `seeds:`, each seed's run folder named alike) are one point of the frontier, at
their mean error; the fit and its bootstrap then use every seed's run of the frontier's configurations,
so the interval carries the seed-to-seed variation as well as the scatter about the law.

    python -m pipeline.sweeps.scaling SOURCE [--metric M] [--x flops|samples|params|all] [--out DIR]

SOURCE is a folder of run folders (each with the summary.json that pipeline/run/summary.py writes) or a
sweep YAML. Writes scaling.json (every fit, every point) and scaling_<x>.png per x, and prints a table.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # drawn without pyplot: no backend to choose, no global state

from pipeline.common import metric_keys
from pipeline.common.tables import markdown_table  # noqa: E402
from pipeline.run.files import read_summary  # noqa: E402
from pipeline.sweeps.grid import run_dirs  # noqa: E402

X_AXES = {"flops": "training compute (FLOPs)", "samples": "samples seen", "params": "model parameters"}


def pareto_frontier(xs, errors) -> list:
    """Indices of the points that no other point beats with x <= theirs and a lower error, sorted by x.
    Of points sharing an x only the lowest error is kept (the first, on an exact tie)."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], errors[i]))
    frontier, best = [], float("inf")
    for i in order:
        if errors[i] < best:
            frontier.append(i)
            best = errors[i]
    return frontier


def logs(xs, errors) -> tuple:
    xs, errors = np.asarray(xs, dtype=float), np.asarray(errors, dtype=float)
    if not ((xs > 0).all() and (errors > 0).all()):
        raise ValueError("a power law needs positive x and errors (a run at 100% accuracy has none)")
    return np.log(xs), np.log(errors)


def least_squares(lx: np.ndarray, le: np.ndarray) -> tuple:
    """Slope and intercept of le on lx along the last axis: one fit per row of a batch of resamples."""
    mx, me = lx.mean(-1, keepdims=True), le.mean(-1, keepdims=True)
    slope = ((lx - mx) * (le - me)).sum(-1) / ((lx - mx) ** 2).sum(-1)
    return slope, me[..., 0] - slope * mx[..., 0]


def fit_power_law(xs, errors) -> tuple:
    """(alpha, beta) of E = beta * x^alpha: least squares of log E = log beta + alpha log x."""
    lx, le = logs(xs, errors)
    if len(set(lx)) < 2:
        raise ValueError(f"a power law needs at least 2 distinct x, got {sorted(set(xs))}")
    alpha, log_beta = least_squares(lx, le)
    return float(alpha), float(np.exp(log_beta))


def bootstrap_fits(xs, errors, n: int = 2000, seed: int = 0) -> np.ndarray:
    """(alpha, log beta) per resample of the points with replacement; resamples with fewer than
    2 distinct x (no slope) are skipped."""
    lx, le = logs(xs, errors)
    idx = np.random.default_rng(seed).integers(0, len(lx), size=(n, len(lx)))
    lx, le = lx[idx], le[idx]
    keep = lx.max(-1) > lx.min(-1)
    if not keep.any():
        raise ValueError(f"a power law needs at least 2 distinct x, got {sorted(set(xs))}")
    return np.stack(least_squares(lx[keep], le[keep]), axis=-1)


def interval(values: np.ndarray, level: float) -> tuple:
    """The central `level` percentile interval along the first axis."""
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return low, high


def bootstrap_alpha(xs, errors, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile interval of alpha over bootstrap resamples of the points."""
    low, high = interval(bootstrap_fits(xs, errors, n, seed)[:, 0], level)
    return float(low), float(high)


def extrapolation_check(xs, errors) -> dict | None:
    """Fit without the largest x (every run there: a configuration's seeds) and predict its mean error:
    does the law extrapolate one step? None with fewer than 2 distinct x left to fit."""
    largest = max(xs)
    rest = [i for i in range(len(xs)) if xs[i] != largest]
    if len({xs[i] for i in rest}) < 2:
        return None
    alpha, beta = fit_power_law([xs[i] for i in rest], [errors[i] for i in rest])
    predicted = beta * largest**alpha
    observed = float(np.mean([e for x, e in zip(xs, errors) if x == largest]))
    return {
        "held_out_x": largest,
        "observed": observed,
        "predicted": predicted,
        "relative_error": abs(predicted - observed) / observed,
    }


def collect(run_dirs) -> list:
    """The summary.json of each finished run, with its folder; unfinished or unsummarised runs are skipped."""
    rows = []
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        if summary is None:
            print(f"skipping {run_dir}: no summary.json")
            continue
        if summary.get("complete") is not True:
            print(f"skipping {run_dir}: not marked complete")
            continue
        rows.append({**summary, "run_dir": str(run_dir)})
    return rows


def configurations(rows: list) -> dict:
    """Run indices by configuration: the run folder's name, which a sweep's seeds of one run share
    (<folder>/seed<N>/<run>), in the order first seen."""
    configs = {}
    for i, row in enumerate(rows):
        configs.setdefault(os.path.basename(os.path.normpath(row["run_dir"])), []).append(i)
    return configs


def resolve_metric(rows: list, metric: str | None = None) -> str:
    """`metric`, or the first zero-shot top-1 in the runs, checked to be in every run."""
    if not rows:
        raise ValueError("no complete runs to fit")
    if metric is None:
        # Evaluators log metrics/<label>/<dataset>/<score>; only classification has a top1.
        found = [m for row in rows for m in row.get("eval", {}) if m.endswith("/" + metric_keys.TOP1)]
        if not found:
            raise ValueError(f"no zero-shot top1 metric in the runs; pass --metric, one of {available(rows)}")
        metric = found[0]
    lacking = [row.get("run_name", row["run_dir"]) for row in rows if row.get("eval", {}).get(metric) is None]
    if lacking:
        raise ValueError(f"metric {metric!r} missing from runs {lacking}; metrics every run has: {available(rows)}")
    return metric


def available(rows: list) -> list:
    common = set.intersection(*(set(row.get("eval", {})) for row in rows)) if rows else set()
    return sorted(common)


def error_of(value: float) -> float:
    """1 - accuracy as a fraction; a value above 1 is a percentage."""
    return 1 - (value / 100 if value > 1 else value)


def fit_report(
    rows: list,
    x: str = "flops",
    metric: str | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    max_error: float | None = None,
) -> dict:
    """Points, frontier, the fit on the frontier with its bootstrap interval and band, the extrapolation check.
    Configurations with a mean error above `max_error` (still near chance, where the error falls from
    chance faster than any power law) are kept as points but left off the frontier and the fit."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: expected one of {list(X_AXES)}")
    metric = resolve_metric(rows, metric)
    usable = [row for row in rows if row.get(x) is not None]
    skipped = [row.get("run_name", row["run_dir"]) for row in rows if row.get(x) is None]
    xs = [float(row[x]) for row in usable]
    errors = [error_of(row["eval"][metric]) for row in usable]
    configs = configurations(usable)
    groups = list(configs.values())
    config_xs = [float(np.mean([xs[i] for i in runs])) for runs in groups]
    config_errors = [float(np.mean([errors[i] for i in runs])) for runs in groups]
    eligible = [c for c, error in enumerate(config_errors) if max_error is None or error <= max_error]
    frontier = [
        eligible[i] for i in pareto_frontier([config_xs[c] for c in eligible], [config_errors[c] for c in eligible])
    ]
    if len(frontier) < 2:
        raise ValueError(
            f"x={x!r}: {len(frontier)} configuration(s) on the frontier, a fit needs 2"
            + (f"; runs without {x!r}: {skipped}" if skipped else "")
        )
    members = [i for c in frontier for i in groups[c]]
    fx, fe = [xs[i] for i in members], [errors[i] for i in members]
    alpha, beta = fit_power_law(fx, fe)
    fits = bootstrap_fits(fx, fe, n_boot)
    low, high = interval(fits[:, 0], level)
    # The band: percentiles over the bootstrap fits of the predicted error at each x of a grid.
    grid = np.logspace(np.log10(min(xs)), np.log10(max(xs)), 50)
    band_low, band_high = interval(np.exp(fits[:, 1:2] + fits[:, 0:1] * np.log(grid)), level)
    on = set(frontier)
    return {
        "x": x,
        "metric": metric,
        "alpha": alpha,
        "beta": beta,
        "alpha_ci": [float(low), float(high)],
        "level": level,
        "max_error": max_error,
        "extrapolation": extrapolation_check(fx, fe),
        "n_runs": len(usable),
        "n_configurations": len(configs),
        "n_frontier": len(frontier),
        "skipped": skipped,
        "points": [
            {
                "name": name,
                "run_dirs": [usable[i]["run_dir"] for i in runs],
                "x": config_xs[c],
                "error": config_errors[c],
                "errors": [errors[i] for i in runs],
                "frontier": c in on,
            }
            for c, (name, runs) in enumerate(configs.items())
        ],
        "band": {"x": grid.tolist(), "low": band_low.tolist(), "high": band_high.tolist()},
    }


def plot(report: dict, path: str) -> None:
    """Log-log: every run, the frontier of configurations' mean errors joined, the fitted law and its
    bootstrap band."""
    points = report["points"]
    front = sorted((p for p in points if p["frontier"]), key=lambda p: p["x"])
    band = report["band"]
    grid = np.asarray(band["x"])
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    runs = [(p["x"], e) for p in points for e in p["errors"]]
    ax.scatter(*zip(*runs), color="0.6", s=18, label="runs")
    ax.plot([p["x"] for p in front], [p["error"] for p in front], "o-", color="C0", label="Pareto frontier (means)")
    for p in front:
        ax.annotate(p["name"], (p["x"], p["error"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.fill_between(grid, band["low"], band["high"], color="C1", alpha=0.2, label=f"{100 * report['level']:.0f}% band")
    ax.plot(
        grid,
        report["beta"] * grid ** report["alpha"],
        "--",
        color="C1",
        label=f"E = {report['beta']:.3g} · x^{report['alpha']:.3f}",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(X_AXES[report["x"]])
    ax.set_ylabel(f"zero-shot error (1 - {report['metric'].rsplit('/', 1)[-1]})")
    low, high = report["alpha_ci"]
    ax.set_title(
        f"{report['metric']}\nalpha = {report['alpha']:.3f} ({100 * report['level']:.0f}% CI {low:.3f} to "
        f"{high:.3f}), {report['n_frontier']} of {report['n_configurations']} configurations on the frontier",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def find_runs(source: str) -> tuple:
    """(run folders, default output folder) of a folder of runs or a sweep YAML."""
    if os.path.isdir(source):
        # Every subfolder, not only those with a summary.json: collect() names the ones it skips.
        return sorted(p for p in glob.glob(os.path.join(source, "*")) if os.path.isdir(p)), source
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: neither a folder of runs nor a sweep YAML")
    dirs = list(run_dirs(source))
    if not dirs:
        raise ValueError(f"sweep {source} has no runs")
    return dirs, os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in dirs])


def format_table(reports: dict) -> str:
    rows = [["x", "alpha", "CI", "beta", "extrapolation rel. error", "runs", "configurations", "frontier"]]
    for x, r in reports.items():
        ext = "-" if r["extrapolation"] is None else f"{100 * r['extrapolation']['relative_error']:.1f}%"
        low, high = r["alpha_ci"]
        rows.append(
            [x, f"{r['alpha']:.4f}", f"[{low:.4f}, {high:.4f}]", f"{r['beta']:.4g}", ext]
            + [r["n_runs"], r["n_configurations"], r["n_frontier"]]
        )
    return markdown_table(rows)


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sweeps.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a folder of run folders (each with summary.json) or a sweep YAML")
    parser.add_argument("--metric", help="an eval metric of summary.json (default: the first zero-shot top1)")
    parser.add_argument("--x", choices=[*X_AXES, "all"], default="all", help="the x axis to fit (default: all)")
    parser.add_argument("--out", help="for scaling.json and the plots (default: the folder holding the runs)")
    parser.add_argument(
        "--max-error", type=float, help="fit only configurations whose mean error is at most this (out of chance)"
    )
    args = parser.parse_args(argv)
    dirs, out = find_runs(args.source)
    rows = collect(dirs)
    metric = resolve_metric(rows, args.metric)
    reports, failures = {}, []
    for x in X_AXES if args.x == "all" else [args.x]:
        try:
            reports[x] = fit_report(rows, x, metric, max_error=args.max_error)
        except ValueError as e:
            failures.append(str(e))
    if failures and (args.x != "all" or not reports):
        raise ValueError("; ".join(failures))
    out = args.out or out
    os.makedirs(out, exist_ok=True)
    for x, report in reports.items():
        plot(report, os.path.join(out, f"scaling_{x}.png"))
    with open(os.path.join(out, "scaling.json"), "w") as f:
        json.dump({"source": args.source, "metric": metric, "fits": reports}, f, indent=2)
    limit = "" if args.max_error is None else f" (configurations with mean error <= {args.max_error})"
    print(
        f"{metric}: E = beta * x^alpha on the Pareto frontier of {len(rows)} runs{limit}\n\n{format_table(reports)}\n"
    )
    for failure in failures:  # with --x all, an axis the runs lack (flops unknown) is left out, not fatal
        print(f"not fitted: {failure}")
    print(f"fits:  {os.path.join(out, 'scaling.json')}")
    print("plots: " + ", ".join(os.path.join(out, f"scaling_{x}.png") for x in reports))


if __name__ == "__main__":
    main()
