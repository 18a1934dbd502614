"""The built-in sample: real images that ship in Debian packages, served over loopback HTTP.

- "web": Noto color emoji (fonts-noto-color-emoji) rendered with Pillow, captioned with
  their Unicode names (unicode-data's emoji-test.txt, fully-qualified entries).
- "coco": Fashion-MNIST (dataset-fashion-mnist), captioned from the class name.
Every Nth emoji and Fashion-MNIST's own test set are held out as "web_test" / "coco_test".

`serve(...)` writes the images and URL lists and serves them on 127.0.0.1 so that
img2dataset really downloads them. Each training list also gets missing URLs, corrupt
images, empty captions and repeated URLs, so the build's accounting is exercised; the web list also
gets near-duplicates and copies of held-out emoji, for the curation stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import os
import random
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from data_prep.sources import SampleConfig, SourcesConfig
from pipeline.common.storage import write_text

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FASHION_CAPTIONS = [
    "a photo of a {}.",
    "a grayscale photo of a {}.",
    "a small picture of a {} on a black background.",
    "a product photo of a {}.",
]
# The URL lists the sample writes; the sources YAML points each source's url_list here.
SAMPLE_SOURCES = ("web", "coco", "web_test", "coco_test")


def check_packages() -> None:
    missing = [p for p in (EMOJI_FONT, EMOJI_TEST, FASHION_DIR) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"The built-in sample needs the Debian packages that `make install` installs "
            f"(DEBIAN_PACKAGES in the Makefile; missing: {', '.join(missing)})."
        )


def emoji_entries() -> list[tuple[str, str]]:
    """(characters, name) for every fully-qualified emoji in emoji-test.txt."""
    entries = []
    with open(EMOJI_TEST, encoding="utf-8") as f:
        for line in f:
            if "; fully-qualified" not in line:
                continue
            # "1F600 ; fully-qualified # 😀 E1.0 grinning face"
            codes = line.split(";")[0].split()
            name = line.split("#", 1)[1].strip().split(" ", 2)[2]
            entries.append(("".join(chr(int(c, 16)) for c in codes), name))
    return entries


def render_emoji(chars: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    # Noto Color Emoji is a bitmap font: 109 is its one native size.
    image = Image.new("RGB", (136, 128), "white")
    ImageDraw.Draw(image).text((0, 0), chars, font=font, embedded_color=True)
    return image


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_split(split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(f"{FASHION_DIR}/{prefix}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(f"{FASHION_DIR}/{prefix}-labels-idx1-ubyte.gz")[:count]
    return images, labels


def _add_bad_rows(rows: list[dict], name: str, cfg: SampleConfig, files_dir: str, rng: random.Random) -> None:
    """Missing URLs, corrupt images, empty captions and repeated URLs, counted by the build."""
    template = rows[0]
    bad_dir = os.path.join(files_dir, name, "bad")
    os.makedirs(bad_dir, exist_ok=True)
    for i in range(cfg.missing_urls):
        rows.append({**template, "url": f"{name}/missing/{i}.png", "caption": "a missing image"})
    for i in range(cfg.corrupt_images):
        with open(os.path.join(bad_dir, f"corrupt{i}.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + rng.randbytes(200))
        rows.append({**template, "url": f"{name}/bad/corrupt{i}.png", "caption": "a corrupt image"})
    for row in rng.sample(rows[: len(rows) // 2], cfg.empty_captions):
        # A real image under a new URL, with nothing to say about it.
        rows.append({**row, "url": row["url"] + "?empty", "caption": "  ", "captions": ["  "]})
    for row in rng.sample(rows[: len(rows) // 2], cfg.duplicate_urls):
        rows.append(dict(row))


def _reencode(source: str, target: str) -> None:
    """`source` resized to 3/4 and saved as a JPEG of lower quality: the same picture, other bytes."""
    with Image.open(source) as image:
        image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC).save(
            target, "JPEG", quality=70
        )


def _add_planted_copies(lists: dict, cfg: SampleConfig, files_dir: str, rng: random.Random) -> None:
    """Near-duplicates of training emoji and copies of held-out ones, appended to the web list."""
    web, held_out = lists["web"], lists["web_test"]
    planted = os.path.join(files_dir, "emoji", "planted")
    os.makedirs(planted, exist_ok=True)
    for i, row in enumerate(rng.sample(web[: len(web) // 2], cfg.near_duplicates)):
        _reencode(os.path.join(files_dir, row["url"]), os.path.join(planted, f"near{i}.jpg"))
        web.append({**row, "url": f"emoji/planted/near{i}.jpg"})
    for i, row in enumerate(rng.sample(held_out, cfg.eval_copies)):
        source = os.path.join(files_dir, row["url"])
        if i % 2 == 0:  # the same file under another URL
            name = f"eval{i}.png"
            shutil.copyfile(source, os.path.join(planted, name))
        else:
            name = f"eval{i}.jpg"
            _reencode(source, os.path.join(planted, name))
        web.append({**row, "url": f"emoji/planted/{name}"})


def write_sample(cfg: SampleConfig, files_dir: str) -> dict:
    """Write images under files_dir; return {source: rows} with URLs relative to the server root."""
    check_packages()
    rng = random.Random(cfg.seed)
    lists: dict = {name: [] for name in SAMPLE_SOURCES}

    font = ImageFont.truetype(EMOJI_FONT, 109)
    os.makedirs(os.path.join(files_dir, "emoji"), exist_ok=True)
    for i, (chars, name) in enumerate(emoji_entries()):
        path = f"emoji/{i:05d}.png"
        render_emoji(chars, font).save(os.path.join(files_dir, path), compress_level=1)  # 2x quicker, 1.1x bigger
        split = "web_test" if i % cfg.emoji_test_every == cfg.emoji_test_every - 1 else "web"
        lists[split].append({"url": path, "caption": name, "label": -1})

    for split, count, source in (("train", cfg.fashion_train, "coco"), ("test", cfg.fashion_test, "coco_test")):
        images, labels = fashion_split(split, count)
        os.makedirs(os.path.join(files_dir, f"fashion_{split}"), exist_ok=True)
        for i, (pixels, label) in enumerate(zip(images, labels)):
            path = f"fashion_{split}/{i:05d}.png"
            Image.fromarray(pixels).save(os.path.join(files_dir, path))
            pattern = rng.randrange(len(FASHION_CAPTIONS))
            # Two captions per image, as COCO has several: training picks one per epoch.
            captions = [
                FASHION_CAPTIONS[(pattern + k) % len(FASHION_CAPTIONS)].format(FASHION_CLASSES[label]) for k in (0, 1)
            ]
            lists[source].append({"url": path, "caption": captions[0], "captions": captions, "label": int(label)})

    for name in ("web", "coco"):
        _add_bad_rows(lists[name], name, cfg, files_dir, rng)
    _add_planted_copies(lists, cfg, files_dir, rng)
    return lists


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@contextlib.contextmanager
def http_server(root: str, port: int = 0) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (port 0: a free one); yields the base URL."""
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_QuietHandler, directory=root))
    except OSError as err:
        raise OSError(f"cannot serve the built-in sample on 127.0.0.1:{port} ({err}); set sample.port") from err
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def coco_captions_json(rows: list[dict]) -> dict:
    """A COCO captions file (images with coco_url, annotations with captions) for URL-list rows."""
    images = [{"id": i, "coco_url": row["url"], "label": row["label"]} for i, row in enumerate(rows)]
    annotations = [
        {"id": len(images) * k + i, "image_id": i, "caption": caption}
        for i, row in enumerate(rows)
        for k, caption in enumerate(row.get("captions", [row["caption"]]))
    ]
    return {"info": {"description": "built-in sample"}, "images": images, "annotations": annotations}


