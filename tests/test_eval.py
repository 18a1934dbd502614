"""Zero-shot eval end to end: sample eval sets, Composer evaluators, checkpoints, export, converters."""

import csv
import glob
import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from streaming import StreamingDataset

from data_prep.eval_sets import coco_to_mds, flickr_to_mds, imagefolder_to_mds
from pipeline.common.images import decode_rgb
from pipeline.config.schema import ConfigError, EvalConfig, EvalDatasetConfig, EvalTask, load
from pipeline.eval import main
from pipeline.evaluation.evaluate import evaluate, evaluate_dataset
from pipeline.evaluation.evaluators import build_scores, collate_eval, split_eval_batch, split_image_transform
from pipeline.evaluation.zeroshot import retrieval_scores
from pipeline.model.export import export
from pipeline.run.saved import load_clip
from tests.conftest import DEMO_YAML, EVAL_YAML, REPO, demo_model, eval_overrides, fresh_eval_config, train_overrides
from tests.test_images import encoded, in_mode, picture


def fresh_eval_yaml(tmp_path) -> str:
    """The eval YAML extended with the demo's model section, for the command line."""
    from omegaconf import OmegaConf

    path = str(tmp_path / "fresh_eval.yaml")
    OmegaConf.save({"base": EVAL_YAML, "model": OmegaConf.to_container(OmegaConf.structured(demo_model()))}, path)
    return path


def score_items(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("task", "images")}


