"""The same config on 1, 2 and 4 ranks: how far the per-batch losses move, and whether every
global batch holds the same samples.

    python bench/world_size.py                  # after `make shards`; CPU, gloo
    python bench/world_size.py --batches 40 --modes ddp FULL_SHARD

The demo recipe, small (tests/conftest.py's SMALL_MODEL), global batch 16, FLIP patch masking 0.5
and text masking 0.25, deterministic kernels. The reference is one rank with the batch as 4
micro-batches of 4; each other run is compared with it batch by batch through its metrics.csv
(`loss/train/total`, `data/sample_hash`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.run.files import read_metrics  # noqa: E402
from tests.conftest import SMALL_MODEL  # noqa: E402


def run(folder: str, ranks: int, mode: str, batches: int) -> dict:
    bin_dir = os.path.dirname(sys.executable)
    launcher = [sys.executable] if ranks == 1 else [os.path.join(bin_dir, "composer"), "-n", str(ranks)]
    extra = ["device_train_microbatch_size=4"] if ranks == 1 else []
    command = [
        *launcher,
        os.path.join(REPO, "pipeline", "train.py"),
        os.path.join(REPO, "yamls", "demo_cpu.yaml"),
        f"run_dir={folder}",
        f"max_duration={batches}ba",
        "data.global_batch_size=16",
        "data.num_workers=0",
        "progress_bar=false",
        "deterministic=true",
        "scheduler.warmup=2ba",
        f"parallelism.sharding={mode}",
        "algorithms.patch_masking.ratio=0.5",
        "algorithms.text_masking.ratio=0.25",
        *SMALL_MODEL,
        *extra,
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    rows = read_metrics(os.path.join(folder, "metrics.csv"))
    return {metric: [v for _, name, v in rows if name == metric] for metric in ("loss/train/total", "data/sample_hash")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=["ddp", "FULL_SHARD", "HYBRID_SHARD"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        reference = run(os.path.join(root, "reference"), 1, "ddp", args.batches)
        print(
            "| run | batches | same samples in every batch | max relative loss difference vs 1 rank (4 micro-batches) |"
        )
        print("|---|---|---|---|")
        for mode in args.modes:
            for ranks in args.ranks:
                other = run(os.path.join(root, f"{mode}-{ranks}"), ranks, mode, args.batches)
                same = other["data/sample_hash"] == reference["data/sample_hash"]
                worst = max(
                    abs(a - b) / abs(b) for a, b in zip(other["loss/train/total"], reference["loss/train/total"])
                )
                print(
                    f"| {mode}, {ranks} ranks | {len(other['loss/train/total'])} | {'yes' if same else 'no'} "
                    f"| {worst:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
