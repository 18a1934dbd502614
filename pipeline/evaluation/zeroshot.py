"""Zero-shot scores: classification from class-name prompts, and image-text retrieval.

Definitions follow LAION's CLIP_benchmark: top-k accuracy and mean per-class recall (balanced
accuracy) for classification; for retrieval, an image is a hit at k if any of its captions is
among its k best texts (image->text), a caption if its image is among its k best images
(text->image). CLIP_benchmark names these text_retrieval_recall@k / image_retrieval_recall@k.

Ties are pessimistic: a wrong candidate that scores exactly as high as the best right one counts
as ranked ahead of it, so a collapsed model (all scores equal) scores 0, not whatever an index
order happens to give. NaN scores count as the lowest score. With real-valued embeddings ties
are rare, and the numbers match CLIP_benchmark's topk-based ones.

The score Metrics collect features per sample id and drop repeats, because streaming pads the
last partition with repeated samples when a dataset does not divide evenly over the ranks.
"""

from __future__ import annotations

import functools
import os
import string
from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

BUILTIN_CLASSNAMES = {"imagenet": IMAGENET_CLASSNAMES}
BUILTIN_TEMPLATES = {"openai_imagenet": OPENAI_IMAGENET_TEMPLATES, "simple_imagenet": SIMPLE_IMAGENET_TEMPLATES}
RETRIEVAL_KS = (1, 5, 10)
QUERY_CHUNK = 4096  # queries scored at once: bounds the (queries x candidates) score matrix


# ---------------------------------------------------------------------------
# Class names and prompt templates
# ---------------------------------------------------------------------------


def _read_lines(path: str) -> list:
    """A text file's lines, stripped, trailing blank lines dropped (CLIP_benchmark's files end in one)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _names_or_lines(value, builtins: dict, what: str) -> list:
    """A list as given, a built-in by name, or a text file's lines (one per line)."""
    if isinstance(value, (list, tuple)) and value:
        return list(value)
    if isinstance(value, str) and value in builtins:
        return list(builtins[value])
    lines = _read_lines(value) if isinstance(value, str) and os.path.isfile(value) else []
    if lines:
        return lines
    raise ValueError(
        f"{what} must be a non-empty list, a text file (one per line) or one of {sorted(builtins)}; got {value!r}"
    )


def resolve_classnames(value) -> list:
    """Class names in label order: CLIP_benchmark's classnames.txt, a list or a built-in name."""
    classnames = _names_or_lines(value, BUILTIN_CLASSNAMES, "classnames")
    blank = [i + 1 for i, name in enumerate(classnames) if not str(name).strip()]
    if blank:  # a label is a line's position: a blank line would shift every class after it
        raise ValueError(f"classnames {value!r}: entries {blank} are empty (labels are positions in the list)")
    return classnames


def fill_template(template: str, classname: str) -> str:
    """A prompt from a template with CLIP_benchmark's '{c}' or open_clip's '{}' slot."""
    return template.format(classname, c=classname)


def _has_class_slot(template: str) -> bool:
    """Has a '{c}' or '{}' slot, and no other replacement field (or unmatched brace)."""
    try:
        slots = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError:  # an unmatched brace
        return False
    return bool(slots) and slots <= {"", "c"}


def resolve_templates(value) -> list:
    """Prompt templates as callables (open_clip's form): CLIP_benchmark's
    zeroshot_classification_templates.txt ('{c}'), a list with '{}' or '{c}', or a built-in name.
    """
    templates = [t for t in _names_or_lines(value, BUILTIN_TEMPLATES, "templates") if not isinstance(t, str) or t]
    bad = [t for t in templates if isinstance(t, str) and not _has_class_slot(t)]
    if bad:
        raise ValueError(
            f"every template needs a '{{c}}' or '{{}}' for the class name, and no other braces; these do not: {bad}"
        )
    return [functools.partial(fill_template, t) if isinstance(t, str) else t for t in templates]


# ---------------------------------------------------------------------------
# Ranking scores
# ---------------------------------------------------------------------------


def hits_at_k(scores: torch.Tensor, query_keys: torch.Tensor, candidate_keys: torch.Tensor, ks: Sequence[int]) -> dict:
    """{k: bool per query}: is a right candidate (same key as the query) within the query's top k?

    Pessimistic ties: every wrong candidate scoring >= the best right one is ranked ahead of it.
    """
    scores = scores.float().nan_to_num(nan=float("-inf"))
    right = query_keys[:, None] == candidate_keys[None, :]
    best_right = scores.masked_fill(~right, float("-inf")).amax(dim=1, keepdim=True)
    wrong_ahead = ((scores >= best_right) & ~right).sum(dim=1)
    return {k: wrong_ahead < k for k in ks}


def classification_ks(num_classes: int) -> tuple:
    return (1, 5) if num_classes >= 5 else (1,)  # top-5 of fewer than 5 classes says nothing


def classification_score_names(num_classes: int) -> list:
    return [f"top{k}" for k in classification_ks(num_classes)] + ["mean_per_class_recall"]


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """top-1, top-5 (5 classes or more) and mean per-class recall (over the classes present)."""
    num_classes = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but there are {num_classes} class names"
        )
    hits = hits_at_k(logits, labels, torch.arange(num_classes, device=labels.device), classification_ks(num_classes))
    per_class = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, hits[1].float())
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    mean_per_class_recall = (per_class[present] / counts[present]).mean()
    values = [hit.float().mean() for hit in hits.values()] + [mean_per_class_recall]
    return dict(zip(classification_score_names(num_classes), (v.item() for v in values)))


