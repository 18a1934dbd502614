"""Sweeps: expansion and naming, skipping finished runs, a killed sweep resuming, a mini sweep end to
end with its report, FLIP's masked inference, and the wall-clock budget."""

import csv
import glob
import json
import os
import signal
import statistics
import subprocess
import time
from dataclasses import replace

import pytest
import scipy.stats
from omegaconf import OmegaConf

import pipeline.evaluation.evaluate
import pipeline.sweep
from pipeline.config.schema import ConfigError, EvalConfig, EvalDatasetConfig, EvalTask, SweepConfig, TrainConfig, load
from pipeline.model.towers import SamplePatchDropout
from pipeline.run.files import MASKED_SCORES_FILE
from pipeline.run.saved import write_run_config
from pipeline.sweep import main, run_all
from pipeline.sweeps.grid import expand, load_sweep, run_dirs
from pipeline.sweeps.report import report
from tests.conftest import DEMO_YAML, PYTHON, REPO, run_train, train_here, train_overrides
from tests.tiny import NUM_PATCHES, TINY

TINY_DEMO = [
    f"model.custom.{k}"
    for k in (
        "embed_dim=32",
        "vision_cfg.width=32",
        "vision_cfg.layers=1",
        "text_cfg.width=32",
        "text_cfg.heads=1",
        "text_cfg.layers=1",
    )
]
QUICK = ["data.global_batch_size=16", "scheduler.warmup=1ba", "checkpoint.save_interval=2ba", *TINY_DEMO]


def write_sweep(path, **keys) -> str:
    OmegaConf.save({"name": "s", "train": DEMO_YAML, "folder": str(path.parent / "runs"), **keys}, str(path))
    return str(path)


def as_dict(overrides: list) -> dict:
    return dict(o.split("=", 1) for o in overrides)


def eval_datasets(sample_cfg) -> dict:
    coco_test, web_test = sample_cfg.sources["coco_test"].out, sample_cfg.sources["web_test"].out
    return {
        "fashion_mnist": {
            "type": "classification",
            "local": coco_test,
            "classnames": f"{coco_test}/classnames.txt",
            "templates": f"{coco_test}/zeroshot_classification_templates.txt",
            "batch_size": 100,
        },
        "emoji": {"type": "retrieval", "local": web_test, "batch_size": 128},
    }


def sweep_of(sample_cfg, tmp_path, *extra: str, **keys) -> str:
    """A sweep of the demo recipe, tiny and quick, on the test build of the sample."""
    overrides = as_dict(train_overrides(sample_cfg, tmp_path / "unused", *QUICK, *extra))
    del overrides["run_dir"]  # each run's is the sweep's
    return write_sweep(tmp_path / "sweep.yaml", overrides=overrides, **keys)


# ---------------------------------------------------------------------------
# Expansion, naming, --print, skipping (no training)
# ---------------------------------------------------------------------------


def test_grid_and_runs_expand_into_named_runs_under_the_folder(tmp_path):
    path = write_sweep(
        tmp_path / "sweep.yaml",
        save_folder="s3://bucket/sweeps/s",
        labels={"algorithms.patch_masking.ratio": "masking", "max_duration": "samples"},
        overrides={"eval_interval": "20ba", "data": {"num_workers": 0}},
        grid={"algorithms.patch_masking.ratio": [0.5, 0.75], "max_duration": ["6400sp", "12800sp"]},
        runs=[
            {
                "name": "tuned",
                "model.pretrained.path": "${folder}/masking0.75-samples6400sp/checkpoints/latest-rank0.pt",
            }
        ],
    )
    sweep, runs = load_sweep(path)
    assert [r.name for r in runs] == [
        "masking0.5-samples6400sp",
        "masking0.5-samples12800sp",
        "masking0.75-samples6400sp",
        "masking0.75-samples12800sp",
        "tuned",
    ]
    assert run_dirs(path) == [os.path.join(sweep.folder, r.name) for r in runs]
    first, tuned = as_dict(runs[0].args), as_dict(runs[-1].args)
    assert first["eval_interval"] == "20ba" and first["data.num_workers"] == "0"
    assert first["algorithms.patch_masking.ratio"] == "0.5" and first["max_duration"] == "6400sp"
    assert (
        first["run_dir"] == os.path.join(sweep.folder, "masking0.5-samples6400sp")
        and first["checkpoint.autoresume"] == "true"
    )
    assert first["checkpoint.save_folder"] == "s3://bucket/sweeps/s/masking0.5-samples6400sp"
    assert first["run_name"] == "s-masking0.5-samples6400sp"
    assert tuned["model.pretrained.path"] == f"{sweep.folder}/masking0.75-samples6400sp/checkpoints/latest-rank0.pt"
    assert "algorithms.patch_masking.ratio" not in tuned


