"""Does CLIP-score curation help on noisy captions, at equal samples seen? The built-in sample with
a share of its training captions swapped between images (as web alt-text often fails to describe its
image): all rows, against the top 70% by CLIP score, against a random 70%.

    python bench/curation_experiment.py            # after `make ablate` (the 10,000-image test set)
    python bench/curation_experiment.py --seeds 0 1 2 3 4 --batches 150 --noise 0.3 --keep 0.7

1. The noisy sample: `make shards`' own build of the sample's training sources (web + coco) with
   `noisy_captions: {share: --noise, seed: 0}`: exactly that share of rows pass their captions on
   among themselves, each row recording `caption_swapped` (its own work folder: the sample's
   downloads stay as they are).
2. The scorer: the demo recipe trained on the noisy rows themselves (--scorer-batches), exported in
   open_clip's hub layout, as LAION's filter never saw clean LAION: a filter has only the data it
   filters (or a model trained elsewhere), and a scorer trained on a clean split would know which
   captions are right by construction. 70% of the pairs it learns from are right, so it can still
   rank the swapped ones low.
3. The training data: all noisy rows; the top --keep by CLIP score (`clip_score.top_fraction`, the
   same build with the scorer); a seeded random --keep of all noisy rows. The share of swapped
   captions each keeps is read from the streams' `caption_swapped`.
4. The demo recipe on each for the same --batches (the same samples seen), per seed, scored at the end
   on all 10,000 Fashion-MNIST test images and the 365 held-out emoji.

Prints markdown tables: per variant its rows, swapped share, and the mean over seeds with a 95%
interval; then the paired differences (same seed) with theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.common.intervals import percent_interval  # noqa: E402
from pipeline.common.tables import markdown_table  # noqa: E402
from pipeline.run.files import read_summary  # noqa: E402

SOURCES = ("web", "coco")
FASHION_TEST = "data/eval/fashion_mnist_test"
METRICS = {
    "fashion top-1": "metrics/fashion_mnist/fashion_mnist/top1",
    "emoji text->image R@5": "metrics/emoji/emoji/text_to_image_R@5",
    "emoji image->text R@5": "metrics/emoji/emoji/image_to_text_R@5",
}
EVAL_SETS = [
    "eval_datasets.fashion_mnist.type=classification",
    f"eval_datasets.fashion_mnist.local={FASHION_TEST}",
    f"eval_datasets.fashion_mnist.classnames={FASHION_TEST}/classnames.txt",
    f"eval_datasets.fashion_mnist.templates={FASHION_TEST}/zeroshot_classification_templates.txt",
    "eval_datasets.fashion_mnist.batch_size=500",
    "eval_datasets.emoji.type=retrieval",
    "eval_datasets.emoji.local=data/sample/eval/web_test",
]


def run(*command: str) -> None:
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def train(run_dir: str, streams: dict, batches: int, seed: int) -> dict:
    """The demo recipe on `streams` ({source: folder}), scored at its end; its summary."""
    if not (read_summary(run_dir) or {}).get("complete"):
        data = [f"data.streams.{name}.local={folder}" for name, folder in streams.items()]
        run(
            sys.executable,
            "pipeline/train.py",
            "yamls/demo_cpu.yaml",
            f"run_dir={run_dir}",
            f"max_duration={batches}ba",
            f"scheduler.warmup={max(1, batches // 10)}ba",
            f"seed={seed}",
            "progress_bar=false",
            f"checkpoint.save_interval={max(1, batches // 3)}ba",
            "checkpoint.autoresume=true",  # a killed experiment continues its run
            *data,
            *EVAL_SETS,
        )
    return read_summary(run_dir)


def build(folder: str, work_dir: str, noise: float, filters: dict) -> dict:
    """The sample's training sources with their captions noised, plus `filters`, under `folder`."""
    out = {name: os.path.join(folder, name) for name in SOURCES}
    if not all(os.path.isfile(os.path.join(path, "index.json")) for path in out.values()):
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(os.path.join(REPO, "yamls", "data", "sample.yaml"))
        cfg.work_dir = work_dir
        cfg.sources = {name: cfg.sources[name] for name in SOURCES}
        for name in SOURCES:
            cfg.sources[name].out = out[name]
            cfg.sources[name].noisy_captions = {"share": noise, "seed": 0}
            cfg.sources[name].filters = {**cfg.sources[name].get("filters", {}), **filters}
        path = os.path.join(folder, "sources.yaml")
        os.makedirs(folder, exist_ok=True)
        OmegaConf.save(cfg, path)
        run(sys.executable, "-m", "data_prep.build", path)
    return out


