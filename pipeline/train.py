"""The recipe: config -> model, data, optimizer, algorithms -> Composer Trainer -> fit.

composer -n 8 pipeline/train.py yamls/flip_l14.yaml [key=value ...]
python pipeline/train.py yamls/demo_cpu.yaml max_duration=20ba
"""

from __future__ import annotations

import os
import sys

from pipeline import compat
from pipeline.config.schema import ConfigError, Device, Precision, TrainConfig, load

if __name__ == "__main__" and len(sys.argv) > 1:
    try:  # a bad config fails here, in a fraction of a second, before the heavy imports below
        load(TrainConfig, sys.argv[1], sys.argv[2:])
    except ConfigError as err:
        sys.exit(f"ConfigError: {err}")

import torch  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.callbacks import LRMonitor, SpeedMonitor  # noqa: E402
from composer.optim import CosineAnnealingWithWarmupScheduler  # noqa: E402
from composer.utils import dist, reproducibility  # noqa: E402

from pipeline.algorithms import build_algorithms  # noqa: E402
from pipeline.checkpoint.folder import CheckpointError  # noqa: E402
from pipeline.checkpoint.loading import guard_checkpoint_loading  # noqa: E402
from pipeline.checkpoint.resume import ResumePoint, resume_checkpoint  # noqa: E402
from pipeline.checkpoint.saver import CheckpointUploadError, build_checkpoint_saver  # noqa: E402
from pipeline.data.augment import build_augment  # noqa: E402
from pipeline.data.loader import build_dataloader  # noqa: E402
from pipeline.evaluation.evaluators import build_evaluators  # noqa: E402
from pipeline.model.clip import CLIPModel, build_clip, lock_towers  # noqa: E402
from pipeline.model.weights import load_initial_weights  # noqa: E402
from pipeline.run.record import RunRecord  # noqa: E402
from pipeline.run.saved import pin_sample_order, saved_config, write_run_config  # noqa: E402
from pipeline.run.summary import RunInfo  # noqa: E402
from pipeline.training.callbacks import LossSpikeError, build_loggers, build_run_callbacks  # noqa: E402
from pipeline.training.optim import build_optimizer  # noqa: E402
from pipeline.training.parallel import build_parallelism  # noqa: E402


def build_trainer(cfg: TrainConfig, loggers: list = (), resume: ResumePoint | None = None) -> Trainer:
    """The run's Trainer, resuming from `resume` if given (its sharded files checked against the
    digests it carries); its record (pipeline/run/record.py) and the config's loggers are added to `loggers`."""
    compat.apply()  # the pinned libraries' patches (pipeline/compat)
    # Seed before building the model, on every rank, so all ranks start from the same weights.
    reproducibility.seed_all(cfg.seed)
    guard_checkpoint_loading(cfg.checkpoint.trust, resume)
    device = cfg.device or (Device.gpu if torch.cuda.is_available() else Device.cpu)
    precision = cfg.precision or (Precision.amp_bf16 if device == Device.gpu else Precision.fp32)
    # Before any StreamingDataset: with no process group, streaming makes and destroys its own on the
    # same MASTER_PORT, and a rank of Composer's rendezvous could then join the store being torn down.
    if dist.get_world_size() > 1:  # as the Trainer does: one process runs without a process group
        dist.initialize_dist(device.value)
    clip, _, eval_transform, tokenizer = build_clip(cfg.model)
    load_initial_weights(clip, cfg.model)  # EVA-CLIP: pretrained towers (a resumed run then loads its checkpoint)
    lock_towers(clip, cfg.model)
    evaluators, eval_metrics = build_evaluators(cfg.eval_datasets, eval_transform, tokenizer, cfg.data.num_workers)
    model = CLIPModel(clip, cfg.model, eval_metrics)
    augment = build_augment(clip, cfg.data.augment)
    train_dataloader = build_dataloader(cfg.data, augment, tokenizer, dist.get_world_size(), cfg.seed, device)
    return Trainer(
        model=model,
        train_dataloader=train_dataloader,
        **({"eval_dataloader": evaluators, "eval_interval": cfg.eval_interval} if evaluators else {}),
        optimizers=build_optimizer(model, cfg.optimizer, cfg.data.global_batch_size),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=cfg.scheduler.warmup, alpha_f=cfg.scheduler.alpha_f),
        algorithms=build_algorithms(cfg.algorithms, cfg.seed, tokenizer),
        max_duration=cfg.max_duration,
        device_train_microbatch_size=cfg.device_train_microbatch_size,
        parallelism_config=build_parallelism(cfg.parallelism),
        device=device.value,
        precision=precision.value,
        callbacks=callbacks(cfg),
        loggers=[
            RunRecord(run_info(cfg), cfg.checkpoint.save_interval),
            *build_loggers(cfg.loggers, cfg.run_name),
            *loggers,
        ],
        compile_config=cfg.compile_config,
        run_name=cfg.run_name,
        load_path=resume.path if resume else cfg.checkpoint.load_path,
        seed=cfg.seed,
        deterministic_mode=cfg.deterministic,
        progress_bar=cfg.progress_bar,
        console_log_interval=cfg.console_log_interval,
    )