def test_seeds_repeat_every_run_in_a_folder_per_seed_and_the_report_pairs_them_by_seed(tmp_path):
    path = write_sweep(
        tmp_path / "sweep.yaml",
        seeds=[3, 4, 5],
        labels={"algorithms.patch_masking.ratio": "masking"},
        grid={"algorithms.patch_masking.ratio": [0.0, 0.5]},
        runs=[{"name": "tuned", "model.pretrained.path": "${folder}/masking0.5/checkpoints/latest-rank0.pt"}],
        metrics=["fashion_mnist/top1"],
        overrides={"eval_datasets": {"fashion_mnist": {"type": "classification", "local": "unread"}}},
    )
    sweep, runs = load_sweep(path)
    names = ("masking0.0", "masking0.5", "tuned")
    assert [(r.name, r.seed) for r in runs] == [(n, s) for s in (3, 4, 5) for n in names]
    for run in runs:
        args = as_dict(run.args)
        seed_folder = os.path.join(sweep.folder, f"seed{run.seed}")
        assert run.run_dir == args["run_dir"] == os.path.join(seed_folder, run.name)
        assert args["seed"] == str(run.seed) and args["run_name"] == f"s-{run.name}-seed{run.seed}"
        if run.name == "tuned":  # the same seed's parent
            assert args["model.pretrained.path"] == f"{seed_folder}/masking0.5/checkpoints/latest-rank0.pt"

    # Finished runs, with made-up scores: the report's means, intervals and paired differences.
    top1 = {"masking0.0": [0.60, 0.62, 0.67], "masking0.5": [0.64, 0.65, 0.72], "tuned": [0.66, 0.70, 0.73]}
    masked_top1 = [0.55, 0.61, 0.63]
    for run in runs:
        os.makedirs(run.run_dir)
        write_run_config(load(TrainConfig, sweep.train, run.args))
        value = top1[run.name][run.seed - 3]
        summary = {"complete": True, "batches": 10, "samples": 1280, "wall_seconds": 10.0, "flops": 1e12}
        summary.update(params=7e6, eval={"metrics/fashion_mnist/fashion_mnist/top1": value})
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
        if run.name == "masking0.5":  # its masked inference, as the report caches it
            masked = {"datasets": {"fashion_mnist": {"top1": masked_top1[run.seed - 3]}}}
            with open(os.path.join(run.run_dir, MASKED_SCORES_FILE), "w") as f:
                json.dump(masked, f)
    text = report(sweep, runs)

    def interval(values, sign="") -> str:
        mean, half = statistics.fmean(values), scipy.stats.t.ppf(0.975, 2) * statistics.stdev(values) / 3**0.5
        return f"{100 * mean:{sign}.2f} [{100 * (mean - half):{sign}.2f}, {100 * (mean + half):{sign}.2f}]"

    lines = text.splitlines()
    assert sum(line.startswith("| masking0.5 | 4 |") for line in lines) == 1  # a row per run and seed
    for name in ("masking0.5", "tuned"):
        assert f"| {name} | 3 | 128 | 10 | {interval(top1[name])} |" in text
    differences = {
        "masking0.5 - masking0.0": [a - b for a, b in zip(top1["masking0.5"], top1["masking0.0"])],
        "masking0.5: full - masked inference": [a - b for a, b in zip(top1["masking0.5"], masked_top1)],
        "tuned - masking0.0": [a - b for a, b in zip(top1["tuned"], top1["masking0.0"])],
        "tuned - masking0.5": [a - b for a, b in zip(top1["tuned"], top1["masking0.5"])],
    }
    for label, values in differences.items():
        assert f"| {label} | 3 | {interval(values, '+')} |" in text
    assert (tmp_path / "runs" / "report.md").read_text() == text + "\n"
    assert (tmp_path / "runs" / "report.png").stat().st_size > 0


