"""Sweeps: one training recipe, many named runs (FLIP's ablations, scaling-law grids).

    python -m pipeline.sweep yamls/sweeps/flip_ablation.yaml [key=value ...]  # here, one after another
    python -m pipeline.sweep --print yamls/sweeps/scaling.yaml                # one launch command per run
    python -m pipeline.sweep --report yamls/sweeps/flip_ablation.yaml         # table + plot of its runs

A sweep YAML (SweepConfig in pipeline/config/schema.py) names a training YAML, overrides common to every
run, a `grid:` (one run per point of the cartesian product) and/or a `runs:` list (one run per
entry). Each run is an ordinary pipeline/train.py run with checkpoint.autoresume in <folder>/<run name>,
in its own process forked from a fork server that imported the pipeline once for all runs: a
killed sweep, started again, continues the run it was in from its last checkpoint, and runs whose
summary.json says complete are skipped. key=value arguments override the sweep's own keys
(folder=..., overrides.max_wall_clock=60, ...). The runs come from pipeline/sweeps/grid.py and the
report from pipeline/sweeps/report.py.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import shlex
import sys

from pipeline import compat
from pipeline.config.schema import ConfigError, SweepConfig
from pipeline.run.files import read_summary
from pipeline.sweeps.grid import Run, load_sweep
from pipeline.sweeps.report import report


def is_complete(run_dir: str) -> bool:
    return bool((read_summary(run_dir) or {}).get("complete"))


def launch_command(sweep: SweepConfig, run: Run) -> str:
    return shlex.join([*shlex.split(sweep.launcher), "pipeline/train.py", sweep.train, *run.args])


def train_run(argv: list) -> None:
    """pipeline/train.py's main in a process forked from the sweep's fork server, which imported torch,
    Composer and the pipeline once for every run (about 9 s a run on 2 cores). It leaves as a process
    that ran train.py would: multiprocessing ends its children without atexit, which runs here, so
    streaming unlinks the run's shared memory and Composer closes its loggers."""
    atexit._clear()  # the fork server's handlers are its own
    # A fork server's child inherits its start method; the run's loader workers would each start a
    # fork server of their own, a fresh interpreter importing everything (8 s a loader).
    multiprocessing.set_start_method(None, force=True)  # the platform's default, as train.py has it
    try:
        from pipeline.train import main as train_main  # imported already: the fork server preloads it

        train_main(argv)
    finally:
        atexit._run_exitfuncs()


def train_in_child(context, argv: list) -> int:
    child = context.Process(target=train_run, args=(argv,), name="train")
    child.start()
    child.join()
    return child.exitcode


def run_all(sweep: SweepConfig, runs: list) -> None:
    # Forked, not spawned, so each run starts with the imports done; from a fork server, which has run
    # no torch op, because OpenMP's threads do not survive a fork of a process that used them (a
    # forked child of this process, after a test or a report, would hang at its first parallel op).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.train"])
    for number, run in enumerate(runs, 1):
        if is_complete(run.run_dir):
            print(f"[{number}/{len(runs)}] {run.title}: complete, skipped", flush=True)
            continue
        print(f"[{number}/{len(runs)}] {run.title}: training in {run.run_dir}", flush=True)
        # Same process group: a sweep killed as a group takes its run with it.
        code = train_in_child(context, [sweep.train, *run.args])
        if code != 0:
            sys.exit(
                f"Sweep stopped: run {run.title} failed (exit {code}). Run the same command again to "
                "continue it from its last checkpoint."
            )
        if not is_complete(run.run_dir):
            print(f"warning: {run.title} ended without a complete summary.json", file=sys.stderr)


def main(argv: list) -> None:
    compat.apply()
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