def test_fresh_model_scores_chance_level_into_table_and_json(sample_build, tmp_path, capsys):
    cfg, summaries = sample_build
    out = tmp_path / "scores.json"
    main([fresh_eval_yaml(tmp_path), *eval_overrides(cfg), f"output={out}"])
    results = json.loads(out.read_text())
    assert results["load_path"] is None
    fashion, emoji = results["datasets"]["fashion_mnist"], results["datasets"]["emoji"]
    assert fashion["images"] == summaries["coco_test"]["written"] == 200
    assert emoji["images"] == summaries["web_test"]["written"] > 300
    assert list(score_items(fashion)) == ["top1", "top5", "mean_per_class_recall"]
    assert fashion["top1"] < 0.35 and fashion["mean_per_class_recall"] < 0.35  # chance: 0.1
    for direction in ("image_to_text", "text_to_image"):
        recalls = [emoji[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and recalls[2] < 0.15  # chance at 10: 10 / ~365
    table = capsys.readouterr().out
    assert "a fresh initialisation" in table
    assert "fashion_mnist  200" in table and "text_to_image_R@10" in table


def test_micro_batches_keep_each_image_with_its_captions():
    batch = {
        "images": torch.arange(3.0)[:, None],
        "ids": torch.tensor([7, 3, 9]),
        "texts": torch.arange(5)[:, None],
        "text_keys": torch.tensor([[7, 0], [7, 1], [3, 0], [9, 0], [9, 1]]),
    }
    first, second = split_eval_batch(batch, 2)
    assert first["ids"].tolist() == [7, 3] and first["texts"].flatten().tolist() == [0, 1, 2]
    assert second["ids"].tolist() == [9] and second["text_keys"].tolist() == [[9, 0], [9, 1]]
    labelled = split_eval_batch({"images": torch.zeros(3, 1), "ids": torch.arange(3), "labels": torch.arange(4, 7)}, 2)
    assert [c["labels"].tolist() for c in labelled] == [[4, 5], [6]] and "texts" not in labelled[0]


@pytest.mark.parametrize("size, resize_mode", [(32, "shortest"), (224, "shortest"), (32, "longest"), (48, "squash")])
def test_eval_batches_are_bitwise_open_clips_transform_image_by_image(size, resize_mode):
    """ToTensor and Normalize run once per batch: RGB / RGBA / palette / grey / CMYK images, smaller
    and larger than the input, give exactly the tensors of open_clip's whole transform."""
    import open_clip

    transform = open_clip.image_transform(size, is_train=False, resize_mode=resize_mode)
    modes = ["RGB", "RGBA", "P", "L", "CMYK"]
    sources = [encoded(in_mode(picture(i, (28 + 40 * i, 30 + 9 * i)), mode, i)) for i, mode in enumerate(modes)]
    per_image, stack_images = split_image_transform(transform)
    items = [{"image": decode_rgb(data, per_image), "id": i, "label": i} for i, data in enumerate(sources)]
    batch = collate_eval(items, stack_images)["images"]
    whole = torch.stack([decode_rgb(data, transform) for data in sources])
    assert batch.dtype == whole.dtype and batch.is_contiguous() and torch.equal(batch, whole)
    other = lambda image: torch.zeros(3, 2, 2)  # noqa: E731 - not open_clip's: runs whole, per image
    assert split_image_transform(other) == (other, torch.stack)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yamls", "eval", "*.yaml"))))
def test_every_eval_yaml_matches_the_schema(path):
    assert load(EvalConfig, path).datasets


def test_eval_config_typos_and_missing_class_names_fail_early():
    with pytest.raises(ConfigError, match=r"Did you mean 'datasets.emoji.batch_size'"):
        load(EvalConfig, EVAL_YAML, ["datasets.emoji.batchsize=8"])
    with pytest.raises(ConfigError, match="expected one of \\[classification, retrieval\\]"):
        load(EvalConfig, EVAL_YAML, ["datasets.emoji.type=retreival"])
    with pytest.raises(ConfigError, match="needs classnames"):
        build_scores(EvalDatasetConfig(type=EvalTask.classification, local="x"), tokenizer=None)


def test_evaluators_during_training_match_the_eval_of_the_checkpoint(trained):
    eval_cfg, checkpoint, logged = trained
    results = evaluate(replace(eval_cfg, load_path=checkpoint))["datasets"]
    # Composer logs metrics/<evaluator label>/<metric name>; the metric names are <dataset>/<score>.
    expected = {f"metrics/{n}/{n}/{score}": v for n, r in results.items() for score, v in score_items(r).items()}
    assert len(expected) == 3 + 6
    assert logged == pytest.approx(expected, abs=1e-6)


def test_loading_a_checkpoint_does_not_claim_a_random_model(trained, caplog):
    eval_cfg, checkpoint, _ = trained
    with caplog.at_level(logging.WARNING):
        load_clip(replace(eval_cfg, load_path=checkpoint))
    assert "initialized randomly" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_clip(eval_cfg)  # a fresh model is one, and open_clip still says so
    assert "No pretrained weights loaded for model 'tiny-vit-demo'. Model initialized randomly." in caplog.text


class Payload:
    """Something a checkpoint should not carry: unpickling it means running this module's code."""


def test_checkpoint_is_read_as_tensors_only_unless_trusted(trained, tmp_path):
    eval_cfg, checkpoint, _ = trained
    clip, _, _, _ = load_clip(replace(eval_cfg, load_path=checkpoint))
    saved = torch.load(checkpoint, weights_only=False)
    assert torch.equal(clip.visual.conv1.weight, saved["state"]["model"]["clip.visual.conv1.weight"])
    fresh, _, _, _ = load_clip(eval_cfg)
    assert not torch.equal(fresh.visual.conv1.weight, clip.visual.conv1.weight)

    saved["state"]["callbacks"]["payload"] = Payload()
    torch.save(saved, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match=r"test_eval.Payload.*trust=true"):
        load_clip(replace(eval_cfg, load_path=str(tmp_path / "odd.pt")))
    trusted, _, _, _ = load_clip(replace(eval_cfg, load_path=str(tmp_path / "odd.pt"), trust=True))
    assert torch.equal(trusted.visual.conv1.weight, clip.visual.conv1.weight)


OPEN_CLIP_LOADER = """
import sys, open_clip, torch
config, weights, inputs, out = sys.argv[1:]
open_clip.add_model_config(config)
model, _, _ = open_clip.create_model_and_transforms("tiny-vit-demo", pretrained=weights)
images, texts = torch.load(inputs)
with torch.no_grad():
    torch.save((model.encode_image(images), model.encode_text(texts), model.logit_scale), out)
"""


def test_export_loads_in_a_fresh_open_clip_with_the_same_embeddings(trained, tmp_path):
    eval_cfg, checkpoint, _ = trained
    cfg = replace(eval_cfg, load_path=checkpoint)
    clip, transform, tokenizer, _ = load_clip(cfg)
    weights, config = export(clip, cfg.model, str(tmp_path / "export" / "tiny.safetensors"))
    assert load_file(weights)["logit_scale"].shape == ()  # open_clip's own shape
    with open(config) as f:
        assert json.load(f) == cfg.model.custom

    images = torch.stack([transform(drawing(i)) for i in range(3)])
    texts = tokenizer(["a photo of a dress.", "grinning face", "ankle boot"])
    torch.save((images, texts), tmp_path / "inputs.pt")
    # A new process: open_clip knows the model only from the exported files.
    loader_args = [config, weights, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    subprocess.run([sys.executable, "-c", OPEN_CLIP_LOADER, *loader_args], check=True, timeout=300)
    image_features, text_features, logit_scale = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.allclose(image_features, clip.encode_image(images), atol=1e-5)
        assert torch.allclose(text_features, clip.encode_text(texts), atol=1e-5)
    assert logit_scale.shape == () and logit_scale.item() == clip.logit_scale.item()


# ---------------------------------------------------------------------------
# Converters: tiny trees of real images made with Pillow
# ---------------------------------------------------------------------------


def drawing(i: int) -> Image.Image:
    image = Image.new("RGB", (40, 30), (40 * i % 256, 90, 200 - 30 * i % 200))
    ImageDraw.Draw(image).ellipse((i, i, 20 + 2 * i, 25), fill=(255, 255 - 20 * i % 256, 0))
    return image


@pytest.fixture(scope="module")
def fresh_model(sample_build):
    cfg, _ = sample_build
    return load_clip(fresh_eval_config(cfg))[:3]


def test_imagefolder_becomes_a_classification_set_with_its_class_list(tmp_path, fresh_model):
    clip, transform, tokenizer = fresh_model
    root, out = tmp_path / "folder", tmp_path / "mds"
    for c, name in enumerate(["zebra", "cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            drawing(3 * c + i).save(root / name / f"{i}.{'png' if i else 'jpg'}")
    (root / "dog" / "notes.txt").write_text("not an image: skipped")
    summary = imagefolder_to_mds(str(root), str(out))
    assert summary == {"images": 6, "classes": 3, "classnames": str(out / "classnames.txt")}
    assert (out / "classnames.txt").read_text() == "cat\ndog\nzebra\n"  # sorted, as torchvision's ImageFolder
    samples = list(StreamingDataset(local=str(out), batch_size=6, shuffle=False))
    labels = sorted((s["key"], int(s["label"])) for s in samples)
    assert labels[:3] == [("cat/0.jpg", 0), ("cat/1.png", 0), ("dog/0.jpg", 1)]
    assert Image.open(io.BytesIO(samples[0]["image"])).size == (40, 30)

    cfg = EvalDatasetConfig(
        type=EvalTask.classification,
        local=str(out),
        batch_size=4,
        classnames=str(out / "classnames.txt"),
        templates=["a photo of a {}."],
    )
    results = evaluate_dataset(clip, cfg, build_scores(cfg, tokenizer), transform, tokenizer, num_workers=0)
    assert results["images"] == 6 and list(score_items(results)) == ["top1", "mean_per_class_recall"]


def test_unreadable_image_stops_the_conversion(tmp_path):
    (tmp_path / "folder" / "cat").mkdir(parents=True)
    (tmp_path / "folder" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        imagefolder_to_mds(str(tmp_path / "folder"), str(tmp_path / "mds"))


CAPTIONS = {  # several captions per image, one with none
    "a.jpg": ["a yellow ball", "a round yellow thing"],
    "b.png": ["a blue square"],
    "c.jpg": ["red circle, small", "a small red circle", "a red dot"],
    "d.jpg": ["a green line", "green stripe"],
    "e.png": ["an orange disc"],
}


@pytest.fixture
def caption_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate([*CAPTIONS, "uncaptioned.jpg"]):
        drawing(i).save(images / name)
    coco = {
        "images": [{"id": 10 + i, "file_name": name} for i, name in enumerate([*CAPTIONS, "uncaptioned.jpg"])],
        "annotations": [
            {"id": 100 * i + j, "image_id": 10 + i, "caption": f" {caption} "}
            for i, captions in enumerate(CAPTIONS.values())
            for j, caption in enumerate(captions)
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    rows = [(name, caption) for name, captions in CAPTIONS.items() for caption in captions]
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    return images, tmp_path / "captions.json", tmp_path / "captions.csv"


def test_coco_and_flickr_layouts_keep_every_caption(caption_files, tmp_path):
    images, coco_json, flickr_csv = caption_files
    summaries = [
        coco_to_mds(str(coco_json), str(images), str(tmp_path / "coco")),
        flickr_to_mds(str(flickr_csv), str(images), str(tmp_path / "flickr")),
    ]
    assert summaries == [{"images": 5, "captions": 9}] * 2
    for out in ("coco", "flickr"):
        samples = list(StreamingDataset(local=str(tmp_path / out), batch_size=5, shuffle=False))
        assert {s["key"]: s["captions"] for s in samples} == CAPTIONS


def test_retrieval_eval_maps_each_caption_to_its_image(caption_files, tmp_path, fresh_model):
    """Batches of 2 images split caption lists apart; scores equal a direct computation."""
    clip, transform, tokenizer = fresh_model
    images, coco_json, _ = caption_files
    coco_to_mds(str(coco_json), str(images), str(tmp_path / "coco"))
    cfg = EvalDatasetConfig(type=EvalTask.retrieval, local=str(tmp_path / "coco"), batch_size=2)
    results = evaluate_dataset(clip, cfg, build_scores(cfg, tokenizer), transform, tokenizer, num_workers=0)

    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(images / name)) for name in CAPTIONS])
        image_features = clip.encode_image(pixels, normalize=True)
        text_features = clip.encode_text(tokenizer([c for cs in CAPTIONS.values() for c in cs]), normalize=True)
    text_image = torch.tensor([i for i, cs in enumerate(CAPTIONS.values()) for _ in cs])
    assert results["images"] == 5
    assert score_items(results) == pytest.approx(retrieval_scores(image_features, text_features, text_image), abs=1e-6)


def test_eval_takes_the_model_from_the_run_so_a_changed_width_needs_no_model_section(sample_build, tmp_path):
    """yamls/eval/zeroshot.yaml has no model section: a narrower demo model evaluates as trained."""
    from omegaconf import OmegaConf

    import pipeline.train

    cfg, _ = sample_build
    run_dir = tmp_path / "narrow"
    datasets = load(EvalConfig, EVAL_YAML, eval_overrides(cfg)).datasets
    recipe = tmp_path / "narrow.yaml"
    OmegaConf.save(
        {"base": DEMO_YAML, "eval_datasets": OmegaConf.to_container(OmegaConf.structured(datasets), enum_to_str=True)},
        recipe,
    )
    pipeline.train.main(
        [
            str(recipe),
            *train_overrides(
                cfg,
                run_dir,
                "model.custom.vision_cfg.width=64",
                "model.custom.text_cfg.width=64",
                "data.global_batch_size=32",
                "scheduler.warmup=0ba",
                "max_duration=2ba",
                "eval_interval=2ba",
                "checkpoint.save_interval=2ba",
            ),
        ]
    )
    with open(run_dir / "summary.json") as f:
        logged = json.load(f)["eval"]
    eval_cfg = load(EvalConfig, EVAL_YAML, [*eval_overrides(cfg), f"load_path={run_dir}"])
    assert eval_cfg.model is None
    clip, _, _, model = load_clip(eval_cfg)
    assert model.custom["vision_cfg"]["width"] == 64 and clip.visual.conv1.out_channels == 64
    results = evaluate(eval_cfg)["datasets"]
    expected = {f"metrics/{n}/{n}/{score}": v for n, r in results.items() for score, v in score_items(r).items()}
    assert logged == pytest.approx(expected, abs=1e-6)
    with open(run_dir / "checkpoints" / "config.yaml") as f:  # the resolved config, next to the checkpoints
        assert "width: 64" in f.read()


def test_every_caption_column_of_a_stream_is_a_retrieval_text(tmp_path):
    from streaming import MDSWriter

    from pipeline.evaluation.evaluators import EvalDataset

    columns = {"image": "bytes", "caption": "str", "recaption_a": "str"}
    with MDSWriter(out=str(tmp_path / "s"), columns=columns) as writer:
        for i in range(3):
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(png, "PNG")
            writer.write({"image": png.getvalue(), "caption": f"alt {i}", "recaption_a": "" if i == 1 else f"re {i}"})
    texts = {}
    for caption_columns in ([], ["caption", "recaption_a"]):
        dataset = EvalDataset(
            local=str(tmp_path / "s"),
            batch_size=1,
            image_transform=lambda image: 0,
            tokenizer=lambda captions: captions,
            caption_columns=caption_columns,
        )
        texts[tuple(caption_columns)] = [dataset[i]["texts"] for i in range(3)]
    assert texts[()] == [["alt 0"], ["alt 1"], ["alt 2"]]
    assert texts[("caption", "recaption_a")] == [["alt 0", "re 0"], ["alt 1"], ["alt 2", "re 2"]]  # none empty
