"""CPU cost per sample of the training loader against webdataset + open_clip, side by side in one run.

    python bench/loader.py                     # after `make shards`; 1,500 JPEGs at 256 and 512 px
    python bench/loader.py --samples 600 --sizes 512 --repeats 1
    python bench/loader.py --device cuda       # the device part on a GPU (nvjpeg), timed by the clock

The same JPEGs (the sample's images on a noisy background, 5:4, stored at a short side of 256 and
512, quality 90) are written once as a webdataset tar and once as an MDS stream. Each loader then
reads, decodes, augments (ViT-B/16: 224 px, open_clip's crop scale, its normalisation) and
tokenizes every sample in this one process, on one thread; the CPU time it takes is the cost per
sample. Loaders:

- webdataset + open_clip: open_clip_train's pipeline (decode "pilrgb", its train transform, tokenizer);
- previous: this project's loader before this benchmark (torch.manual_seed per sample + open_clip's transform);
- augment_on=cpu: the default path (pipeline/data/augment.py `Augment.on_cpu`);
- augment_on=device: the workers' part (decode at the crop's scale, cut the crop, tokenize), and
  separately the device part (resize, flip, normalise, batched), on `--device`;
- augment_on=device, decode_on_device: the workers pass JPEG bytes on; the device part decodes too
  (nvjpeg on a GPU; libjpeg-turbo on a CPU).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import tarfile
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def make_jpegs(source: str, count: int, short_side: int) -> list:
    """(jpeg bytes, caption) pairs: the stream's images on a noisy background (photo-like entropy)."""
    from streaming import StreamingDataset

    from pipeline.common.images import decode_rgb

    stream = StreamingDataset(local=source, shuffle=False, batch_size=1)
    rng = np.random.default_rng(0)
    size = (short_side * 5 // 4, short_side)
    out = []
    for i in range(count):
        sample = stream[i % stream.num_samples]
        background = rng.normal(128, 40, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(background)
        thing = decode_rgb(sample["image"]).resize((short_side * 3 // 4,) * 2, Image.Resampling.BICUBIC)
        image.paste(thing, (size[0] // 8, size[1] // 8))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append((buffer.getvalue(), sample.get("caption") or "a picture"))
    return out


def write_both(samples: list, folder: str) -> tuple:
    from data_prep.eval_sets import write_mds

    tar_path, mds = os.path.join(folder, "samples.tar"), os.path.join(folder, "mds")
    with tarfile.open(tar_path, "w") as tar:
        for i, (jpeg, caption) in enumerate(samples):
            for suffix, data in (("jpg", jpeg), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_mds(mds, {"image": "bytes", "caption": "str"}, ({"image": j, "caption": c} for j, c in samples))
    return tar_path, mds


def cpu_seconds(items) -> tuple:
    """(CPU seconds of this process, items) over an iterable, consumed whole."""
    start = time.process_time()
    out = list(items)
    return time.process_time() - start, out


def device_seconds(augment, payloads, boxes, flips, device: torch.device) -> float:
    """The device's part, batched by 64 as training does: CPU-seconds on a CPU, wall seconds on a GPU."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    for i in range(0, len(payloads), 64):
        augment.on_device(
            list(payloads[i : i + 64]), torch.stack(boxes[i : i + 64]), torch.tensor(flips[i : i + 64]), device
        )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def run_loaders(tar_path: str, mds: str, preprocess, augment, tokenizer, device: torch.device) -> dict:
    import webdataset as wds

    from pipeline.common.images import decode_rgb
    from pipeline.data.loader import CLIPStreamingDataset

    def dataset(transform):
        d = CLIPStreamingDataset(local=mds, batch_size=1, shuffle=False, augment=transform, tokenizer=tokenizer)
        return (d[i] for i in range(d.num_samples))

    def previous(data: bytes, rng: random.Random):
        torch.manual_seed(rng.getrandbits(63))
        return decode_rgb(data, preprocess)

    peer = (
        wds.WebDataset(tar_path, shardshuffle=False)
        .decode("pilrgb")
        .rename(image="jpg", text="txt")
        .map_dict(image=preprocess, text=lambda text: tokenizer(text)[0])
        .to_tuple("image", "text")
    )
    results = {}
    results["webdataset + open_clip"], _ = cpu_seconds(peer)
    results["previous (manual_seed + open_clip transform)"], _ = cpu_seconds(dataset(previous))
    results["augment_on=cpu"], _ = cpu_seconds(dataset(augment.on_cpu))
    for decode_on_device, name in ((False, "augment_on=device"), (True, "augment_on=device, decode_on_device")):
        workers, items = cpu_seconds(dataset(lambda d, r, flag=decode_on_device: augment.worker_part(d, r, flag)))
        parts, _ = zip(*items)
        payloads, boxes, flips = zip(*parts)
        results[f"{name}: workers"] = workers
        results[f"{name}: device part (on {device.type})"] = device_seconds(augment, payloads, boxes, flips, device)
    results["tokenizer alone"], _ = cpu_seconds(tokenizer(caption)[0] for caption in captions_of(tar_path))
    return results


def captions_of(tar_path: str) -> list:
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="data/sample/web", help="an MDS stream whose images to use")
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where the device part of augment_on=device runs")
    args = parser.parse_args()
    import open_clip

    from pipeline.config.schema import AugmentConfig
    from pipeline.data.augment import build_augment

    torch.set_num_threads(1)
    clip, preprocess, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)
    augment, tokenizer = build_augment(clip, AugmentConfig()), open_clip.get_tokenizer("ViT-B-16")
    print(
        f"{args.samples} JPEGs per size, ViT-B/16 train augmentation, 1 thread, {args.repeats} runs each "
        "(CPU-seconds of this process)\n"
    )
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            tar_path, mds = write_both(make_jpegs(args.source, args.samples, size), folder)
            device = torch.device(args.device)
            runs = [run_loaders(tar_path, mds, preprocess, augment, tokenizer, device) for _ in range(args.repeats)]
        peer = [r["webdataset + open_clip"] for r in runs]
        print(f"### stored at {size * 5 // 4}x{size}\n")
        print("| loader | samples/s per core | CPU ms per sample | CPU per sample vs webdataset + open_clip |")
        print("|---|---|---|---|")
        for name in runs[0]:
            seconds = [r[name] for r in runs]
            rate = " / ".join(f"{args.samples / s:.0f}" for s in seconds)
            ms = " / ".join(f"{1000 * s / args.samples:.2f}" for s in seconds)
            ratio = " / ".join(f"{s / p:.2f}x" for s, p in zip(seconds, peer))
            print(f"| {name} | {rate} | {ms} | {ratio} |")
        print()


if __name__ == "__main__":
    main()
