"""Training throughput and peak memory of the FLIP algorithms, side by side in one run.

    python bench/throughput.py                      # CPU, a ViT-Ti/16-sized CLIP at 224 px
    python bench/throughput.py --model ViT-B-16 --device gpu --precision amp_bf16 --batch 128
    python bench/throughput.py --peer --batch 64 --steps 12   # against open_clip_train.main
    python bench/throughput.py --peer --model ViT-B-16 --device gpu --precision amp_bf16 --batch 256  # + MFU

Each configuration trains in a fresh subprocess (same model, same synthetic batches) through
the real Composer Trainer with the algorithms switched on; the first batches are warm-up.
Prints a markdown table of samples/s and peak memory, with ratios against unmasked training.

`--peer`: the whole training step, loader included, against open_clip's own trainer on the same
images (the built-in sample's, written out as files for its csv dataset), the same model, batch,
optimizer and loader workers (--workers, 1 by default) each, at masking 0 / 0.5 / 0.75 (its --force-patch-dropout):
this project's `pipeline/train.py` path (build_trainer) against `open_clip_train.main`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

# A ViT-Ti/16-sized CLIP: small enough for a CPU, still dominated by the vision tower.
VIT_TI = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 192, "layers": 12, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 6},
}


def configurations() -> list[dict]:
    rows = []
    for ratio, checkpointing, flash in itertools.product((0.0, 0.5, 0.75), (False, True), (False, True)):
        rows.append({"masking": ratio, "grad_checkpointing": checkpointing, "flash_attention": flash})
    return rows


def batch_timer(device: str):
    """A Composer callback that keeps the time each batch ended (once the GPU finished it)."""
    from composer import Callback

    class BatchTimer(Callback):
        def __init__(self):
            self.times = []

        def batch_end(self, state, logger):
            if device == "gpu":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return BatchTimer()


def measure(args, config: dict) -> dict:
    """Runs in the subprocess: train `args.steps` batches, time the ones after warm-up."""
    if args.device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    samples_per_sec = train_pipeline(args, tempfile.mkdtemp(), config)
    if args.device == "gpu":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, whole process
    return {**config, "samples_per_sec": samples_per_sec, "peak_mib": peak}


def sample_pairs(count: int, sources: list):
    """(jpeg bytes, caption) of the first `count` images of MDS streams, taken in turn."""
    from streaming import StreamingDataset

    streams = [StreamingDataset(local=source, shuffle=False, batch_size=1) for source in sources]
    for i in range(count):
        stream = streams[i % len(streams)]
        sample = stream[(i // len(streams)) % stream.num_samples]
        yield sample["image"], sample.get("caption") or sample["captions"][0]


def sample_images(folder: str, count: int, sources: list) -> str:
    """The sample's images as JPEG files and a tab-separated csv (open_clip_train's format)."""
    csv_path = os.path.join(folder, "train.csv")
    with open(csv_path, "w") as f:
        f.write("filepath\ttitle\n")
        for i, (jpeg, caption) in enumerate(sample_pairs(count, sources)):
            path = os.path.join(folder, f"{i:06d}.jpg")
            with open(path, "wb") as image:
                image.write(jpeg)
            f.write(f"{path}\t{caption}\n")
    return csv_path


def model_keys(model: str) -> dict:
    """The recipe's `model:`; vit-ti as an open_clip config (open_clip_train reads it as JSON)."""
    if model != "vit-ti":
        return {"name": model, "custom": None}
    custom = {
        **VIT_TI,
        "vision_cfg": {**VIT_TI["vision_cfg"], "mlp_ratio": 4.0},
        "text_cfg": {**VIT_TI["text_cfg"], "mlp_ratio": 4.0},
    }
    return {"name": "vit-ti-bench", "custom": custom}


def train_pipeline(args, folder: str, config: dict) -> float:
    """Samples/s after warm-up of `pipeline.train.build_trainer` on the sample's images, with the
    configuration's algorithms."""
    from data_prep.eval_sets import write_mds
    from pipeline.config.schema import TrainConfig, load
    from pipeline.train import build_trainer

    mds = os.path.join(folder, "mds")
    pairs = sample_pairs(args.batch * args.steps, args.source)
    write_mds(mds, {"image": "bytes", "caption": "str"}, ({"image": i, "caption": c} for i, c in pairs))
    ratio = config["masking"]
    recipe = {
        "run_name": "bench",
        "run_dir": f"{folder}/run",
        "checkpoint": {"save_folder": f"{folder}/checkpoints", "save_interval": "100000ba"},
        "device": args.device,
        "precision": args.precision,
        "max_duration": f"{args.steps}ba",
        "progress_bar": False,
        "console_log_interval": "100000ba",
        "model": model_keys(args.model),
        "data": {"global_batch_size": args.batch, "num_workers": args.workers, "streams": {"images": {"local": mds}}},
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-6},
        "scheduler": {"warmup": "1ba"},
        "algorithms": {
            "patch_masking": {"ratio": ratio} if ratio else None,
            "flash_attention": config.get("flash_attention", False),
            "grad_checkpointing": config.get("grad_checkpointing", False),
        },
    }
    with open(os.path.join(folder, "recipe.yaml"), "w") as f:
        json.dump(recipe, f)  # JSON is YAML
    trainer, timer = build_trainer(load(TrainConfig, os.path.join(folder, "recipe.yaml"))), batch_timer(args.device)
    trainer.state.callbacks.append(timer)
    trainer.fit()
    measured = timer.times[args.warmup - 1 :]
    return args.batch / ((measured[-1] - measured[0]) / (len(measured) - 1))


