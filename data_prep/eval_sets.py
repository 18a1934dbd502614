"""Common eval-set layouts -> eval MDS streams for `pipeline/eval.py`.

    python -m data_prep.eval_sets imagefolder ROOT OUT          # ROOT/<class>/<image>: classification
    python -m data_prep.eval_sets coco CAPTIONS_JSON IMAGES OUT   # COCO captions annotations: retrieval
    python -m data_prep.eval_sets flickr CSV IMAGES OUT           # CSV with image,caption columns: retrieval

Every stream has `image` (the file's own bytes) and `key` (its path). Classification adds `label`
(int32) and writes classnames.txt (one per line, in label order) next to the shards: point the eval
YAML's `classnames` at it. Retrieval adds `captions`, a json list (several per image).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from typing import Iterable

from PIL import Image
from streaming import MDSWriter
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

CLASSIFICATION_COLUMNS = {"image": "bytes", "key": "str", "label": "int32"}
RETRIEVAL_COLUMNS = {"image": "bytes", "key": "str", "captions": "json"}
CLASSNAMES_FILE = "classnames.txt"


def read_image(path: str) -> bytes:
    """The file's bytes, after checking that they decode: an eval set must not lose images silently."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any decoder error
        raise ValueError(f"{path}: not a readable image ({err})") from err
    with open(path, "rb") as f:
        return f.read()


def write_mds(out: str, columns: dict, samples: Iterable[dict]) -> int:
    """Write (replacing) a local MDS stream; returns the number of samples."""
    if os.path.isdir(out):
        shutil.rmtree(out)  # MDS shards can't be appended to
    count = 0
    with MDSWriter(out=out, columns=columns) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count


def imagefolder_to_mds(root: str, out: str) -> dict:
    """ROOT/<class>/<image> (torchvision ImageFolder's order: classes sorted, label = position)."""
    classes, class_to_idx = find_classes(root)
    files = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    samples = (
        {"image": read_image(path), "key": os.path.relpath(path, root), "label": label} for path, label in files
    )
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layouts = parser.add_subparsers(dest="layout", required=True)
    layouts.add_parser("imagefolder").set_defaults(args=("root", "out"), convert=imagefolder_to_mds)
    layouts.add_parser("coco").set_defaults(args=("captions_json", "images_dir", "out"), convert=coco_to_mds)
    layouts.add_parser("flickr").set_defaults(args=("csv", "images_dir", "out"), convert=flickr_to_mds)
    for layout in layouts.choices.values():
        for arg in layout.get_default("args"):
            layout.add_argument(arg)
    args = parser.parse_args(argv)
    summary = args.convert(*(getattr(args, name) for name in args.args))
    print(json.dumps({"out": args.out, **summary}))


if __name__ == "__main__":
    main()
