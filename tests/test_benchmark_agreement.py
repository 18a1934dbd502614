"""pipeline/eval.py and LAION's CLIP_benchmark CLI give the same scores for an exported model.

The same held-out images, in RGBA (transparent frames over hidden colours), palette, grayscale and
CMYK, reach both tools in the layouts users have: an ImageFolder tree and a Flickr-style caption CSV
(converted by data_prep.eval_sets), and CLIP_benchmark's webdataset folders written by its own
builder (scored by its CLI as they are, converted for ours with `eval_sets wds`). The model is the
eval YAML's tiny CLIP, exported in open_clip's hub layout and opened by CLIP_benchmark as
`local-dir:`.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import open_clip
import pytest
import torch
import webdataset
from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset, path_to_bytes
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from streaming import StreamingDataset

import pipeline.evaluation.evaluators
from data_prep.eval_sets import flickr_to_mds, imagefolder_to_mds, wds_to_mds
from pipeline.config.schema import EvalConfig, load
from pipeline.eval import main
from pipeline.model.export import export
from pipeline.run.saved import load_clip
from tests.conftest import EVAL_YAML, demo_model
from tests.test_images import encoded, in_mode, picture

CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]  # 5 or more: top-5 is scored too
TEMPLATES = ["a drawing of a {c}.", "a {c} on a plain background."]  # CLIP_benchmark's slot
MODES = ["RGBA", "P", "L", "CMYK"]
PER_CLASS, RETRIEVAL_IMAGES = 6, 24
# our score -> CLIP_benchmark's (its "text retrieval" finds captions for an image)
SAME_SCORE = {
    "top1": "acc1",
    "top5": "acc5",
    "mean_per_class_recall": "mean_per_class_recall",
    **{f"image_to_text_R@{k}": f"text_retrieval_recall@{k}" for k in (1, 5, 10)},
    **{f"text_to_image_R@{k}": f"image_retrieval_recall@{k}" for k in (1, 5, 10)},
}


class Listed(list):
    """(image path, target) pairs with the attributes CLIP_benchmark's builder reads."""

    classes = CLASSES
    templates = TEMPLATES


def write_image(path_stem, seed: int) -> str:
    image = in_mode(picture(seed), MODES[seed % len(MODES)], seed)
    path = f"{path_stem}.{'jpg' if image.mode == 'CMYK' else 'png'}"
    with open(path, "wb") as f:
        f.write(encoded(image))
    return path


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory):
    """Both layouts of one classification and one retrieval set, in CLIP_benchmark's and ours."""
    root = tmp_path_factory.mktemp("sets")
    labelled = []
    for label, name in enumerate(CLASSES):
        (root / "folder" / name).mkdir(parents=True)
        labelled += [
            (write_image(root / "folder" / name / str(i), PER_CLASS * label + i), label) for i in range(PER_CLASS)
        ]
    (root / "images").mkdir()
    captioned = [
        (write_image(root / "images" / f"{i:03d}", 100 + i), [f"picture {i}", f"drawing number {i}"])
        for i in range(RETRIEVAL_IMAGES)
    ]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption")] + [(os.path.basename(p), c) for p, cs in captioned for c in cs])
    assert {Image.open(p).mode for p, _ in labelled + captioned} == set(MODES)

    # CLIP_benchmark's own builder (clip_benchmark_export_wds), copying the files as they are
    convert_dataset(Listed(labelled), "test", str(root / "wds_shapes"), transform=path_to_bytes, verbose=False)
    convert_retrieval_dataset(captioned, "test", str(root / "wds_flickr30k"), transform=path_to_bytes, verbose=False)
    ours = {
        "shapes_folder": imagefolder_to_mds(str(root / "folder"), str(root / "mds" / "shapes_folder")),
        "shapes_wds": wds_to_mds(str(root / "wds_shapes"), str(root / "mds" / "shapes_wds")),
        "captions_csv": flickr_to_mds(
            str(root / "captions.csv"), str(root / "images"), str(root / "mds" / "captions_csv")
        ),
        "captions_wds": wds_to_mds(str(root / "wds_flickr30k"), str(root / "mds" / "captions_wds")),
    }
    return root, ours


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The eval YAML's model (fresh, seeded) and its export in open_clip's hub layout."""
    cfg = replace(load(EvalConfig, EVAL_YAML, ["load_path=null"]), model=demo_model())
    clip, _, _, _ = load_clip(cfg)
    folder = str(tmp_path_factory.mktemp("export") / "tiny-vit-demo")
    return cfg, clip, folder, export(clip, cfg.model, folder)


def test_hub_layout_opens_in_open_clip_by_name_with_the_same_model(exported, tmp_path):
    cfg, clip, folder, written = exported
    assert sorted(os.path.basename(p) for p in written) == ["open_clip_config.json", "open_clip_model.safetensors"]
    with open(os.path.join(folder, "open_clip_config.json")) as f:
        config = json.load(f)
    assert config["model_cfg"] == cfg.model.custom
    assert config["preprocess_cfg"]["mean"] == list(clip.visual.image_mean)
    assert load_file(written[0])["logit_scale"].shape == ()

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    image = Image.open(write_image(tmp_path / "probe", 1)).convert("RGB")
    pixels, texts = preprocess(image)[None], tokenizer(["a drawing of a star."])
    with torch.no_grad():
        assert torch.equal(model.eval().encode_image(pixels), clip.encode_image(pixels))
        assert torch.equal(model.encode_text(texts), clip.encode_text(texts))
    assert texts.shape[1] == cfg.model.custom["text_cfg"]["context_length"]


def run_clip_benchmark(folder: str, root, out) -> dict:
    """Its CLI on its own webdataset folders; wds/flickr30k is a retrieval set by its name."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "clip_benchmark"),
        "eval",
        "--model",
        f"local-dir:{folder}",
        "--pretrained",
        "local",
        "--dataset",
        "wds/shapes",
        "wds/flickr30k",
        "--dataset_root",
        f"{root}/wds_{{dataset}}",
        "--recall_k",
        "1",
        "5",
        "10",
        "--batch_size",
        "10",
        "--num_workers",
        "0",
        "--no_amp",
        "--output",
        f"{out}/{{dataset}}.json",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("shapes", "flickr30k")}