def _recalls(queries, candidates, query_keys, candidate_keys) -> list:
    """Recall at each of RETRIEVAL_KS, scoring QUERY_CHUNK queries at a time."""
    chunks = [
        hits_at_k(queries[rows] @ candidates.T, query_keys[rows], candidate_keys, RETRIEVAL_KS)
        for rows in (slice(i, i + QUERY_CHUNK) for i in range(0, len(queries), QUERY_CHUNK))
    ]
    return [torch.cat([c[k] for c in chunks]).float().mean().item() for k in RETRIEVAL_KS]


def retrieval_score_names() -> list:
    return [f"{direction}_R@{k}" for direction in ("image_to_text", "text_to_image") for k in RETRIEVAL_KS]


def retrieval_scores(image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor) -> dict:
    """Recall@1/5/10 both ways; text_image[j] is the index of the image that caption j describes."""
    images = torch.arange(len(image_features), device=text_image.device)
    image_to_text = _recalls(image_features, text_features, images, text_image)
    text_to_image = _recalls(text_features, image_features, text_image, images)
    return dict(zip(retrieval_score_names(), image_to_text + text_to_image))


# ---------------------------------------------------------------------------
# Metrics: the same scores for `pipeline/eval.py` and for Composer evaluators
# ---------------------------------------------------------------------------


class ForwardTextEncoder:
    """What build_zero_shot_classifier needs of a model, through open_clip's forward (whose
    hooks FSDP uses to gather the parameters), with output_dict=True."""

    def __init__(self, clip: torch.nn.Module):
        self.clip = clip

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip(None, texts)["text_features"]  # always normalised: open_clip's forward does it


def first_occurrences(keys: torch.Tensor) -> tuple:
    """(sorted unique keys, index of each one's first occurrence); keys are scalars or rows."""
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    positions = torch.arange(len(keys), device=keys.device)
    first = torch.full((len(unique),), len(keys), device=keys.device)
    return unique, first.scatter_reduce_(0, inverse, positions, reduce="amin")


class DatasetScores(Metric):
    """All of a dataset's scores as a dict, or one of them (`score`) as Composer logs scalars."""

    full_state_update = False

    def __init__(self, score: Optional[str] = None):
        super().__init__()
        self.score = score

    def scores(self) -> dict:
        raise NotImplementedError

    def compute(self):
        scores = self.scores()
        return scores if self.score is None else torch.tensor(scores[self.score])


class ZeroShotClassification(DatasetScores):
    """Top-k and mean per-class recall against a classifier built from class-name prompts."""

    def __init__(self, classnames: Sequence[str], templates: Sequence[Union[str, Callable]], tokenizer, score=None):
        super().__init__(score)
        self.classnames, self.templates, self.tokenizer = list(classnames), list(templates), tokenizer
        self.classifier = None
        self.add_state("ids", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def score_names(self) -> list:
        return classification_score_names(len(self.classnames))

    def reset(self) -> None:
        super().reset()
        self.classifier = None  # the weights change between evaluations: rebuilt from the current ones

    def update(self, clip: torch.nn.Module, batch: dict, outputs) -> None:
        image_features = outputs.image  # pipeline.model.loss.Features
        if self.classifier is None:
            self.classifier = build_zero_shot_classifier(
                ForwardTextEncoder(clip), self.tokenizer, self.classnames, self.templates, device=image_features.device
            )
        self.ids.append(batch["ids"])
        self.logits.append(image_features.float() @ self.classifier.float())
        self.labels.append(batch["labels"])

    def scores(self) -> dict:
        _, first = first_occurrences(dim_zero_cat(self.ids))
        return classification_scores(dim_zero_cat(self.logits)[first], dim_zero_cat(self.labels)[first])


class ZeroShotRetrieval(DatasetScores):
    """Image->text and text->image recall@k; an image may have several captions."""

    def __init__(self, score=None):
        super().__init__(score)
        self.add_state("image_ids", default=[], dist_reduce_fx="cat")
        self.add_state("image_features", default=[], dist_reduce_fx="cat")
        # Each caption is keyed by (its image's id, its position among that image's captions).
        self.add_state("text_keys", default=[], dist_reduce_fx="cat")
        self.add_state("text_features", default=[], dist_reduce_fx="cat")

    @staticmethod
    def score_names() -> list:
        return retrieval_score_names()

    def update(self, clip: torch.nn.Module, batch: dict, outputs) -> None:
        image_features, text_features = outputs.image, outputs.text  # pipeline.model.loss.Features
        self.image_ids.append(batch["ids"])
        self.image_features.append(image_features.float())
        self.text_keys.append(batch["text_keys"])
        self.text_features.append(text_features.float())

    def scores(self) -> dict:
        image_ids, first_image = first_occurrences(dim_zero_cat(self.image_ids))
        text_keys, first_text = first_occurrences(dim_zero_cat(self.text_keys))
        text_image = torch.searchsorted(image_ids, text_keys[:, 0].contiguous())
        return retrieval_scores(
            dim_zero_cat(self.image_features)[first_image], dim_zero_cat(self.text_features)[first_text], text_image
        )
