"""A sweep YAML -> its runs: names, run folders and each run's pipeline/train.py overrides.

A sweep (SweepConfig in pipeline/config/schema.py) names a training YAML, overrides common to every run,
a `grid:` (one run per point of the cartesian product) and/or a `runs:` list (one run per entry).
A run is named by its values that differ between runs; it trains in <folder>/<run name> with
checkpoint.autoresume; with `seeds:`, every run repeats per seed in <folder>/seed<N>/<run name>.
`run_dirs(path)` lists the run folders for collectors such as pipeline/sweeps/scaling.py and
pipeline/sweeps/report.py.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from pipeline.config.schema import ConfigError, SweepBudget, SweepConfig, TrainConfig, load


@dataclass
class Run:
    name: str
    run_dir: str
    args: list  # pipeline/train.py's key=value overrides
    seed: Optional[int] = None  # the sweep's seed it repeats for; None: the sweep has no seeds

    @property
    def title(self) -> str:
        return self.name if self.seed is None else f"{self.name} (seed {self.seed})"


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


def expand(sweep: SweepConfig, seed: Optional[int] = None) -> list:
    """The sweep's runs in order: the grid's points, then the `runs` entries (for `seed`, if given)."""
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
        run_name = f"{sweep.name}-{name}" if seed is None else f"{sweep.name}-{name}-seed{seed}"
        managed = {"run_name": run_name, "run_dir": run_dir, "checkpoint.autoresume": True}
        if sweep.budget is not None and "max_duration" not in run_keys(values):
            train = load(
                TrainConfig, sweep.train, [f"{k}={cli_value(v)}" for k, v in {**common, **run_keys(values)}.items()]
            )
            managed.update(max_duration=f"{budget_batches(sweep.budget, train)}ba", max_wall_clock=None)
        if sweep.save_folder is not None:
            managed["checkpoint.save_folder"] = f"{sweep.save_folder.rstrip('/')}/{name}"
        args = [f"{k}={cli_value(v)}" for k, v in {**common, **run_keys(values), **managed}.items()]
        runs.append(Run(name, run_dir, args, seed))
    duplicates = sorted({r.name for r in runs if [s.name for s in runs].count(r.name) > 1})
    if duplicates:
        raise ConfigError(f"runs share the names {', '.join(duplicates)}: give the `runs` entries a `name`")
    return runs


def budget_batches(budget: SweepBudget, train: TrainConfig) -> int:
    """The batches of `train` that spend `budget`: samples, or training FLOPs as the FLOPs callback
    counts them (pipeline.model.clip.training_flops, with the run's patch masking)."""
    if budget.samples is not None:
        return max(1, round(budget.samples / train.data.global_batch_size))
    if train.algorithms.unmasked_tuning is not None:
        raise ConfigError("budget.flops: a run with unmasked_tuning changes its cost mid-run; give it a max_duration")
    from pipeline.model.clip import build_clip, training_flops
    from pipeline.model.towers import install_patch_dropout

    built = build_clip(train.model)
    if train.algorithms.patch_masking is not None:
        install_patch_dropout(built.clip, train.algorithms.patch_masking.ratio, train.seed)
    per_batch = training_flops(built.clip.train(), train.data.global_batch_size, built.tokenizer(["a"]).shape[1])
    return max(1, round(budget.flops / per_batch))


def load_sweep(path: str, overrides: list = ()) -> tuple:
    """(sweep, runs), every run's training config checked (typos fail before anything trains). With
    seeds, the runs of each seed in turn: the sweep loaded again with its folder and training seed."""
    sweep = load(SweepConfig, path, overrides)
    if not sweep.seeds:
        runs = expand(sweep)
    else:  # per seed, its own folder: ${folder} in a run's keys then names that seed's runs
        per_seed = [
            (seed, [*overrides, f"folder={sweep.folder}/seed{seed}", f"overrides.seed={seed}"]) for seed in sweep.seeds
        ]
        runs = [run for seed, keys in per_seed for run in expand(load(SweepConfig, path, keys), seed)]
    for run in runs:
        try:
            load(TrainConfig, sweep.train, run.args)
        except ConfigError as err:
            raise ConfigError(f"run {run.title}: {err}") from None
    return sweep, runs


def run_dirs(path: str) -> list:
    """The run folders of a sweep YAML, in the sweep's order."""
    return [run.run_dir for run in load_sweep(path)[1]]