def run_pipeline_eval(cfg, sets: dict, root, out) -> dict:
    """pipeline/eval.py's main on a YAML naming our four converted sets."""
    datasets = {
        name: {"type": "retrieval", "local": str(root / "mds" / name), "batch_size": 7}
        for name in ("captions_csv", "captions_wds")
    }
    for name in ("shapes_folder", "shapes_wds"):
        datasets[name] = {
            "type": "classification",
            "local": str(root / "mds" / name),
            "batch_size": 7,
            "classnames": sets[name]["classnames"],  # the classnames.txt the converters wrote
            "templates": str(root / "wds_shapes" / "zeroshot_classification_templates.txt"),
        }
    out.mkdir()
    yaml = out / "eval.yaml"
    model = OmegaConf.to_container(OmegaConf.structured(cfg.model))
    OmegaConf.save({"model": model, "datasets": datasets, "num_workers": 0, "output": str(out / "ours.json")}, yaml)
    main([str(yaml)])
    return json.loads((out / "ours.json").read_text())["datasets"]


def scores_as_clip_benchmark_names(ours: dict) -> dict:
    return {SAME_SCORE[k]: v for k, v in ours.items() if k not in ("task", "images")}


@pytest.mark.filterwarnings("ignore:This DataLoader will create 8 worker processes")  # CLIP_benchmark's builder
def test_every_score_equals_clip_benchmark_on_rgba_palette_grey_and_cmyk(eval_sets, exported, tmp_path, monkeypatch):
    root, sets = eval_sets
    cfg, _, folder, _ = exported
    assert sets["shapes_wds"]["images"] == sets["shapes_folder"]["images"] == len(CLASSES) * PER_CLASS
    assert sets["captions_wds"]["images"] == sets["captions_csv"]["images"] == RETRIEVAL_IMAGES

    theirs = run_clip_benchmark(folder, root, tmp_path)
    assert theirs["shapes"]["task"] == "zeroshot_classification" and theirs["flickr30k"]["task"] == "zeroshot_retrieval"
    ours = run_pipeline_eval(cfg, sets, root, tmp_path / "after")
    pairs = {
        "shapes_folder": "shapes",
        "shapes_wds": "shapes",
        "captions_csv": "flickr30k",
        "captions_wds": "flickr30k",
    }
    for name, their_name in pairs.items():
        scores = scores_as_clip_benchmark_names(ours[name])
        assert len(scores) == (3 if "shapes" in name else 6)
        # The table prints percent to 2 decimals (1e-4); the scores agree far closer than that.
        assert scores == pytest.approx(theirs[their_name]["metrics"], abs=1e-6), name

    # These images catch the old decoding (open_clip's transform on the image in its own mode).
    monkeypatch.setattr(
        pipeline.evaluation.evaluators, "decode_rgb", lambda data, transform: transform(Image.open(io.BytesIO(data)))
    )
    before = run_pipeline_eval(cfg, sets, root, tmp_path / "before")
    for name, their_name in pairs.items():
        assert scores_as_clip_benchmark_names(before[name]) != pytest.approx(theirs[their_name]["metrics"], abs=1e-6)


