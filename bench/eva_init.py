"""EVA-style init on the built-in sample (after `make demo`): what pretrained towers buy.

    python bench/eva_init.py [--batches 200]

A is the demo run (runs/demo, trained from scratch). B starts both towers from A's export with
EVA-CLIP's fine-tuning rates (LAMB; visual 2e-4, text 2e-5, layer decay 0.75, logit scale 5e-4;
clip 5.0); C uses the same rates from random init. Prints the zero-shot table of A, B at step 0,
B and C after training, and how far each tower moved from where it started (relative L2 change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EVA_RATES = [
    "optimizer.name=lamb",
    "optimizer.lr=2e-4",
    "optimizer.weight_decay=0.05",
    "optimizer.visual.lr=2e-4",
    "optimizer.visual.layer_decay=0.75",
    "optimizer.text.lr=2e-5",
    "optimizer.text.layer_decay=0.75",
    "optimizer.logit_scale.lr=5e-4",
    "optimizer.lamb.max_grad_norm=null",
    "algorithms.gradient_clipping.threshold=5.0",
    "scheduler.warmup=20ba",
    "progress_bar=false",
]
SCORES = ("fashion_mnist/top1", "emoji/image_to_text_R@1", "emoji/text_to_image_R@1")


def run(*command: str) -> None:
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)


def scores(load_path: str, out: str) -> dict:
    run("pipeline/eval.py", "yamls/eval/zeroshot.yaml", f"load_path={load_path}", f"output={out}")
    with open(os.path.join(REPO, out)) as f:
        datasets = json.load(f)["datasets"]
    return {key: 100 * datasets[key.split("/")[0]][key.split("/")[1]] for key in SCORES}


def tower_change(start: dict, end: dict) -> dict:
    """Relative L2 change of each tower's weights."""
    change = {}
    for tower in ("visual", "text"):
        keys = [k for k in start if (k.startswith("visual.") == (tower == "visual")) and "logit" not in k]
        before = torch.cat([start[k].flatten().float() for k in keys])
        after = torch.cat([end[k].flatten().float() for k in keys])
        change[tower] = float((after - before).norm() / before.norm())
    return change


def weights(save_folder: str) -> dict:
    """The open_clip weights of a run's newest whole checkpoint."""
    from pipeline.model.weights import clip_weights

    return clip_weights(os.path.join(REPO, save_folder))


def initial_weights(overrides: list) -> dict:
    """The weights a run starts from: seeded init, then its visual_init / text_init."""
    from composer.utils import reproducibility

    from pipeline.config.schema import TrainConfig, load
    from pipeline.model.clip import build_clip
    from pipeline.model.weights import load_initial_weights

    cfg = load(TrainConfig, os.path.join(REPO, "yamls", "demo_cpu.yaml"), overrides)
    reproducibility.seed_all(cfg.seed)
    clip = build_clip(cfg.model)[0]
    load_initial_weights(clip, cfg.model)
    return {k: v.clone() for k, v in clip.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    os.chdir(REPO)  # the demo's relative paths (runs/, data/)
    export = "runs/demo/export"
    run("pipeline/export.py", "yamls/eval/zeroshot.yaml", export, "load_path=runs/demo")
    init_b = [f"model.visual_init.path={export}", f"model.text_init.path={export}"]
    runs = {"B": ["run_name=eva_b", *init_b], "C": ["run_name=eva_c"]}
    moved_a = tower_change(initial_weights([]), weights("runs/demo/checkpoints"))
    rows = {"A: demo, from scratch (lr 1e-3, 500 batches)": (scores("runs/demo", "runs/eva_a.json"), moved_a)}
    rows["B at step 0: A's towers"] = (scores_of_init(init_b), None)
    for name, overrides in runs.items():
        overrides = [
            *overrides,
            *EVA_RATES,
            f"max_duration={args.batches}ba",
            f"checkpoint.save_interval={args.batches}ba",
        ]
        run("pipeline/train.py", "yamls/demo_cpu.yaml", *overrides)
        label = {
            "B": f"B: A's towers + EVA rates, {args.batches} batches",
            "C": f"C: random init + EVA rates, {args.batches} batches",
        }[name]
        run_dir = f"runs/eva_{name.lower()}"
        moved = tower_change(initial_weights(overrides), weights(f"{run_dir}/checkpoints"))
        rows[label] = (scores(run_dir, f"{run_dir}/zeroshot.json"), moved)
    print("| run | " + " | ".join(SCORES) + " | visual moved | text moved |\n|---|" + "---|" * (len(SCORES) + 2))
    for label, (score, moved) in rows.items():
        change = [f"{moved[t]:.4f}" for t in ("visual", "text")] if moved else ["-", "-"]
        print(f"| {label} | " + " | ".join(f"{score[k]:.2f}" for k in SCORES) + f" | {change[0]} | {change[1]} |")


def scores_of_init(init: list) -> dict:
    """Zero-shot of the model B starts from: evaluate a fresh model after its tower init."""
    from pipeline.checkpoint.folder import LATEST
    from pipeline.config.schema import TrainConfig, load
    from pipeline.model.clip import WEIGHTS_PREFIX
    from pipeline.run.saved import write_run_config

    cfg = load(TrainConfig, os.path.join(REPO, "yamls", "demo_cpu.yaml"), ["run_name=eva_b0", *init])
    os.makedirs(cfg.checkpoint.save_folder, exist_ok=True)
    state = {f"{WEIGHTS_PREFIX}{k}": v for k, v in initial_weights(init).items()}
    torch.save({"state": {"model": state}}, os.path.join(cfg.checkpoint.save_folder, LATEST.format(rank=0)))
    write_run_config(cfg)
    return scores(cfg.run_dir, f"{cfg.run_dir}/zeroshot.json")


if __name__ == "__main__":
    main()
