"""The scores against hand-computed cases: ranks, pessimistic ties, several captions per image."""

import json
import os

import clip_benchmark.datasets.builder
import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation import zeroshot
from pipeline.evaluation.zeroshot import (
    ZeroShotClassification,
    ZeroShotRetrieval,
    classification_scores,
    hits_at_k,
    resolve_classnames,
    resolve_templates,
    retrieval_scores,
)
from pipeline.model.loss import Features


def test_hits_at_k_counts_wrong_candidates_ahead_and_ties_against_the_query():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # right: candidate 2; one wrong one (0.9) ahead
            [0.5, 0.5, 0.5, 0.5],  # right: candidate 0; the three wrong ones tie with it: all count as ahead
            [0.1, 0.2, 0.3, 0.4],  # right: candidate 3, first
        ]
    )
    hits = hits_at_k(scores, torch.tensor([2, 0, 3]), torch.arange(4), ks=(1, 2, 4))
    assert hits[1].tolist() == [False, False, True]
    assert hits[2].tolist() == [True, False, True]
    assert hits[4].tolist() == [True, True, True]


def test_hits_at_k_several_right_candidates_and_ties_among_them():
    scores = torch.tensor([[0.2, 0.7, 0.7, 0.1]])
    hits = hits_at_k(scores, torch.tensor([5]), torch.tensor([0, 5, 5, 1]), ks=(1,))
    assert hits[1].tolist() == [True]  # two right ones tie for first: a right one is first either way


def test_nan_scores_never_hit():
    scores = torch.tensor([[float("nan"), 0.1], [float("nan"), float("nan")], [0.3, float("nan")]])
    hits = hits_at_k(scores, torch.tensor([0, 0, 0]), torch.tensor([0, 1]), ks=(1, 2))
    assert hits[1].tolist() == [False, False, True]  # a NaN right score is the lowest; a NaN wrong one is behind
    assert hits[2].tolist() == [True, True, True]


def test_classification_scores_hand_computed():
    # 6 classes; labels 0, 0, 0, 1, 2: class 0 has three samples, so top-1 and mean recall differ.
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 2
            [0.0, 0.6, 0.5, 0.4, 0.3, 0.2],  # label 0: rank 6 (last)
            [0.0, 0.8, 0.0, 0.0, 0.0, 0.0],  # label 1: rank 1
            [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # label 2: all tie -> pessimistic rank 6
        ]
    )
    scores = classification_scores(logits, torch.tensor([0, 0, 0, 1, 2]))
    assert scores["top1"] == pytest.approx(2 / 5)
    assert scores["top5"] == pytest.approx(3 / 5)
    # recall: class 0 1/3, class 1 1/1, class 2 0/1; classes 3-5 have no samples and are not averaged
    assert scores["mean_per_class_recall"] == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_classification_has_no_top5_below_five_classes():
    scores = classification_scores(torch.tensor([[0.1, 0.9, 0.0, 0.0]]), torch.tensor([1]))
    assert scores == {"top1": 1.0, "mean_per_class_recall": 1.0}


def test_labels_outside_the_class_names_fail():
    with pytest.raises(ValueError, match=r"labels range over \[0, 3\] but there are 3 class names"):
        classification_scores(torch.zeros(2, 3), torch.tensor([0, 3]))


# Similarities (images x texts). Captions 0, 1 describe image 0; 2 image 1; 3, 4 image 2.
SIMILARITY = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3],
        [0.2, 0.1, 0.5, 0.1, 0.5],
        [0.4, 0.3, 0.9, 0.5, 0.5],
    ]
)
TEXT_IMAGE = torch.tensor([0, 0, 1, 2, 2])


def features_with_similarity(similarity):
    """One-hot image features, so image i . text j == similarity[i, j]."""
    return torch.eye(similarity.shape[0]), similarity.T.contiguous()


def test_retrieval_scores_several_captions_per_image_hand_computed():
    scores = retrieval_scores(*features_with_similarity(SIMILARITY), TEXT_IMAGE)
    # image->text: image 0 best caption 0.9 first (hit); image 1 its caption 0.5 ties with wrong caption 4
    # (pessimistic: miss); image 2 best caption 0.5 behind wrong caption 2's 0.9 (miss). Top 5 holds all.
    assert scores["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert scores["image_to_text_R@5"] == scores["image_to_text_R@10"] == 1.0
    # text->image: captions 0 and 3 rank their image first; caption 1 (0.1) ties image 1 and trails
    # image 2; caption 2 (0.5) trails 0.8 and 0.9; caption 4 (0.5) ties image 1: 2 of 5 hits.
    assert scores["text_to_image_R@1"] == pytest.approx(2 / 5)
    assert scores["text_to_image_R@5"] == 1.0


def test_collapsed_model_scores_zero_not_an_index_order():
    same = torch.ones(4, 8) / 8**0.5
    scores = retrieval_scores(same, same.clone(), torch.arange(4))
    assert scores["image_to_text_R@1"] == scores["text_to_image_R@1"] == 0.0
    assert scores["image_to_text_R@5"] == 1.0  # 3 wrong ahead < 5


def test_retrieval_metric_drops_repeated_samples_and_chunks_queries(monkeypatch):
    """Streaming repeats samples to even out ranks; the repeats must not count twice."""
    images, texts = features_with_similarity(SIMILARITY)
    batches = [([0, 1], [[0, 0], [0, 1], [1, 0]]), ([2, 0], [[2, 0], [2, 1], [0, 0], [0, 1]])]  # image 0 twice
    text_rows = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (2, 0): 3, (2, 1): 4}
    monkeypatch.setattr(zeroshot, "QUERY_CHUNK", 2)
    metric = ZeroShotRetrieval()
    for ids, keys in batches:
        batch = {"ids": torch.tensor(ids) * 10, "text_keys": torch.tensor([[i * 10, j] for i, j in keys])}
        outputs = Features(images[ids], texts[[text_rows[tuple(k)] for k in keys]], None)
        metric.update(None, batch, outputs)
    assert metric.compute() == retrieval_scores(images, texts, TEXT_IMAGE)
    assert ZeroShotRetrieval("text_to_image_R@1").score_names() == zeroshot.retrieval_score_names()


CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ["a {}.", "the {}."]


def stub_tokenizer(texts):
    """(class, template) indices stand in for tokens."""
    return torch.tensor([[CLASSES.index(t.split()[-1][:-1]), ["a", "the"].index(t.split()[0])] for t in texts])


class StubCLIP:
    """Called like open_clip's forward: (image features, normalised text features, logit scale)."""

    def __init__(self, class_vectors, template_vectors):
        self.class_vectors, self.template_vectors = class_vectors, template_vectors

    def __call__(self, images, tokens):
        assert images is None
        features = self.class_vectors[tokens[:, 0]] + self.template_vectors[tokens[:, 1]]
        return {
            "image_features": None,
            "text_features": F.normalize(features, dim=-1),
            "logit_scale": torch.tensor(1.0),
        }


def test_classifier_averages_normalised_prompts_and_is_rebuilt_after_reset():
    torch.manual_seed(0)
    clip = StubCLIP(torch.randn(3, 4), torch.randn(2, 4))
    metric = ZeroShotClassification(CLASSES, TEMPLATES, stub_tokenizer)
    image_features = torch.eye(4)[:3]
    metric.update(
        clip, {"ids": torch.arange(3), "labels": torch.tensor([0, 1, 2])}, Features(image_features, None, None)
    )
    per_template = F.normalize(clip.class_vectors[:, None] + clip.template_vectors[None], dim=-1)  # class x template
    expected = F.normalize(per_template.mean(dim=1), dim=-1).T
    assert torch.allclose(metric.classifier, expected, atol=1e-6)
    assert torch.allclose(metric.logits[0], image_features @ expected, atol=1e-6)

    metric.reset()  # a new evaluation after training steps: the classifier follows the new weights
    other = StubCLIP(torch.eye(4)[:3] * 10, torch.zeros(2, 4))
    metric.update(
        other, {"ids": torch.arange(3), "labels": torch.tensor([0, 1, 2])}, Features(image_features, None, None)
    )
    assert torch.allclose(metric.classifier, torch.eye(4)[:3].T)
    assert metric.compute() == {"top1": 1.0, "mean_per_class_recall": 1.0}


def test_class_names_and_templates_from_lists_builtins_and_files(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("t-shirt\n  ankle boot \n\n")  # trailing blank lines are no classes
    assert resolve_classnames(str(path)) == ["t-shirt", "ankle boot"]
    assert resolve_classnames(["a", "b"]) == ["a", "b"]
    assert len(resolve_classnames("imagenet")) == 1000
    openai = resolve_templates("openai_imagenet")
    assert len(openai) == 80 and openai[0]("dog") == "a bad photo of a dog."
    assert [t("dog") for t in resolve_templates(["a {}.", "{c}!"])] == ["a dog.", "dog!"]
    with pytest.raises(ValueError, match="one of"):
        resolve_classnames("imagenett")
    path.write_text("t-shirt\n\nankle boot\n")  # labels are line numbers: a gap would shift them
    with pytest.raises(ValueError, match=r"entries \[2\] are empty"):
        resolve_classnames(str(path))
    with pytest.raises(ValueError, match=r"needs a '\{c\}' or '\{\}'.*\['a photo', '\{0\} of', 'a \{c'\]"):
        resolve_templates(["a photo of a {}.", "a photo", "{0} of", "a {c"])


def test_clip_benchmark_template_files_make_its_prompts(tmp_path):
    """CLIP_benchmark's own templates ('{c}'), as its wds folders carry them, give its prompts."""
    packaged = os.path.join(
        os.path.dirname(clip_benchmark.datasets.builder.__file__), "en_zeroshot_classification_templates.json"
    )
    with open(packaged) as f:
        cifar10 = json.load(f)["cifar10"]
    path = str(tmp_path / "zeroshot_classification_templates.txt")
    with open(path, "w") as f:
        print(*cifar10, sep="\n", end="\n", file=f)  # as clip_benchmark's webdataset_builder writes it
    prompts = [template("truck") for template in resolve_templates(path)]
    assert len(prompts) == len(cifar10) > 10
    assert prompts == [template.format(c="truck") for template in cifar10]  # CLIP_benchmark's formatting
