"""Common eval-set layouts -> eval MDS streams for `pipeline/eval.py`.

    python -m data_prep.eval_sets imagefolder ROOT OUT          # ROOT/<class>/<image>: classification
    python -m data_prep.eval_sets coco CAPTIONS_JSON IMAGES OUT   # COCO captions annotations: retrieval
    python -m data_prep.eval_sets flickr CSV IMAGES OUT           # CSV with image,caption columns: retrieval
    python -m data_prep.eval_sets wds ROOT OUT [--split test]     # CLIP_benchmark's webdataset layout: either

Every stream has `image` (the file's own bytes) and `key` (its path). Classification adds `label`
(int32) and writes classnames.txt (one per line, in label order) next to the shards: point the eval
YAML's `classnames` at it. Retrieval adds `captions`, a json list (several per image).

`wds` reads a CLIP_benchmark webdataset folder as `clip_benchmark_export_wds` writes it and as the
`wds_*` sets are published: ROOT/<split>/*.tar (+ nshards.txt), dataset_type.txt (retrieval, else
classification), classnames.txt and zeroshot_classification_templates.txt, which are copied to OUT
for the eval YAML's `classnames` and `templates`.

Every image is decoded (as training and eval decode it) before it is written: a file that does not
decode stops the conversion with its name.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
from collections.abc import Iterable
from typing import Optional

import webdataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from pipeline.common.images import ImageSource, decode_rgb
from pipeline.common.storage import delete

CLASSIFICATION_COLUMNS = {"image": "bytes", "key": "str", "label": "int32"}
RETRIEVAL_COLUMNS = {"image": "bytes", "key": "str", "captions": "json"}
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # CLIP_benchmark's name; templates use "{c}"
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # what CLIP_benchmark reads, in its order


def read_image(source: ImageSource, name: Optional[str] = None) -> bytes:
    """The image's own bytes (from a path, or given), after checking that they decode as training and
    eval will decode them: an eval set must not lose images silently."""
    try:
        decode_rgb(source)
    except Exception as err:  # noqa: BLE001 - any decoder error
        raise ValueError(f"{name or source}: not a readable image ({err})") from err
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def write_mds(out: str, columns: dict, samples: Iterable[dict]) -> int:
    """Write (replacing) a local MDS stream, its shards hashed as `make shards` hashes them (training
    checks them); returns the number of samples."""
    from streaming import MDSWriter

    from data_prep.to_mds import SHARD_HASHES

    delete(out)  # MDS shards can't be appended to
    count = 0
    with MDSWriter(out=out, columns=columns, hashes=SHARD_HASHES) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count


def imagefolder_to_mds(root: str, out: str) -> dict:
    """ROOT/<class>/<image> (torchvision ImageFolder's order: classes sorted, label = position)."""
    classes, class_to_idx = find_classes(root)
    files = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    samples = ({"image": read_image(path), "key": os.path.relpath(path, root), "label": label} for path, label in files)
    count = write_mds(out, CLASSIFICATION_COLUMNS, samples)
    with open(os.path.join(out, CLASSNAMES_FILE), "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in classes))
    return {"images": count, "classes": len(classes), "classnames": os.path.join(out, CLASSNAMES_FILE)}


def _retrieval_to_mds(captions_by_file: dict, images_dir: str, out: str) -> dict:
    """{file name: [captions]} -> retrieval stream; files keep their first-seen order."""
    samples = (
        {"image": read_image(os.path.join(images_dir, name)), "key": name, "captions": captions}
        for name, captions in captions_by_file.items()
    )
    count = write_mds(out, RETRIEVAL_COLUMNS, samples)
    return {"images": count, "captions": sum(len(c) for c in captions_by_file.values())}


def coco_captions(captions_json: str) -> dict:
    """{file name: [captions]} from a COCO captions file (images + annotations with image_id, caption)."""
    with open(captions_json, encoding="utf-8") as f:
        data = json.load(f)
    by_id: dict = {}
    for annotation in data["annotations"]:
        by_id.setdefault(annotation["image_id"], []).append(annotation["caption"].strip())
    # Images nobody captioned have nothing to retrieve: left out.
    return {image["file_name"]: by_id[image["id"]] for image in data["images"] if image["id"] in by_id}


def csv_captions(csv_path: str) -> dict:
    """{file name: [captions]} from CSV rows of image,caption (one row per caption, Flickr30k style)."""
    captions: dict = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            captions.setdefault(row["image"], []).append(row["caption"].strip())
    return captions


def coco_to_mds(captions_json: str, images_dir: str, out: str) -> dict:
    return _retrieval_to_mds(coco_captions(captions_json), images_dir, out)


def flickr_to_mds(csv_path: str, images_dir: str, out: str) -> dict:
    return _retrieval_to_mds(csv_captions(csv_path), images_dir, out)


def _wds_shards(root: str, split: str) -> list:
    """The split's tar files: the nshards.txt count (CLIP_benchmark's), else the *.tar files there."""
    folder = os.path.join(root, split)
    nshards = os.path.join(folder, "nshards.txt")
    if os.path.isfile(nshards):
        with open(nshards, encoding="utf-8") as f:
            shards = [os.path.join(folder, f"{i}.tar") for i in range(int(f.read().strip()))]
    else:
        shards = sorted(glob.glob(os.path.join(folder, "*.tar")))
    if not shards:
        raise ValueError(f"{folder}: no webdataset shards (*.tar)")
    missing = [os.path.basename(shard) for shard in shards if not os.path.isfile(shard)]
    if missing:
        raise ValueError(f"{folder}: shards counted in nshards.txt are missing: {', '.join(missing)}")
    return shards


def _wds_type(root: str) -> str:
    path = os.path.join(root, "dataset_type.txt")
    if not os.path.isfile(path):
        return "classification"  # CLIP_benchmark's default
    with open(path, encoding="utf-8") as f:
        kind = f.read().strip().lower()
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{path}: dataset type {kind!r} is not supported (classification or retrieval)")
    return kind


def _wds_row(sample: dict, retrieval: bool) -> dict:
    """A webdataset sample (raw bytes per extension) -> an eval stream row."""
    where = f"{sample['__url__']}: sample {sample['__key__']}"
    extension = next((e for e in WDS_IMAGE_EXTENSIONS if e in sample), None)
    wanted = "txt" if retrieval else "cls"
    if extension is None or wanted not in sample:
        raise ValueError(
            f"{where} needs an image ({'/'.join(WDS_IMAGE_EXTENSIONS)}) and a .{wanted}; has {sorted(sample)}"
        )
    row = {"image": read_image(sample[extension], f"{where}.{extension}"), "key": sample["__key__"]}
    if retrieval:  # one caption per line, as CLIP_benchmark splits them
        row["captions"] = sample["txt"].decode("utf-8").splitlines()
    else:
        row["label"] = int(sample["cls"])
    return row


def wds_to_mds(root: str, out: str, split: str = "test") -> dict:
    """A CLIP_benchmark webdataset folder -> eval stream, with its class names and templates copied."""
    retrieval = _wds_type(root) == "retrieval"
    shards = _wds_shards(root, split)
    samples = webdataset.WebDataset(shards, shardshuffle=False, empty_check=False)
    count = write_mds(
        out,
        RETRIEVAL_COLUMNS if retrieval else CLASSIFICATION_COLUMNS,
        (_wds_row(sample, retrieval) for sample in samples),
    )
    if count == 0:
        raise ValueError(f"no samples in {', '.join(shards)}")
    summary = {"type": "retrieval" if retrieval else "classification", "images": count}
    for key, name in (("classnames", CLASSNAMES_FILE), ("templates", TEMPLATES_FILE)):
        if not retrieval and os.path.isfile(os.path.join(root, name)):
            summary[key] = shutil.copyfile(os.path.join(root, name), os.path.join(out, name))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layouts = parser.add_subparsers(dest="layout", required=True)
    layouts.add_parser("imagefolder").set_defaults(args=("root", "out"), convert=imagefolder_to_mds)
    layouts.add_parser("coco").set_defaults(args=("captions_json", "images_dir", "out"), convert=coco_to_mds)
    layouts.add_parser("flickr").set_defaults(args=("csv", "images_dir", "out"), convert=flickr_to_mds)
    wds = layouts.add_parser("wds")
    wds.set_defaults(args=("root", "out", "split"), convert=wds_to_mds)
    for layout in layouts.choices.values():
        for arg in layout.get_default("args"):
            if arg != "split":
                layout.add_argument(arg)
    wds.add_argument("--split", default="test", help="the folder under ROOT that holds the shards (default: test)")
    args = parser.parse_args(argv)
    summary = args.convert(*(getattr(args, name) for name in args.args))
    print(json.dumps({"out": args.out, **summary}))


if __name__ == "__main__":
    main()
