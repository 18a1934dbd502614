"""Zero-shot eval data and the evaluators training runs: eval MDS streams -> batches -> scores.

Each eval dataset (`EvalDatasetConfig`) is a StreamingDataset of images with a label or captions;
`build_evaluators` turns the datasets into Composer evaluators and the metrics CLIPModel computes.
pipeline/eval.py, the standalone CLI, scores a checkpoint on the same loaders.
"""

from __future__ import annotations

import re
from functools import partial

import numpy as np
import torch
from composer.core import DataSpec, Evaluator
from streaming import StreamingDataLoader, StreamingDataset
from torchvision.transforms import Compose, Normalize, ToTensor

from pipeline.common.images import decode_rgb
from pipeline.config.schema import ConfigError, EvalDatasetConfig, EvalTask
from pipeline.evaluation.zeroshot import (
    DatasetScores,
    ZeroShotClassification,
    ZeroShotRetrieval,
    resolve_classnames,
    resolve_templates,
)


class StackNormalized:
    """RGB images as uint8 arrays -> the float batch that ToTensor and Normalize give image by image
    (the same float32 operations, so bitwise the same)."""

    def __init__(self, normalize: Normalize):
        self.normalize = normalize

    def __call__(self, arrays: list) -> torch.Tensor:
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return self.normalize(images.to(torch.get_default_dtype()).div(255))


def split_image_transform(transform) -> tuple:
    """(per image, per batch) parts of an eval transform.

    open_clip's ends in ToTensor and Normalize: a few torch calls each, which on a 32 px image cost
    about as much as decoding it (5.6 of 14 s for Fashion-MNIST's 10,000 images). Here they run once
    per batch. Any other transform runs whole, per image, and its results are stacked."""
    steps = getattr(transform, "transforms", [])
    if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return transform, torch.stack
    return Compose([*steps[:-2], np.asarray]), StackNormalized(steps[-1])


class EvalDataset(StreamingDataset):
    """Per sample: the image through `image_transform`, its id (sample index) and its label or
    tokenized captions.

    Captions come from the `caption_columns` given (each a text, or a list of texts: every one a
    retrieval text), else a json `captions` column (several per image, `data_prep/eval_sets.py`),
    else the single `caption` column.
    """

    def __init__(self, *, image_transform, tokenizer=None, caption_columns=(), **kwargs):
        super().__init__(**kwargs)
        self.image_transform = image_transform
        self.tokenizer = tokenizer  # None: classification, the label is all it needs
        self.caption_columns = list(caption_columns)

    def texts(self, sample: dict) -> list:
        if not self.caption_columns:
            return sample["captions"] if "captions" in sample else [sample["caption"]]
        values = [sample.get(column) for column in self.caption_columns]
        return [text for value in values for text in (value if isinstance(value, list) else [value]) if text]

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        item = {"image": decode_rgb(sample["image"], self.image_transform), "id": index}
        if self.tokenizer is None:
            item["label"] = int(sample["label"])
        else:
            item["texts"] = self.tokenizer(self.texts(sample))
        return item


def collate_eval(items: list, stack_images=torch.stack) -> dict:
    """Images first: StreamingDataLoader counts a dict batch by its first value."""
    batch = {"images": stack_images([i["image"] for i in items]), "ids": torch.tensor([i["id"] for i in items])}
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
    per_image, stack_images = split_image_transform(image_transform)
    dataset = EvalDataset(
        local=cfg.local,
        remote=cfg.remote,
        batch_size=cfg.batch_size,
        shuffle=False,
        image_transform=per_image,
        tokenizer=tokenizer if cfg.type == EvalTask.retrieval else None,
        caption_columns=cfg.caption_columns,
    )
    collate = partial(collate_eval, stack_images=stack_images)
    return StreamingDataLoader(dataset, batch_size=cfg.batch_size, num_workers=num_workers, collate_fn=collate)


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