def random_subset(streams: dict, folder: str, fraction: float, seed: int) -> dict:
    """A seeded random `fraction` of each stream, with the same columns."""
    from streaming import StreamingDataset

    from data_prep.eval_sets import write_mds

    out = {}
    for name, source in streams.items():
        out[name] = os.path.join(folder, name)
        if os.path.isfile(os.path.join(out[name], "index.json")):
            continue
        with open(os.path.join(source, "index.json")) as f:
            shard = json.load(f)["shards"][0]
        columns = dict(zip(shard["column_names"], shard["column_encodings"]))
        dataset = StreamingDataset(local=source, batch_size=1, shuffle=False)
        kept = sorted(random.Random(seed).sample(range(dataset.num_samples), round(fraction * dataset.num_samples)))
        write_mds(out[name], columns, (dataset[i] for i in kept))
    return out


def swapped_rows(streams: dict) -> tuple:
    """(rows, rows whose caption was swapped) over the streams."""
    from streaming import StreamingDataset

    rows = swapped = 0
    for source in streams.values():
        dataset = StreamingDataset(local=source, batch_size=1, shuffle=False)
        rows += dataset.num_samples
        swapped += sum(int(dataset[i]["caption_swapped"]) for i in range(dataset.num_samples))
    return rows, swapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="runs/curation_noisy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--scorer-batches", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.3, help="share of training captions swapped")
    parser.add_argument("--keep", type=float, default=0.7, help="share of rows the curated variants keep")
    args = parser.parse_args()
    folder = os.path.join(REPO, args.folder)
    work_dir = os.path.join(folder, "_work")
    noisy = build(f"{folder}/noisy", work_dir, args.noise, {})
    scorer = os.path.join(folder, "scorer")
    if not os.path.isfile(os.path.join(scorer, "export", "open_clip_config.json")):
        train(scorer, noisy, args.scorer_batches, 0)
        run(sys.executable, "pipeline/export.py", "yamls/eval/zeroshot.yaml", f"{scorer}/export", f"load_path={scorer}")
    keep = f"{100 * args.keep:g}%"
    clip = {"model": f"local-dir:{scorer}/export", "top_fraction": args.keep}
    variants = {
        "all rows": noisy,
        f"top {keep} by CLIP score": build(f"{folder}/top", work_dir, args.noise, {"clip_score": clip}),
        f"random {keep}": random_subset(noisy, f"{folder}/random", args.keep, seed=0),
    }
    scores: dict = {variant: [] for variant in variants}
    for seed in args.seeds:  # seed by seed: a stopped experiment leaves whole pairs
        for number, (variant, streams) in enumerate(variants.items()):
            summary = train(f"{folder}/runs/variant{number}-seed{seed}", streams, args.batches, seed)
            scores[variant].append(summary["eval"])
            print(json.dumps({"seed": seed, variant: summary["eval"]}), file=sys.stderr, flush=True)
    results = {variant: (swapped_rows(streams), scores[variant]) for variant, streams in variants.items()}

    table = [["training data", "rows", "captions swapped", *METRICS]]
    for variant, ((rows, swapped), scores) in results.items():
        cells = [percent_interval([s[key] for s in scores]) for key in METRICS.values()]
        table.append([variant, f"{rows:,}", f"{swapped:,} ({100 * swapped / rows:.1f}%)", *cells])
    names = list(results)
    differences = [["difference (same seed)", *METRICS]]
    for a, b in ((names[1], names[0]), (names[1], names[2]), (names[2], names[0])):
        pairs = list(zip(results[a][1], results[b][1]))
        cells = [percent_interval([x[key] - y[key] for x, y in pairs], signed=True) for key in METRICS.values()]
        differences.append([f"{a} - {b}", *cells])
    print(
        f"\n{args.noise:.0%} of training captions swapped; {args.batches} batches of 128 per run (the same samples "
        f"seen), seeds {args.seeds}; mean [95% interval] over seeds, %\n"
    )
    print(markdown_table(table) + "\n\n" + markdown_table(differences))


if __name__ == "__main__":
    main()
