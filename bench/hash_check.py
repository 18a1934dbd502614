"""What training's shard check (`data.validate_hash`) costs: one epoch over an MDS stream through
CLIPStreamingDataset with ViT-B/16's train augmentation, with the check off, xxh64 (the default) and sha1.

    python bench/hash_check.py data/sample/web        # after `make shards`

Each shard is hashed once per loader process, the first time a sample of it is read, so the cost
is one pass over the shard's bytes, set against decoding and augmenting every sample in it.
"""

from __future__ import annotations

import argparse
import os
import time


def epoch_seconds(local: str, validate_hash, augment, tokenizer) -> float:
    from pipeline.data.loader import CLIPStreamingDataset

    dataset = CLIPStreamingDataset(
        local=local,
        batch_size=1,
        shuffle=False,
        augment=augment.on_cpu,
        tokenizer=tokenizer,
        validate_hash=validate_hash,
    )
    start = time.perf_counter()
    for i in range(dataset.num_samples):
        dataset[i]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("local", help="a local MDS stream written by make shards")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import open_clip
    import torch

    torch.set_num_threads(1)
    from pipeline.config.schema import AugmentConfig
    from pipeline.data.augment import build_augment

    augment = build_augment(open_clip.create_model("ViT-B-16", pretrained=None), AugmentConfig())
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    size = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.local) for f in files if f.endswith(".mds")
    )
    results = {name: [] for name in ("off", "xxh64", "sha1")}
    for _ in range(args.repeats):  # interleaved, so drift hits every setting alike
        for name in results:
            results[name].append(epoch_seconds(args.local, None if name == "off" else name, augment, tokenizer))
    base = min(results["off"])
    print(f"{args.local}: {size / 2**20:.1f} MiB of shards, 1 thread, best of {args.repeats}\n")
    print("| validate_hash | epoch seconds | vs off |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {min(seconds):.2f} | {min(seconds) / base:.3f}x |")


if __name__ == "__main__":
    main()