def callbacks(cfg: TrainConfig) -> list:
    """Composer's speed and lr monitors, the config's callbacks and the run's own, the checkpoint saver."""
    run_callbacks = build_run_callbacks(
        cfg.callbacks, cfg.loss_guard, cfg.checkpoint.save_folder, cfg.max_wall_clock, cfg.max_duration
    )
    return [SpeedMonitor(window_size=20), LRMonitor(), *run_callbacks, build_checkpoint_saver(cfg.checkpoint)]


def run_info(cfg: TrainConfig) -> RunInfo:
    return RunInfo(cfg.run_name, cfg.run_dir, cfg.model.name, cfg.data.global_batch_size, cfg.checkpoint.save_folder)


def main(argv: list) -> None:
    if not argv:
        sys.exit(__doc__)
    cfg = load(TrainConfig, argv[0], argv[1:])
    try:
        # autoresume: the newest whole checkpoint this run wrote, on whatever world size runs now,
        # and the sample order the run started with (a change to it fails here, naming the key).
        resume = resume_checkpoint(cfg.checkpoint.save_folder) if cfg.checkpoint.autoresume else None
        cfg = pin_sample_order(cfg, saved_config(cfg.checkpoint.save_folder) if resume else None)
        trainer = build_trainer(cfg, resume=resume)
        if already_complete(trainer, cfg):  # a scheduler retrying a finished job
            print(
                f"Run '{cfg.run_name}' is already complete ({int(trainer.state.timestamp.batch)} batches, max_duration "
                f"{cfg.max_duration}); its checkpoints are in {cfg.checkpoint.save_folder}. Nothing to do."
            )
            trainer.close()
            return
        if dist.get_global_rank() == 0:
            write_run_config(cfg)  # the run folder and the checkpoints' folder say what the run was
        trainer.fit()
    except (BotoCoreError, ClientError, CheckpointUploadError) as err:
        print(
            f"Object storage failed: {err}\n"
            f"Nothing is lost: the `latest` pointer under {cfg.checkpoint.save_folder} names the last checkpoint "
            "that finished uploading. Run the same command again to resume once the store is reachable.",
            file=sys.stderr,
            flush=True,
        )
        # Not sys.exit: at exit Composer would wait for the uploads still in flight, which cannot land
        # either, through every retry and timeout of a store that stopped answering (minutes).
        sys.stdout.flush()
        os._exit(1)
    except CheckpointError as err:
        source = cfg.checkpoint.load_path or f"the latest checkpoint under {cfg.checkpoint.save_folder}"
        sys.exit(f"Refusing to resume from {source}: {err}")
    except ConfigError as err:  # a resume that would change the run's sample order
        sys.exit(f"ConfigError: {err}")
    except LossSpikeError as err:
        sys.exit(f"Stopped by the loss guard: {err}")
    trainer.close()


def already_complete(trainer: Trainer, cfg: TrainConfig) -> bool:
    state = trainer.state
    if cfg.max_wall_clock is not None and state.timestamp.total_wct.total_seconds() >= cfg.max_wall_clock:
        return True  # the budget is spent (pipeline.training.callbacks.WallClockBudget)
    return state.max_duration is not None and state.timestamp.get(state.max_duration.unit) >= state.max_duration


if __name__ == "__main__":  # Composer's remote uploader spawns processes
    main(sys.argv[1:])