def test_a_grid_group_sets_keys_together_and_is_named_by_its_name(tmp_path):
    group = {"name": "w64", "model.custom": {"vision_cfg": {"width": 64}, "text_cfg": {"width": 64}}}
    other = {"name": "w32", "model.custom.embed_dim": 32}
    sweep = load(SweepConfig, write_sweep(tmp_path / "s.yaml", grid={"size": [group, other]}))
    small, large = expand(sweep)
    assert (small.name, large.name) == ("w64", "w32")
    assert {"model.custom.vision_cfg.width=64", "model.custom.text_cfg.width=64"} <= set(small.args)
    assert "model.custom.embed_dim=32" in large.args and not any(a.startswith("size") for a in small.args + large.args)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yamls", "sweeps", "*.yaml"))))
def test_every_sweep_yaml_expands_into_valid_runs(path):
    sweep, runs = load_sweep(path)  # every run's training config checked
    assert len(runs) > 1 and all(run.run_dir.startswith(sweep.folder) for run in runs)


def test_typos_and_clashing_names_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'grid'"):
        load_sweep(write_sweep(tmp_path / "a.yaml", gird={"seed": [1, 2]}))
    with pytest.raises(ConfigError, match=r"run seed1: .*Did you mean 'algorithms.patch_masking.ratio'"):
        load_sweep(
            write_sweep(tmp_path / "b.yaml", grid={"seed": [1, 2]}, overrides={"algorithms.patch_masking.ration": 0.5})
        )
    with pytest.raises(ConfigError, match="share the names x"):
        load_sweep(write_sweep(tmp_path / "c.yaml", runs=[{"name": "x", "seed": 1}, {"name": "x", "seed": 2}]))


