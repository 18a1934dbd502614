"""Scaling laws: the fit, its bootstrap interval, the Pareto frontier, the extrapolation check, runs -> JSON + plots."""

import json

import numpy as np
import pytest

from pipeline.sweeps.scaling import (
    bootstrap_alpha,
    collect,
    extrapolation_check,
    fit_power_law,
    fit_report,
    main,
    pareto_frontier,
)
from tests.conftest import DEMO_YAML

TOP1 = "metrics/fashion_mnist/fashion_mnist/top1"


def test_fit_recovers_a_noisy_power_law_and_its_interval_holds_the_true_exponent():
    alpha, beta = -0.15, 3.0
    xs = np.logspace(3, 7, 20)  # 4 decades
    noise = np.random.default_rng(1).normal(0, 0.02, xs.size)  # multiplicative: in log space
    errors = beta * xs**alpha * np.exp(noise)
    fitted_alpha, fitted_beta = fit_power_law(xs, errors)
    assert fitted_alpha == pytest.approx(alpha, rel=0.02)
    assert fitted_beta == pytest.approx(beta, rel=0.05)
    low, high = bootstrap_alpha(xs, errors)
    assert low < alpha < high and high - low < 0.02


def test_pareto_frontier_keeps_the_best_error_at_each_x_and_drops_dominated_points():
    xs = [4, 1, 2, 1, 5, 3, 3]
    errors = [0.35, 0.5, 0.45, 0.4, 0.2, 0.3, 0.3]
    # x=1: 0.4 beats the tie 0.5; x=2 (0.45) and x=4 (0.35) are beaten by cheaper points; x=3's exact tie kept once.
    assert pareto_frontier(xs, errors) == [3, 5, 4]


def test_extrapolation_check_predicts_the_held_out_largest_point_of_an_exact_law():
    xs = [1e15, 1e16, 1e17, 1e18]
    errors = [2.0 * x**-0.1 for x in xs]
    check = extrapolation_check(xs, errors)
    assert check["held_out_x"] == 1e18 and check["observed"] == errors[-1]
    assert check["predicted"] == pytest.approx(errors[-1], rel=1e-9)
    assert check["relative_error"] == pytest.approx(0, abs=1e-9)
    assert extrapolation_check(xs[:2], errors[:2]) is None
    # Replicates (seeds) at the largest x are held out together and compared at their mean.
    replicated = extrapolation_check([*xs, 1e18], [*errors, errors[-1] * 1.2])
    assert replicated["observed"] == pytest.approx(errors[-1] * 1.1)
    assert replicated["relative_error"] == pytest.approx(1 / 11)


def write_runs(root) -> None:
    """Five finished runs on a law in flops (one dominated, one in percent, one without flops), one unfinished."""
    runs = [
        ("a", 1e15, 1e5, 1e6, 0.40),
        ("b", 1e16, 1e6, 1e6, 0.52),
        ("c", 1e17, 1e7, 1e7, 61.0),
        ("slow", 1e17, 1e7, 1e7, 0.45),
        ("d", None, 1e8, 1e8, 0.70),
    ]
    for name, flops, samples, params, top1 in runs:
        (root / name).mkdir()
        summary = {
            "run_name": name,
            "samples": samples,
            "flops": flops,
            "params": params,
            "wall_seconds": 1.0,
            "complete": True,
            "eval": {TOP1: top1, "metrics/fashion_mnist/fashion_mnist/top5": 0.9},
        }
        (root / name / "summary.json").write_text(json.dumps(summary))
    (root / "crashed").mkdir()
    (root / "crashed" / "summary.json").write_text(json.dumps({"run_name": "crashed", "complete": False, "eval": {}}))
    (root / "no_summary").mkdir()


