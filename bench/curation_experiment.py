"""Does curation help, at equal samples seen? On the built-in sample: the top 50% by CLIP score
against a random 50%, and semantic dedup against none.

    python bench/curation_experiment.py                 # after `make shards`; about 25 min on 2 cores
    python bench/curation_experiment.py --seeds 17 18 19 --batches 300

1. The scorer: the demo recipe trained on the sample (--scorer-batches), exported in open_clip's
   hub layout (pipeline/export.py), so `make shards` opens it as `local-dir:`.
2. The training streams (web + coco) in four variants, each built by `make shards`' own code from
   the same downloads (data/_work): all rows; the best 50% by CLIP score (`top_fraction: 0.5`);
   a random 50% of all rows (seeded); semantic dedup (`dedup_semantic`, --threshold).
3. The demo recipe trained on each variant for the same --batches (so the same samples seen), per
   seed, then scored zero-shot by pipeline/eval.py (Fashion-MNIST top-1, emoji retrieval R@5).

Prints a markdown table: per variant the mean over seeds and a 95% confidence interval (Student's
t over seeds), and each variant's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("web", "coco")
METRICS = {"fashion top-1": ("fashion_mnist", "top1"), "emoji image->text R@5": ("emoji", "image_to_text_R@5")}
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}  # Student's t, two-sided 95%, by degrees of freedom


def run(*command: str) -> None:
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def train(run_dir: str, streams: dict, batches: int, seed: int) -> dict:
    """The demo recipe on `streams` ({source: folder}), then its zero-shot scores."""
    data = [f"data.streams.{name}.local={folder}" for name, folder in streams.items()]
    run(
        sys.executable,
        "pipeline/train.py",
        "yamls/demo_cpu.yaml",
        f"run_dir={run_dir}",
        f"max_duration={batches}ba",
        f"seed={seed}",
        "progress_bar=false",
        f"checkpoint.save_interval={batches}ba",
        *data,
    )
    scores = os.path.join(run_dir, "zeroshot.json")
    run(sys.executable, "pipeline/eval.py", "yamls/eval/zeroshot.yaml", f"load_path={run_dir}", f"output={scores}")
    with open(scores) as f:
        return json.load(f)["datasets"]


def build_variant(folder: str, filters: dict) -> dict:
    """The sample's training sources with extra `filters`, written under `folder`, from data/_work."""
    out = {name: os.path.join(folder, name) for name in SOURCES}
    if not all(os.path.isfile(os.path.join(path, "index.json")) for path in out.values()):
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(os.path.join(REPO, "yamls", "data", "sample.yaml"))
        cfg.sources = {name: cfg.sources[name] for name in SOURCES}
        for name in SOURCES:
            cfg.sources[name].out = out[name]
            cfg.sources[name].filters = {**cfg.sources[name].get("filters", {}), **filters}
        path = os.path.join(folder, "sources.yaml")
        os.makedirs(folder, exist_ok=True)
        OmegaConf.save(cfg, path)
        run(sys.executable, "-m", "data_prep.build", path)
    return out


def random_half(folder: str, seed: int) -> dict:
    """A seeded random 50% of each full training stream, with the same columns."""
    from streaming import StreamingDataset

    from data_prep.eval_sets import write_mds

    out = {}
    for name in SOURCES:
        source = os.path.join(REPO, "data", "sample", name)
        out[name] = os.path.join(folder, name)
        if os.path.isfile(os.path.join(out[name], "index.json")):
            continue
        with open(os.path.join(source, "index.json")) as f:
            shard = json.load(f)["shards"][0]
        columns = dict(zip(shard["column_names"], shard["column_encodings"]))
        dataset = StreamingDataset(local=source, batch_size=1, shuffle=False)
        kept = sorted(random.Random(seed).sample(range(dataset.num_samples), dataset.num_samples // 2))
        write_mds(out[name], columns, (dataset[i] for i in kept))
    return out


def stream_rows(path: str) -> int:
    with open(os.path.join(path, "index.json")) as f:
        return sum(shard["samples"] for shard in json.load(f)["shards"])


def confidence(values: list) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{100 * mean:.2f}"
    half = T_95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return f"{100 * mean:.2f} ± {100 * half:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="runs/curation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[17, 18])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--scorer-batches", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.95, help="semantic dedup's cosine")
    args = parser.parse_args()
    folder = os.path.join(REPO, args.folder)
    scorer = os.path.join(folder, "scorer")
    if not os.path.isfile(os.path.join(scorer, "export", "open_clip_config.json")):
        train(scorer, {}, args.scorer_batches, 0)
        run(sys.executable, "pipeline/export.py", "yamls/eval/zeroshot.yaml", f"{scorer}/export", f"load_path={scorer}")
    clip = {"model": f"local-dir:{scorer}/export"}
    variants = {
        "all rows": {name: os.path.join(REPO, "data", "sample", name) for name in SOURCES},
        "top 50% by CLIP score": build_variant(f"{folder}/top50", {"clip_score": {**clip, "top_fraction": 0.5}}),
        "random 50%": random_half(f"{folder}/random50", seed=0),
        f"semantic dedup ({args.threshold})": build_variant(
            f"{folder}/semdedup", {"clip_score": clip, "dedup_semantic": {"threshold": args.threshold}}
        ),
    }
    results = {}
    for variant, streams in variants.items():
        rows = sum(stream_rows(path) for path in streams.values())
        name = variant.split(" (")[0].replace(" ", "_").replace("%", "")
        runs = [train(f"{folder}/runs/{name}-{seed}", streams, args.batches, seed) for seed in args.seeds]
        results[variant] = (rows, runs)
        print(json.dumps({variant: [rows, runs]}), file=sys.stderr, flush=True)
    print(
        f"\n{args.batches} batches of 128 per run (the same samples seen), seeds {args.seeds}; "
        "mean ± 95% CI over seeds (%)\n"
    )
    print("| training data | rows | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for variant, (rows, runs) in results.items():
        cells = [confidence([r[dataset][score] for r in runs]) for dataset, score in METRICS.values()]
        print(f"| {variant} | {rows:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
