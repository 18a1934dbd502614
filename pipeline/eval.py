"""Zero-shot evaluation of a checkpoint (or a fresh model) on eval MDS streams.

    python pipeline/eval.py yamls/eval/zeroshot.yaml load_path=runs/demo            # a run folder
    python pipeline/eval.py yamls/eval/zeroshot.yaml load_path=s3://bucket/run/ep1-ba900-rank0.pt

The model is the one the run saved with its config (config.yaml in the run folder and next to the
checkpoints); an eval YAML's `model:` section is needed only for a checkpoint from elsewhere.
Prints a table and writes the scores as JSON (`output`). The same datasets can be Composer
evaluators during training: see `build_evaluators`. `patch_masking=0.5` scores FLIP's masked
inference: half of each image's patches dropped by training's own patch-dropout module.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import torch
from composer.core import DataSpec, Evaluator
from streaming import StreamingDataLoader, StreamingDataset

from pipeline.config import ConfigError, EvalConfig, EvalDatasetConfig, EvalTask, load
from pipeline.images import decode_rgb
from pipeline.model import encode
from pipeline.runs import load_clip
from pipeline.tables import align_columns
from pipeline.towers import install_patch_dropout
from pipeline.zeroshot import (
    DatasetScores,
    ZeroShotClassification,
    ZeroShotRetrieval,
    resolve_classnames,
    resolve_templates,
)

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


class EvalDataset(StreamingDataset):
    """Per sample: the transformed image, its id (sample index) and its label or tokenized captions.

    Captions come from a json `captions` column (several per image, `data_prep/eval_sets.py`)
    or else the single `caption` column.
    """

    def __init__(self, *, image_transform, tokenizer=None, **kwargs):
        super().__init__(**kwargs)
        self.image_transform = image_transform
        self.tokenizer = tokenizer  # None: classification, the label is all it needs

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        item = {"image": decode_rgb(sample["image"], self.image_transform), "id": index}
        if self.tokenizer is None:
            item["label"] = int(sample["label"])
        else:
            item["texts"] = self.tokenizer(sample["captions"] if "captions" in sample else [sample["caption"]])
        return item


def collate_eval(items: list) -> dict:
    """Images first: StreamingDataLoader counts a dict batch by its first value."""
    batch = {"images": torch.stack([i["image"] for i in items]), "ids": torch.tensor([i["id"] for i in items])}
    if "label" in items[0]:
        batch["labels"] = torch.tensor([i["label"] for i in items])
    else:
        batch["texts"] = torch.cat([i["texts"] for i in items])
        # (image id, caption number) per caption: the caption's image, and a key that survives repeats
        batch["text_keys"] = torch.tensor([[i["id"], j] for i in items for j in range(len(i["texts"]))])
    return batch


def split_eval_batch(batch: dict, microbatch_size: int) -> list:
    """Composer micro-batches of images, each with its own captions.

    Composer's default split cuts every tensor at the same row, which would part captions from
    their images (a retrieval batch has more caption rows than images).
    """
    chunks = []
    for start in range(0, len(batch["images"]), microbatch_size):
        rows = slice(start, start + microbatch_size)
        chunk = {k: batch[k][rows] for k in ("images", "ids", "labels") if k in batch}
        if "texts" in batch:
            own = torch.isin(batch["text_keys"][:, 0], chunk["ids"])
            chunk.update(texts=batch["texts"][own], text_keys=batch["text_keys"][own])
        chunks.append(chunk)
    return chunks


def build_eval_dataloader(cfg: EvalDatasetConfig, image_transform, tokenizer, num_workers: int):
    dataset = EvalDataset(
        local=cfg.local,
        remote=cfg.remote,
        batch_size=cfg.batch_size,
        shuffle=False,
        image_transform=image_transform,
        tokenizer=tokenizer if cfg.type == EvalTask.retrieval else None,
    )
    return StreamingDataLoader(dataset, batch_size=cfg.batch_size, num_workers=num_workers, collate_fn=collate_eval)


def build_scores(cfg: EvalDatasetConfig, tokenizer, score=None) -> DatasetScores:
    if cfg.type == EvalTask.retrieval:
        return ZeroShotRetrieval(score)
    if cfg.classnames is None:
        raise ConfigError(f"classification dataset at {cfg.local} needs classnames")
    classnames, templates = resolve_classnames(cfg.classnames), resolve_templates(cfg.templates)
    return ZeroShotClassification(classnames, templates, tokenizer, score)


def build_evaluators(datasets: dict, image_transform, tokenizer, num_workers: int) -> tuple:
    """(Composer evaluators, their metrics for CLIPModel): one metric per score per dataset, as
    Composer's loggers take scalars. Each classification score builds its own classifier."""
    evaluators, metrics = [], {}
    for name, cfg in datasets.items():
        keys = {f"{name}/{score}": score for score in build_scores(cfg, tokenizer).score_names()}
        metrics.update({key: build_scores(cfg, tokenizer, score) for key, score in keys.items()})
        loader = build_eval_dataloader(cfg, image_transform, tokenizer, num_workers)
        # Captions outnumber images in a retrieval batch: count and split by images.
        data_spec = DataSpec(loader, get_num_samples_in_batch=lambda b: len(b["images"]), split_batch=split_eval_batch)
        evaluators.append(Evaluator(label=name, dataloader=data_spec, metric_names=[f"^{re.escape(k)}$" for k in keys]))
    return evaluators, metrics


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


