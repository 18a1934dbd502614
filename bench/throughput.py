"""Training throughput and peak memory of the FLIP algorithms, side by side in one run.

    python bench/throughput.py                      # CPU, a ViT-Ti/16-sized CLIP at 224 px
    python bench/throughput.py --model ViT-B-16 --device gpu --precision amp_bf16 --batch 128

Each configuration trains in a fresh subprocess (same model, same synthetic batches) through
the real Composer Trainer with the algorithms switched on; the first batches are warm-up.
Prints a markdown table of samples/s and peak memory, with ratios against unmasked training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
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


def measure(args, config: dict) -> dict:
    """Runs in the subprocess: train `args.steps` batches, time the ones after warm-up."""
    from composer import Callback, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.algorithms import build_algorithms
    from pipeline.config import AlgorithmsConfig, ModelConfig, PatchMaskingConfig
    from pipeline.model import CLIPModel, build_clip

    model_cfg = ModelConfig(name=args.model, custom=VIT_TI if args.model == "vit-ti" else None, context_length=32)
    clip, _, _, tokenizer = build_clip(model_cfg)
    model = CLIPModel(clip, model_cfg)
    size = clip.visual.image_size if hasattr(clip.visual, "image_size") else 224
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch, 3, size, size)
    texts = torch.randint(1, 49406, (args.batch, 32))
    texts[:, -1] = 49407
    loader = DataLoader(TensorDataset(images, texts), batch_size=args.batch)
    algorithms = AlgorithmsConfig(
        patch_masking=PatchMaskingConfig(config["masking"]) if config["masking"] else None,
        flash_attention=config["flash_attention"],
        grad_checkpointing=config["grad_checkpointing"],
    )

    class Timer(Callback):
        def __init__(self):
            self.times = []

        def batch_end(self, state, logger):
            if args.device == "gpu":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    timer = Timer()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-4),
        max_duration=f"{args.steps}ba",
        algorithms=build_algorithms(algorithms, seed=0, tokenizer=tokenizer),
        callbacks=[timer],
        device=args.device,
        precision=args.precision,
        progress_bar=False,
    )
    if args.device == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    measured = timer.times[args.warmup - 1 :]
    seconds = (measured[-1] - measured[0]) / (len(measured) - 1)
    if args.device == "gpu":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, whole process
    return {**config, "samples_per_sec": args.batch / seconds, "peak_mib": peak}


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
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(measure(args, json.loads(args.only))))
        return
    results = []
    for config in configurations():
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", json.dumps(config)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out.split("RESULT ", 1)[1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.model}, batch {args.batch}, {args.precision}, {device}; "
          f"{args.steps - args.warmup} timed batches after {args.warmup} warm-up\n")  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