def write_url_list(rows: list[dict], path: str, input_format: str) -> None:
    """Written only when its content changed, so a re-run finds the same file and resumes."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if input_format == "coco_captions":
        content = json.dumps(coco_captions_json(rows)).encode()
    else:
        buffer = pa.BufferOutputStream()
        pq.write_table(
            pa.Table.from_pylist([{k: v for k, v in row.items() if k != "captions"} for row in rows]), buffer
        )
        content = buffer.getvalue().to_pybytes()
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == content:
                return
    with open(path, "wb") as f:
        f.write(content)


def write_eval_files(cfg: SourcesConfig) -> None:
    """Fashion-MNIST's class names (label order) and the sample's caption patterns as prompt
    templates, next to the coco_test stream, as CLIP_benchmark's sets carry them."""
    from data_prep.eval_sets import CLASSNAMES_FILE, TEMPLATES_FILE  # torchvision and streaming: not at start-up

    if "coco_test" in cfg.sources:
        out = cfg.sources["coco_test"].out.rstrip("/")
        write_text(f"{out}/{CLASSNAMES_FILE}", "".join(f"{name}\n" for name in FASHION_CLASSES))
        write_text(f"{out}/{TEMPLATES_FILE}", "".join(f"{template}\n" for template in FASHION_CAPTIONS))


SAMPLE_MANIFEST = "sample.json"  # in the files folder: the config the files were written for, and the rows


def sample_files(cfg: SampleConfig, files_dir: str) -> dict:
    """write_sample's rows, its files written once per config: a re-run (after a kill, or `make demo`'s
    curation build) finds them and skips rendering the 3,700 images again (10 s of a core)."""
    manifest = os.path.join(files_dir, SAMPLE_MANIFEST)
    written_for = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "port"}  # URLs are relative
    if os.path.exists(manifest):
        with open(manifest) as f:
            saved = json.load(f)
        if saved["config"] == written_for:
            return saved["rows"]
        os.remove(manifest)  # a write killed halfway must not pass for the files of the older config
    rows = write_sample(cfg, files_dir)
    with open(manifest + ".tmp", "w") as f:
        json.dump({"config": written_for, "rows": rows}, f)
    os.replace(manifest + ".tmp", manifest)
    return rows


@contextlib.contextmanager
def serve(cfg: SourcesConfig) -> Iterator[None]:
    """Write the sample and its URL lists (at each source's url_list) and serve it meanwhile."""
    files_dir = os.path.join(cfg.work_dir, "sample_files")
    lists = sample_files(cfg.sample, files_dir)
    with http_server(files_dir, cfg.sample.port) as base_url:
        for name, source in cfg.sources.items():
            if name not in lists:
                raise ValueError(f"the built-in sample has sources {SAMPLE_SOURCES}, not '{name}'")
            rows = [{**row, "url": f"{base_url}/{row['url']}"} for row in lists[name]]
            write_url_list(rows, source.url_list, source.input_format)
        yield