@torch.no_grad()
def evaluate_dataset(
    clip, cfg: EvalDatasetConfig, scores: DatasetScores, image_transform, tokenizer, num_workers: int
) -> dict:
    device = next(clip.parameters()).device
    loader = build_eval_dataloader(cfg, image_transform, tokenizer, num_workers)
    scores = scores.to(device)
    seen = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        sample_ids = torch.arange(seen, seen + len(batch["images"]))  # masked inference's noise, per image
        scores.update(clip, batch, encode(clip, batch["images"], batch.get("texts"), sample_ids))
        seen += len(batch["images"])
    return {"task": cfg.type.value, "images": len(loader.dataset), **scores.compute()}


def evaluate(cfg: EvalConfig) -> dict:
    if not cfg.datasets:
        raise ConfigError("datasets is empty: name at least one eval MDS stream")
    clip, image_transform, tokenizer, model = load_clip(cfg)
    if cfg.patch_masking is not None:
        # Training's module, where training puts it; in training mode, the one mode in which it drops.
        install_patch_dropout(clip, cfg.patch_masking, cfg.seed).train()
    clip.to("cuda" if torch.cuda.is_available() else "cpu")
    scores = {name: build_scores(dataset, tokenizer) for name, dataset in cfg.datasets.items()}  # fail before encoding
    results = {}
    for name, dataset in cfg.datasets.items():
        start = time.time()
        results[name] = evaluate_dataset(clip, dataset, scores[name], image_transform, tokenizer, cfg.num_workers)
        print(f"{name}: {results[name]['images']} images in {time.time() - start:.1f}s", file=sys.stderr)
    return {
        "model": model.name,
        "load_path": cfg.load_path or None,
        "patch_masking": cfg.patch_masking,
        "datasets": results,
    }


def format_table(results: dict) -> str:
    """One block per task (their columns differ); scores in percent."""
    blocks = []
    for task in EvalTask:
        rows = {name: r for name, r in results["datasets"].items() if r["task"] == task.value}
        if not rows:
            continue
        columns = list(dict.fromkeys(k for r in rows.values() for k in r if k not in ("task", "images")))
        table = [["dataset", "images", *columns]] + [
            [name, str(r["images"]), *(f"{100 * r[c]:.2f}" if c in r else "-" for c in columns)]
            for name, r in rows.items()
        ]
        blocks.append(f"{task.value} (%):\n" + align_columns(table))
    return "\n\n".join(blocks)


def main(argv: list) -> None:
    if not argv:
        sys.exit(__doc__)
    cfg = load(EvalConfig, argv[0], argv[1:])
    results = evaluate(cfg)
    os.makedirs(os.path.dirname(cfg.output) or ".", exist_ok=True)
    with open(cfg.output, "w") as f:
        json.dump(results, f, indent=2)
    masked = f", {cfg.patch_masking:.0%} of image patches dropped" if cfg.patch_masking is not None else ""
    print(f"{results['model']} from {cfg.load_path or 'a fresh initialisation'}{masked}\n")
    print(f"{format_table(results)}\n\nscores: {cfg.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