# open_clip_train's fixed settings: one epoch, the optimizer train_pipeline gives the other side, a log per step.
PEER_SETTINGS = (
    "--dataset-type csv --epochs 1 --lr 1e-4 --wd 0.1 --warmup 1 --beta1 0.9 --beta2 0.98 --eps 1e-6 "
    "--log-every-n-steps 1 --name peer --save-frequency 0 --seed 0"
).split()


def measure_peer(args, config: dict) -> dict:
    """Runs in the subprocess: one side of the --peer comparison; seconds per step after warm-up."""
    folder = tempfile.mkdtemp()
    if config["trainer"] == "pipeline":
        return {**config, "samples_per_sec": train_pipeline(args, folder, config)}
    csv_path = sample_images(folder, args.batch * args.steps, args.source)
    model = model_keys(args.model)
    name, custom, ratio = model["name"], model["custom"], config["masking"]
    import open_clip
    from open_clip_train.main import main as open_clip_main

    if custom:
        with open(os.path.join(folder, "vit-ti-bench.json"), "w") as f:
            json.dump(custom, f)
        open_clip.add_model_config(os.path.join(folder, "vit-ti-bench.json"))
    log = os.path.join(folder, "logs")
    options = {
        "--train-data": csv_path,
        "--model": name,
        "--batch-size": args.batch,
        "--workers": args.workers,
        "--precision": "amp_bf16" if args.precision == "amp_bf16" else "fp32",
        "--logs": log,
        **({"--force-patch-dropout": ratio} if ratio else {}),
    }
    open_clip_main([*PEER_SETTINGS, *(str(part) for option in options.items() for part in option)])
    with open(os.path.join(log, "peer", "out.log")) as f:
        steps = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+)", f.read())]
    seconds = sum(steps[args.warmup :]) / len(steps[args.warmup :])
    return {**config, "samples_per_sec": args.batch / seconds}


def training_flops_per_sample(model: str, masking: float) -> float:
    """This project's count (CLIPModel.flops_per_batch: kept patches only, backward = 2x forward)."""
    from pipeline.config.schema import ModelConfig
    from pipeline.model.clip import CLIPModel, build_clip
    from pipeline.model.towers import install_patch_dropout

    cfg = ModelConfig(name=model)
    clip = build_clip(cfg)[0].train()
    if masking:
        install_patch_dropout(clip, masking, seed=0)
    context = clip.context_length if hasattr(clip, "context_length") else 77
    return CLIPModel(clip, cfg).flops_per_batch((torch.empty(1), torch.empty(1, context), None))


def peer_table(results: list[dict], args) -> str:
    mfu = args.device == "gpu" and args.model != "vit-ti"  # of the GPU's dense bf16 peak (--peak-tflops)
    lines = [
        "| masking | open_clip_train samples/s | this project samples/s | this project vs open_clip_train |"
        + (" MFU open_clip_train | MFU this project |" if mfu else ""),
        "|---|---|---|---|" + ("---|---|" if mfu else ""),
    ]
    for ratio in sorted({r["masking"] for r in results}):
        peer, ours = (
            next(r for r in results if r["masking"] == ratio and r["trainer"] == t)["samples_per_sec"]
            for t in ("open_clip_train", "pipeline")
        )
        row = f"| {ratio:.2f} | {peer:.1f} | {ours:.1f} | {ours / peer:.2f}x |"
        if mfu:
            flops = training_flops_per_sample(args.model, ratio) / (args.peak_tflops * 1e12)
            row += f" {peer * flops:.1%} | {ours * flops:.1%} |"
        lines.append(row)
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    base = next(r for r in results if r["masking"] == 0 and not r["grad_checkpointing"] and not r["flash_attention"])
    lines = [
        "| masking | grad ckpt | flash attn | samples/s | speed vs unmasked | peak MiB | memory vs unmasked |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['masking']:.2f} | {'on' if r['grad_checkpointing'] else 'off'} | "
            f"{'on' if r['flash_attention'] else 'off'} | {r['samples_per_sec']:.1f} | "
            f"{r['samples_per_sec'] / base['samples_per_sec']:.2f}x | {r['peak_mib']:.0f} | "
            f"{r['peak_mib'] / base['peak_mib']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-ti", help="vit-ti, or an open_clip model name")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--peer", action="store_true", help="against open_clip_train.main, loader included")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of each trainer")
    parser.add_argument(
        "--source", nargs="+", default=["data/sample/web", "data/sample/coco"], help="MDS streams of images"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="--peer on a GPU: dense bf16 peak (H100/H200 SXM: 989)"
    )
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    args = parser.parse_args()
    if args.only:
        config = json.loads(args.only)
        print("RESULT " + json.dumps(measure_peer(args, config) if args.peer else measure(args, config)))
        return
    if args.peer:  # interleaved, so drift on a shared machine hits both trainers alike
        configs = [{"masking": r, "trainer": t} for r in (0.0, 0.5, 0.75) for t in ("open_clip_train", "pipeline")]
    else:
        configs = configurations()
    results = []
    for config in configs:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", json.dumps(config)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.split("RESULT ", 1)[1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\n{args.model}, batch {args.batch}, {args.precision}, {device}; "
        f"{args.steps - args.warmup} timed batches after {args.warmup} warm-up\n"
    )
    print(peer_table(results, args) if args.peer else table(results))


if __name__ == "__main__":
    main()
