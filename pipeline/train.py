"""The recipe: config -> model, data, optimizer -> Composer Trainer -> fit.

    composer -n 8 pipeline/train.py yamls/flip_l14.yaml [key=value ...]
    python pipeline/train.py yamls/demo_cpu.yaml max_duration=20ba
"""

from __future__ import annotations

import sys

import torch
from botocore.exceptions import BotoCoreError, ClientError
from composer import Trainer
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.loggers import InMemoryLogger
from composer.optim import CosineAnnealingWithWarmupScheduler
from composer.utils import dist, reproducibility

from pipeline.algorithms import build_algorithms
from pipeline.checkpointing import (
    CheckpointError,
    CheckpointUploadError,
    build_checkpoint_saver,
    guard_checkpoint_loading,
)
from pipeline.config import TrainConfig, load
from pipeline.data import build_dataloader
from pipeline.eval import build_evaluators
from pipeline.model import CLIPModel, build_clip
from pipeline.optim import build_optimizer
from pipeline.parallel import build_parallelism
from pipeline.report import write_report


def build_trainer(cfg: TrainConfig, loggers: list) -> Trainer:
    # Seed before building the model, on every rank, so all ranks start from the same weights.
    reproducibility.seed_all(cfg.seed)
    guard_checkpoint_loading(cfg.trust_checkpoints)
    device = cfg.device or ("gpu" if torch.cuda.is_available() else "cpu")
    clip, train_transform, eval_transform, tokenizer = build_clip(cfg.model)
    evaluators, eval_metrics = build_evaluators(cfg.eval_datasets, eval_transform, tokenizer, cfg.data.num_workers)
    model = CLIPModel(clip, cfg.model, eval_metrics)
    train_dataloader = build_dataloader(cfg.data, train_transform, tokenizer, dist.get_world_size(), cfg.seed)
    return Trainer(
        model=model,
        train_dataloader=train_dataloader,
        **({"eval_dataloader": evaluators, "eval_interval": cfg.eval_interval} if evaluators else {}),
        optimizers=build_optimizer(model, cfg.optimizer),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=cfg.scheduler.warmup, alpha_f=cfg.scheduler.alpha_f),
        algorithms=build_algorithms(cfg.algorithms, cfg.seed),
        max_duration=cfg.max_duration,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=build_parallelism(cfg.parallelism, device),
        device=device,
        precision=cfg.precision or ("amp_bf16" if device == "gpu" else "fp32"),
        callbacks=[
            SpeedMonitor(window_size=20),
            LRMonitor(),
            build_checkpoint_saver(
                cfg.save_folder, cfg.save_interval, cfg.save_num_checkpoints_to_keep, cfg.checkpoint_upload_timeout
            ),
        ],
        loggers=loggers,
        run_name=cfg.run_name,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        seed=cfg.seed,
        deterministic_mode=cfg.deterministic,
        progress_bar=cfg.progress_bar,
        console_log_interval=cfg.console_log_interval,
    )


def main(argv: list) -> None:
    if not argv:
        sys.exit(__doc__)
    cfg = load(TrainConfig, argv[0], argv[1:])
    losses = InMemoryLogger()
    try:
        trainer = build_trainer(cfg, loggers=[losses])
        trainer.fit()
    except (BotoCoreError, ClientError, CheckpointUploadError) as err:
        sys.exit(
            f"Object storage failed: {err}\n"
            f"Nothing is lost: the `latest` pointer under {cfg.save_folder} names the last checkpoint "
            "that finished uploading. Run the same command again to resume once the store is reachable."
        )
    except CheckpointError as err:
        source = cfg.load_path or f"the latest checkpoint under {cfg.save_folder}"
        sys.exit(f"Refusing to resume from {source}: {err}")
    if dist.get_global_rank() == 0:
        write_report(cfg, trainer.state, losses)
    trainer.close()


if __name__ == "__main__":  # Composer's remote uploader spawns processes
    main(sys.argv[1:])
