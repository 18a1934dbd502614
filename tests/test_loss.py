"""The loss choice: SigLIP (open_clip's SigLipLoss, learnt bias) trains from the demo recipe."""

import csv
import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config.schema import EvalConfig, LossName, load
from pipeline.eval import evaluate
from pipeline.model.export import export
from pipeline.model.loss import Features, build_loss, contrastive_loss
from pipeline.run.saved import load_clip
from tests.conftest import REPO, train_here, train_overrides
from tests.tiny import TINY_SIGLIP, synthetic_dataset, tiny_model


def test_siglip_model_has_its_bias_and_the_loss_matches_the_paper_formula():
    model = tiny_model(cfg=TINY_SIGLIP)
    assert model.clip.logit_bias.shape == (1,) and float(model.clip.logit_bias) == -10.0
    assert float(model.clip.logit_scale.exp()) == pytest.approx(10.0)
    features = model(synthetic_dataset()[:8])
    assert isinstance(features, Features) and features.logit_bias is not None
    loss = contrastive_loss(build_loss(TINY_SIGLIP), features)
    logits = features.logit_scale * features.image @ features.text.T + features.logit_bias
    labels = 2 * torch.eye(8) - 1  # +1 for the matching pair, -1 for every other
    expected = -torch.nn.functional.logsigmoid(labels * logits).sum() / 8
    torch.testing.assert_close(loss, expected)


def test_siglip_trains_from_the_demo_recipe_and_its_run_evaluates_and_exports(sample_build, tmp_path):
    cfg, _ = sample_build
    run_dir = tmp_path / "siglip"
    train_here(
        train_overrides(
            cfg,
            run_dir,
            "model.loss=siglip",
            "max_duration=30ba",
            "data.global_batch_size=64",
            "scheduler.warmup=5ba",
            "checkpoint.save_interval=30ba",
        ),
    )
    with open(run_dir / "loss.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    coco_test, web_test = cfg.sources["coco_test"].out, cfg.sources["web_test"].out
    eval_cfg = load(
        EvalConfig,
        os.path.join(REPO, "yamls", "eval", "zeroshot.yaml"),
        [
            f"load_path={run_dir}",
            f"datasets.fashion_mnist.local={coco_test}",
            f"datasets.emoji.local={web_test}",
            f"datasets.fashion_mnist.classnames={coco_test}/classnames.txt",
            f"datasets.fashion_mnist.templates={coco_test}/zeroshot_classification_templates.txt",
            "num_workers=0",
        ],
    )
    clip, _, _, model = load_clip(eval_cfg)  # the model section comes from the run's config.yaml
    assert model.loss == LossName.siglip and float(clip.logit_bias) != -10.0  # the bias was learnt
    assert evaluate(eval_cfg)["datasets"]["fashion_mnist"]["images"] == 200

    folder = str(tmp_path / "export")
    export(clip, model, folder)
    assert load_file(os.path.join(folder, "open_clip_model.safetensors"))["logit_bias"].shape == ()
    opened, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    assert float(opened.logit_bias) == pytest.approx(float(clip.logit_bias))
    with open(os.path.join(folder, "open_clip_config.json")) as f:
        assert json.load(f)["model_cfg"]["init_logit_bias"] == -10.0
