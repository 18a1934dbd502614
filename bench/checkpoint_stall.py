"""How long a checkpoint save holds up training: full against sharded, local against the bucket.

    python bench/checkpoint_stall.py            # after `make shards`; 2 CPU ranks, SeaweedFS on loopback

A ViT-B/16-sized CLIP (open_clip's ViT-B-16 towers: 150M parameters, so 1.8 GB of weights and
AdamW state) on 32 px images and 8-token captions, so that a step costs little and the save
dominates. Each configuration runs `composer -n 2` through this project's build_trainer, 13
batches, saving every 4; the stall of a save is the time between the end of the batch before it
and the end of the batch after it, less the median of the other such intervals. Configurations:

- full, bucket: FSDP2 FULL_SHARD gathers the state on rank 0, which writes one file and uploads it
  in the background;
- sharded, local: each rank writes its own DCP shard (plus sha256 and the signed manifest);
- sharded, bucket: the same, then each rank's shard uploads in the background.

DCP's async_save is not used: Composer 0.32.1's CheckpointSaver writes DCP synchronously and
uploads in the background.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BATCHES, EVERY = 13, 4
MODEL = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 768, "layers": 12},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
CONFIGS = {"full, bucket": ("full", True), "sharded, local": ("sharded", False), "sharded, bucket": ("sharded", True)}


def run_one(name: str, folder: str) -> dict:
    """Runs under `composer -n 2`: the intervals between batch ends, and the save batches."""
    from composer.utils import dist

    from bench.throughput import batch_timer
    from pipeline.config.schema import TrainConfig, load
    from pipeline.train import build_trainer

    state_dict_type, bucket = CONFIGS[name]
    save_folder = f"s3://{os.environ['BENCH_BUCKET']}/{state_dict_type}" if bucket else f"{folder}/checkpoints"
    overrides = [
        f"run_dir={folder}/run",
        f"checkpoint.save_folder={save_folder}",
        f"max_duration={BATCHES}ba",
        f"checkpoint.save_interval={EVERY}ba",
        "data.global_batch_size=8",
        "data.num_workers=0",
        "progress_bar=false",
        "device=cpu",
        "precision=fp32",
        "model.name=bench-b16",
        "parallelism.sharding=FULL_SHARD",
        f"parallelism.state_dict_type={state_dict_type}",
    ]
    cfg = load(TrainConfig, os.path.join(REPO, "yamls", "demo_cpu.yaml"), overrides)
    cfg.model.custom = MODEL

    trainer, ends = build_trainer(cfg), batch_timer("cpu")
    trainer.state.callbacks.append(ends)
    trainer.fit()
    trainer.close()  # waits for the uploads: not counted
    intervals = [b - a for a, b in zip(ends.times, ends.times[1:])]  # intervals[i]: after batch i+1 ends
    saves = [i for i in range(len(intervals)) if (i + 1) % EVERY == 0]
    normal = statistics.median(v for i, v in enumerate(intervals) if i not in saves and i > 0)
    if dist.get_global_rank() == 0:
        print(
            "RESULT "
            + json.dumps({"config": name, "step_s": normal, "stalls_s": [intervals[i] - normal for i in saves]})
        )


def main() -> None:
    from tests.s3server import S3Server

    results = []
    with tempfile.TemporaryDirectory() as root, S3Server(os.path.join(root, "s3")) as server:
        env = {**os.environ, **server.env(), "BENCH_BUCKET": server.make_bucket(), "PYTHONPATH": REPO}
        for name in CONFIGS:
            folder = tempfile.mkdtemp(dir=root)
            composer = os.path.join(os.path.dirname(sys.executable), "composer")
            proc = subprocess.run(
                [composer, "-n", "2", __file__, "--one", name, folder],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(proc.stdout[-2000:] + proc.stderr[-4000:])
            results.append(json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0]))
            print(json.dumps(results[-1]), file=sys.stderr)
    print("| checkpoint | step without a save (s) | stall per save (s), each | mean stall (s) |")
    print("|---|---|---|---|")
    for r in results:
        stalls = ", ".join(f"{s:.2f}" for s in r["stalls_s"])
        print(f"| {r['config']} | {r['step_s']:.2f} | {stalls} | {statistics.mean(r['stalls_s']):.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        run_one(sys.argv[2], sys.argv[3])
    else:
        main()