def broken_copy(eval_sets, tmp_path, name: str) -> str:
    root, _ = eval_sets
    shutil.copytree(root / name, tmp_path / name)
    return str(tmp_path / name)


def test_wds_folder_errors_name_the_problem(eval_sets, tmp_path):
    shapes = broken_copy(eval_sets, tmp_path, "wds_shapes")
    out = str(tmp_path / "out")
    with open(os.path.join(shapes, "test", "nshards.txt"), "w") as f:
        f.write("2\n")
    with pytest.raises(ValueError, match=r"shards counted in nshards.txt are missing: 1.tar"):
        wds_to_mds(shapes, out)
    with pytest.raises(ValueError, match=r"wds_shapes/train: no webdataset shards"):
        wds_to_mds(shapes, out, split="train")
    with open(os.path.join(shapes, "dataset_type.txt"), "w") as f:
        f.write("multilabel\n")
    with pytest.raises(ValueError, match=r"dataset type 'multilabel' is not supported"):
        wds_to_mds(shapes, out)

    os.remove(os.path.join(shapes, "dataset_type.txt"))
    with webdataset.TarWriter(os.path.join(shapes, "test", "1.tar")) as sink:
        sink.write({"__key__": "s0000036", "png": b"\x89PNG\r\n\x1a\n not an image", "cls": 2})
    with pytest.raises(ValueError, match=r"1.tar: sample s0000036.png: not a readable image"):
        wds_to_mds(shapes, out)
    with webdataset.TarWriter(os.path.join(shapes, "test", "1.tar")) as sink:
        sink.write({"__key__": "s0000036", "png": encoded(picture(0)), "txt": "a caption, not a class"})
    with pytest.raises(ValueError, match=r"sample s0000036 needs an image \(webp/png/jpg/jpeg\) and a .cls"):
        wds_to_mds(shapes, out)


def test_wds_sets_keep_labels_captions_and_clip_benchmark_files(eval_sets):
    root, sets = eval_sets
    assert sets["shapes_wds"]["type"] == "classification"
    for name in ("classnames", "templates"):
        with open(sets["shapes_wds"][name]) as copied, open(root / "wds_shapes" / os.path.basename(copied.name)) as f:
            assert copied.read() == f.read()
    # The same samples as the ImageFolder conversion: byte-identical images of the same classes
    # (whose labels differ: ImageFolder sorts the class names, the builder kept CLASSES' order).
    classes = {}
    for name in ("shapes_folder", "shapes_wds"):
        with open(sets[name]["classnames"]) as f:
            names = f.read().splitlines()
        samples = StreamingDataset(local=str(root / "mds" / name), batch_size=1)
        classes[name] = {s["image"]: names[int(s["label"])] for s in samples}
    assert names == CLASSES and sorted(CLASSES) != CLASSES
    assert classes["shapes_wds"] == classes["shapes_folder"] and len(classes["shapes_wds"]) == len(CLASSES) * PER_CLASS
    csv_captions = {
        s["image"]: s["captions"] for s in StreamingDataset(local=str(root / "mds" / "captions_csv"), batch_size=1)
    }
    wds_captions = {
        s["image"]: s["captions"] for s in StreamingDataset(local=str(root / "mds" / "captions_wds"), batch_size=1)
    }
    assert wds_captions == csv_captions and all(len(c) == 2 for c in wds_captions.values())
