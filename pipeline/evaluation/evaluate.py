"""A model's zero-shot scores on eval MDS streams: the functions pipeline/eval.py and the sweep
report run (the same scores Composer evaluators compute during training)."""

from __future__ import annotations

import sys
import time

import torch

from pipeline.algorithms.flash_attention import swap_attention
from pipeline.common.tables import align_columns
from pipeline.config.schema import ConfigError, EvalConfig, EvalDatasetConfig, EvalTask
from pipeline.evaluation.evaluators import build_eval_dataloader, build_scores
from pipeline.evaluation.zeroshot import DatasetScores
from pipeline.model.clip import encode
from pipeline.model.towers import install_patch_dropout
from pipeline.run.saved import load_clip


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
    # The same attention as nn.MultiheadAttention's, whose inference fast path is 1.4x slower on CPU.
    swap_attention(clip)
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