def test_print_emits_one_launch_command_per_run(tmp_path, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", grid={"seed": [1, 2]}, launcher="composer -n 8")
    main(["--print", path, "overrides.max_duration=10ba"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"composer -n 8 pipeline/train.py {DEMO_YAML} ") for line in lines)
    assert "max_duration=10ba" in lines[0] and "seed=1" in lines[0] and "seed=2" in lines[1]


def test_finished_runs_are_skipped_and_a_failed_run_stops_the_sweep(tmp_path, monkeypatch):
    sweep, runs = load_sweep(write_sweep(tmp_path / "sweep.yaml", grid={"seed": [1, 2, 3]}))
    os.makedirs(runs[0].run_dir)
    with open(os.path.join(runs[0].run_dir, "summary.json"), "w") as f:
        json.dump({"complete": True}, f)
    launched = []

    def fake_train(_, argv):
        launched.append(argv[argv.index(sweep.train) + 1 :])
        return 1 if len(launched) == 2 else 0

    monkeypatch.setattr(pipeline.sweep, "train_in_child", fake_train)
    with pytest.raises(SystemExit, match="run seed3 failed .* again to continue"):
        run_all(sweep, runs)
    assert launched == [runs[1].args, runs[2].args]


# ---------------------------------------------------------------------------
# FLIP's masked inference: an eval flag, training's own module
# ---------------------------------------------------------------------------


def test_masked_inference_changes_the_scores_through_the_installed_patch_dropout(sample_build, monkeypatch):
    cfg, _ = sample_build
    datasets = {name: EvalDatasetConfig(**{**d, "type": EvalTask(d["type"])}) for name, d in eval_datasets(cfg).items()}
    full_cfg = EvalConfig(model=TINY, datasets=datasets, num_workers=0)
    installed, kept_tokens = [], []
    install = pipeline.evaluation.evaluate.install_patch_dropout

    def spy(clip, ratio, seed):
        module = install(clip, ratio, seed)
        installed.append((module, ratio))
        module.register_forward_hook(lambda m, args, out: kept_tokens.append((m.training, clip.training, out.shape[1])))
        return module

    monkeypatch.setattr(pipeline.evaluation.evaluate, "install_patch_dropout", spy)
    full = evaluate_scores(full_cfg)
    assert not installed
    masked = evaluate_scores(replace(full_cfg, patch_masking=0.75))
    ((module, ratio),) = installed
    assert isinstance(module, SamplePatchDropout) and ratio == 0.75
    # Only the dropout module is in training mode; each image keeps its class token + 25% of its patches.
    assert kept_tokens and set(kept_tokens) == {(True, False, 1 + NUM_PATCHES // 4)}
    assert masked != full
    assert evaluate_scores(replace(full_cfg, patch_masking=0.75)) == masked  # seeded: the same masks again
    with pytest.raises(ConfigError, match=r"patch_masking must be in \[0, 1\)"):
        load(EvalConfig, None, ["patch_masking=1.0"])


def evaluate_scores(cfg: EvalConfig) -> dict:
    return {
        name: {k: v for k, v in r.items() if k != "images"}
        for name, r in pipeline.evaluation.evaluate.evaluate(cfg)["datasets"].items()
    }


# ---------------------------------------------------------------------------
# Training: the wall-clock budget, a mini sweep end to end, a killed sweep
# ---------------------------------------------------------------------------


def read_rows(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        return [(int(r["batch"]), r["metric"], float(r["value"])) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_wall_clock_budget_ends_the_run_complete_with_the_lr_schedule_spent(sample_build, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "timed"
    overrides = train_overrides(
        cfg, run_dir, *QUICK, "max_wall_clock=6", "max_duration=100000ba", "checkpoint.autoresume=true"
    )
    train_here(overrides)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_rows(run_dir)
    trained = [3600 * value for _, metric, value in rows if metric == "time/train"]  # hours, after each batch
    assert trained[-1] == pytest.approx(summary["wall_seconds"], abs=0.01)
    # It ended with the first batch to end past the budget, however long batches took meanwhile.
    assert summary["complete"] and trained[-2] < 6 <= summary["wall_seconds"] and summary["batches"] < 100000
    lrs = [value for _, metric, value in rows if metric == "lr-AdamW/group0"]
    assert lrs[-1] < 0.25 * max(lrs)  # the cosine spans the budget, not max_duration
    flops = [value for _, metric, value in rows if metric == "flops/batch"]
    assert len(flops) == summary["batches"] and summary["flops"] == pytest.approx(sum(flops)) and summary["params"] > 0
    again = run_train(PYTHON, overrides)  # a retried job: the budget is spent
    assert "already complete" in again.stdout
    assert json.loads((run_dir / "summary.json").read_text())["batches"] == summary["batches"]


def unmasked_batch_flops(sample_cfg, tmp_path) -> float:
    """Training FLOPs of one QUICK batch without patch masking, from the model itself."""
    from pipeline.model.clip import build_clip, training_flops

    train = load(TrainConfig, DEMO_YAML, train_overrides(sample_cfg, tmp_path / "unused", *QUICK))
    built = build_clip(train.model)
    return training_flops(built.clip.train(), 16, built.tokenizer(["a"]).shape[1])


@pytest.mark.slow
def test_mini_sweep_at_equal_flops_trains_evaluates_and_reports(sample_build, tmp_path, capsys):
    """budget.flops: the masked run trains more batches, and both spend the budget to within a batch
    as the FLOPs callback counts them."""
    cfg, _ = sample_build
    budget = 4 * unmasked_batch_flops(cfg, tmp_path)
    path = sweep_of(
        cfg,
        tmp_path,
        "max_duration=100ba",  # replaced by the budget's batches
        "eval_interval=3ba",
        grid={"algorithms.patch_masking.ratio": [0.0, 0.5]},
        labels={"algorithms.patch_masking.ratio": "masking"},
        budget={"flops": budget},
    )
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(path), {"overrides": {"eval_datasets": eval_datasets(cfg)}}), path)
    started = time.time()
    main([path])
    sweep, runs = load_sweep(path)
    summaries = [json.loads(open(os.path.join(run.run_dir, "summary.json")).read()) for run in runs]
    for run, summary in zip(runs, summaries):
        batches = summary["batches"]
        assert summary["complete"] and summary["samples"] == 16 * batches
        assert summary["params"] > 0 and summary["wall_seconds"] > 0
        assert abs(summary["flops"] - budget) <= summary["flops"] / batches  # within one of its batches
        # Evaluated every 3 batches and at the end: the summary holds the final scores.
        top1 = [(b, v) for b, m, v in read_rows(run.run_dir) if m == "metrics/fashion_mnist/fashion_mnist/top1"]
        assert [b for b, _ in top1] == sorted({*range(3, batches + 1, 3), batches})
        assert summary["eval"]["metrics/fashion_mnist/fashion_mnist/top1"] == top1[-1][1]
    assert summaries[0]["batches"] == 4 and summaries[1]["batches"] > 4  # masked patches cost nothing
    main(["--report", path])
    table = (tmp_path / "runs" / "report.md").read_text().splitlines()
    assert len(table) == 4 and "fashion_mnist/top1 (masked inference)" in table[0]
    assert table[2].startswith("| masking0.0 | 0 |") and table[2].endswith("| - | - | - | - | - | - | - | - | - |")
    assert table[3].startswith("| masking0.5 | 0.5 |") and not table[3].endswith("| - |")  # masked-inference scores
    assert (tmp_path / "runs" / "report.png").stat().st_size > 0
    print(f"mini sweep: {time.time() - started:.0f} s")


@pytest.mark.slow
def test_killed_sweep_continues_the_run_it_was_in(sample_build, tmp_path):
    cfg, _ = sample_build
    path = sweep_of(cfg, tmp_path, grid={"seed": [1, 2]}, budget={"samples": 128})  # 8 batches of 16
    first, second = run_dirs(path)
    command = [*PYTHON, "-m", "pipeline.sweep", path]
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        checkpoint = os.path.join(second, "checkpoints", "ep0-ba4-rank0.pt")
        deadline = time.time() + 300
        while not os.path.exists(checkpoint):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the run it was in
        proc.wait()
    assert not json.loads(open(os.path.join(second, "summary.json")).read())["complete"]
    first_record = open(os.path.join(first, "metrics.csv")).read()
    earlier = os.stat(os.path.join(second, "checkpoints", "ep0-ba2-rank0.pt")).st_mtime_ns
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[1/2] seed1: complete, skipped" in again.stdout
    assert open(os.path.join(first, "metrics.csv")).read() == first_record  # not run again
    # The second run continued from its checkpoint: the earlier one is untouched, every batch logged once.
    assert os.stat(os.path.join(second, "checkpoints", "ep0-ba2-rank0.pt")).st_mtime_ns == earlier
    assert json.loads(open(os.path.join(second, "summary.json")).read())["complete"]
    losses = [b for b, m, _ in read_rows(second) if m == "loss/train/total"]
    assert losses == list(range(8))