def test_runs_folder_to_json_and_plots_through_the_cli(tmp_path, capsys):
    runs = tmp_path / "sweep"
    runs.mkdir()
    write_runs(runs)
    main([str(runs), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "skipping" in printed and "crashed" in printed and "no_summary" in printed
    result = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert result["metric"] == TOP1 and set(result["fits"]) == {"flops", "samples", "params"}
    flops = result["fits"]["flops"]
    assert flops["n_runs"] == 4 and flops["skipped"] == ["d"]  # no flops: left out of this axis only
    assert {p["name"]: p["frontier"] for p in flops["points"]} == {"a": True, "b": True, "c": True, "slow": False}
    assert {p["name"]: p["error"] for p in flops["points"]}["c"] == pytest.approx(0.39)  # percent read as such
    assert flops["alpha"] < 0 and flops["alpha_ci"][0] <= flops["alpha"] <= flops["alpha_ci"][1]
    assert flops["extrapolation"]["held_out_x"] == 1e17
    assert result["fits"]["samples"]["n_runs"] == 5
    for x in ("flops", "samples", "params"):
        assert (tmp_path / "out" / f"scaling_{x}.png").read_bytes().startswith(b"\x89PNG")
        assert f"| {x} |" in printed


def test_a_sweep_yaml_finds_its_runs_through_pipeline_sweep_and_writes_next_to_them(tmp_path):
    runs = tmp_path / "sweep"
    runs.mkdir()
    write_runs(runs)  # the summaries the sweep's four runs left (d, crashed, no_summary are not its runs)
    sweep_yaml = tmp_path / "sweep.yaml"
    entries = "".join(f"  - {{name: {name}, seed: {seed}}}\n" for seed, name in enumerate(("a", "b", "c", "slow")))
    sweep_yaml.write_text(f"name: toy\ntrain: {DEMO_YAML}\nfolder: {runs}\nruns:\n{entries}")
    main([str(sweep_yaml), "--x", "flops"])
    assert (runs / "scaling_flops.png").exists() and not (runs / "scaling_samples.png").exists()
    fits = json.loads((runs / "scaling.json").read_text())["fits"]["flops"]
    assert fits["n_frontier"] == 3 and {p["name"] for p in fits["points"]} == {"a", "b", "c", "slow"}


def test_missing_metric_or_too_few_frontier_points_are_clear_errors(tmp_path):
    runs = tmp_path / "sweep"
    runs.mkdir()
    write_runs(runs)
    rows = collect(sorted(runs.iterdir()))
    with pytest.raises(ValueError, match=r"'metrics/imagenet/imagenet/top1' missing.*fashion_mnist/top1.*top5"):
        fit_report(rows, "flops", "metrics/imagenet/imagenet/top1")
    with pytest.raises(ValueError, match="1 configuration\\(s\\) on the frontier"):
        fit_report([r for r in rows if r["run_name"] in ("c", "slow")], "flops")
    with pytest.raises(ValueError, match="missing"):
        main([str(runs), "--metric", "metrics/imagenet/imagenet/top1", "--out", str(tmp_path / "out")])


def test_seeds_of_a_configuration_are_one_frontier_point_at_their_mean_and_every_seed_is_fitted(tmp_path):
    """A sweep's seeds (<folder>/seed<N>/<run>): the frontier is over configurations' mean errors, so one
    lucky seed does not put a configuration on it; the fit and bootstrap use each seed's run."""
    rng = np.random.default_rng(0)
    law = {"small": (1e15, 0.0), "mid": (1e16, 0.0), "big": (1e17, 0.0), "big-lucky": (1e17, 0.1)}
    seed_errors = {}
    for seed in range(3):
        for name, (flops, worse) in law.items():
            error = 2.0 * flops**-0.03 * np.exp(rng.normal(0, 0.03)) + worse
            # big-lucky: worse on average, but one seed better than any of big's
            error = 0.55 if (name == "big-lucky" and seed == 0) else error
            seed_errors.setdefault(name, []).append(error)
            run = tmp_path / f"seed{seed}" / name
            run.mkdir(parents=True)
            summary = {
                "run_name": f"s-{name}-seed{seed}",
                "flops": flops,
                "samples": 1,
                "params": 1,
                "complete": True,
                "eval": {TOP1: 1 - error},
            }
            (run / "summary.json").write_text(json.dumps(summary))
    rows = collect(sorted(tmp_path.glob("seed*/*")))
    report = fit_report(rows, "flops")
    assert report["n_runs"] == 12 and report["n_configurations"] == 4 and report["n_frontier"] == 3
    points = {p["name"]: p for p in report["points"]}
    assert not points["big-lucky"]["frontier"] and min(points["big-lucky"]["errors"]) < min(points["big"]["errors"])
    for name, errors in seed_errors.items():
        assert points[name]["errors"] == pytest.approx(errors)
        assert points[name]["error"] == pytest.approx(np.mean(errors))
    fitted = [(law[name][0], e) for name in ("small", "mid", "big") for e in seed_errors[name]]
    alpha, beta = fit_power_law(*zip(*fitted))
    assert report["alpha"] == pytest.approx(alpha) and report["beta"] == pytest.approx(beta)
    assert report["alpha_ci"][0] < alpha < report["alpha_ci"][1]
    assert report["extrapolation"]["observed"] == pytest.approx(np.mean(seed_errors["big"]))
    # Out of chance only: a configuration whose mean error is above max_error is a point, not fitted.
    away = fit_report(rows, "flops", max_error=float(np.mean(seed_errors["small"])) - 1e-6)
    assert away["n_frontier"] == 2 and not {p["name"]: p for p in away["points"]}["small"]["frontier"]
    fitted = [(law[name][0], e) for name in ("mid", "big") for e in seed_errors[name]]
    assert away["alpha"] == pytest.approx(fit_power_law(*zip(*fitted))[0])
