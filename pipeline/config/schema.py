"""The typed schemas: one per entry point (training, evaluation, sweeps), each section a dataclass
whose `__post_init__` checks its ranges. pipeline/config/loader.py loads YAML and overrides onto them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from pipeline.config.loader import ConfigError, check, load, to_yaml

__all__ = ["ConfigError", "check", "load", "to_yaml"]  # with the schemas: what the entry points import

# A Composer time string: a number and a unit ("2000ba", "0.05dur", "1ep", "8e9sp").
TIME = re.compile(r"^\d+(\.\d*)?(e\d+)?(ep|ba|sp|tok|dur|iter|sec)$")


def check_time(key: str, value: Optional[str]) -> None:
    check(
        value is None or bool(TIME.match(str(value))),
        f"{key}={value!r} is not a Composer time such as 2000ba, 0.05dur, 1ep, 100000sp",
    )


class LossName(Enum):
    clip = "clip"  # open_clip's ClipLoss: softmax over the global batch
    siglip = "siglip"  # open_clip's SigLipLoss: sigmoid per pair, learnt bias


class OptimizerName(Enum):
    adamw = "adamw"
    lamb = "lamb"  # timm's LAMB (FLIP, EVA-CLIP)


class Sharding(Enum):
    ddp = "ddp"  # replicate the model; DDP whenever there is more than one rank
    none = "ddp"  # an alias: no sharding
    FULL_SHARD = "FULL_SHARD"
    SHARD_GRAD_OP = "SHARD_GRAD_OP"  # ZeRO-2-like: parameters stay gathered from forward to backward
    HYBRID_SHARD = "HYBRID_SHARD"  # replicate across nodes, shard within one


class StateDictType(Enum):
    full = "full"  # one gathered file, loaded safely
    sharded = "sharded"  # torch.distributed.checkpoint: each rank writes its own shard, signed by the run


class TextMaskingMode(Enum):
    random = "random"
    padding_first = "padding_first"


class Precision(Enum):
    fp32 = "fp32"
    amp_bf16 = "amp_bf16"
    amp_fp16 = "amp_fp16"


class Device(Enum):
    cpu = "cpu"
    gpu = "gpu"


class AugmentOn(Enum):
    cpu = "cpu"  # the loader workers crop, resize, flip and normalise
    device = "device"  # the workers decode and crop; resize, flip, normalise run batched on the device


class Sampling(Enum):
    streaming = "streaming"  # streaming's own draw: each epoch's samples one by one across every shard
    shard_passes = "shard_passes"  # whole shards in seeded passes (pipeline/data/sampling.py)


class WeightsLayout(Enum):
    open_clip = "open_clip"  # an open_clip model's state dict (our exports, open_clip checkpoints)
    openai = "openai"  # OpenAI CLIP's state dict: the same key names as open_clip's built-in towers
    timm = "timm"  # a timm ViT / EVA checkpoint (EVA02 MIM weights), into open_clip's TimmModel trunk


class ClippingType(Enum):
    norm = "norm"  # scale all gradients so that their global L2 norm is at most the threshold
    value = "value"  # clamp each gradient element to [-threshold, threshold]


# ---------------------------------------------------------------------------
# Training schema
# ---------------------------------------------------------------------------


@dataclass
class StreamConfig:
    """One MDS stream (one data source). Either `local` alone, or `remote` cached into `local`."""

    local: str = MISSING
    remote: Optional[str] = None
    # Relative weight in the mix; streaming normalises proportions across streams.
    proportion: Optional[float] = None

    def __post_init__(self):
        check(
            self.proportion is None or self.proportion > 0, f"a stream's proportion must be > 0, got {self.proportion}"
        )


@dataclass
class AugmentConfig:
    """Training image augmentation; the defaults are open_clip's."""

    # RandomResizedCrop's range of the crop's area (open_clip: (0.9, 1); FLIP: (0.5, 1)).
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    hflip: bool = False  # random horizontal flip (FLIP: true)
    # A JPEG whose crop is at least twice the model's input decodes at 1/2, 1/4 or 1/8 scale in the
    # DCT domain (far less CPU for web-sized images); false decodes every image in full, as open_clip.
    jpeg_draft: bool = True
    # None: the model's own normalisation (open_clip's config for it).
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None

    def __post_init__(self):
        check(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
            f"data.augment.scale must be [low, high] with 0 < low <= high <= 1, got {self.scale}",
        )
        for name in ("mean", "std"):
            value = getattr(self, name)
            check(value is None or len(value) == 3, f"data.augment.{name} needs 3 values (RGB), got {value}")


@dataclass
class DataConfig:
    streams: dict[str, StreamConfig] = field(default_factory=dict)
    # The contrastive batch over all ranks; each rank gets global_batch_size / world_size.
    global_batch_size: int = 256
    num_workers: int = 2
    shuffle: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Which caption a sample trains on, per epoch, as a function of (seed, epoch, sample): the
    # columns to choose from and their probabilities (e.g. {caption: 0.5, recaption_a: 0.5}; a list
    # column such as COCO's `captions` gives one of its captions). A sample without a column (or
    # with it empty) chooses among the others; without any, its `caption`. Empty: `caption`, or
    # one of `captions` at random where a stream keeps several.
    captions: dict[str, float] = field(default_factory=dict)
    augment_on: AugmentOn = AugmentOn.cpu
    # With augment_on: device, JPEGs are decoded on the device too (nvjpeg on a GPU), batched.
    decode_on_device: bool = False
    # Samples per epoch across the mix; None = the streams' natural size.
    epoch_size: Optional[int] = None
    # How a (virtual) epoch draws each stream's share: shard_passes reads only the epoch's shards
    # and every sample once per pass (pipeline/data/sampling.py); streaming draws from every shard.
    sampling: Sampling = Sampling.streaming
    # streaming's sample order: the same for any number of ranks, nodes and workers as long as
    # these stay the same. None: pinned at a run's first start (num_canonical_nodes to the node
    # count then, as streaming does; shuffle_block_size to streaming's default for it) and kept in
    # its config.yaml, so a resume on other nodes reads them from there (pipeline/run/saved.py).
    num_canonical_nodes: Optional[int] = None
    # py1e keeps each sample near its shard's place in the epoch: few shards per batch at scale.
    # On a store of a few shards that lumps a stream's share of the batches in time; "naive" is a
    # uniform permutation there (bench/batch_mix.py, bench/EXPERIMENTS.md section 3).
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None
    # Shared-memory/local-cache knobs of streaming, passed through when set.
    predownload: Optional[int] = None
    cache_limit: Optional[str] = None
    # Per shard download from a remote: seconds before a stalled read fails, and attempts.
    download_timeout: float = 60.0
    download_retry: int = 2
    # Each shard's hash (written by `make shards`) is checked when a loader process first reads
    # it; a mismatch stops the run naming the shard. None skips the check.
    validate_hash: Optional[str] = "xxh64"
    # Samples that still fail to decode are replaced by the next one and counted; more than this
    # many in one loader process stops the run.
    max_bad_samples: int = 100

    def __post_init__(self):
        check(self.global_batch_size > 0, f"data.global_batch_size must be > 0, got {self.global_batch_size}")
        check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        check(self.epoch_size is None or self.epoch_size > 0, f"data.epoch_size must be > 0, got {self.epoch_size}")
        for key in ("num_canonical_nodes", "shuffle_block_size"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key} must be > 0, got {value}")
        check(self.max_bad_samples >= 0, f"data.max_bad_samples must be >= 0, got {self.max_bad_samples}")
        for column, probability in self.captions.items():
            check(probability > 0, f"data.captions.{column} must be a probability > 0, got {probability}")
        check(
            not self.decode_on_device or self.augment_on == AugmentOn.device,
            "data.decode_on_device needs data.augment_on=device (the device then finishes each batch)",
        )


@dataclass
class WeightsConfig:
    """Weights to start from (pipeline/model/weights.py): a file or open_clip export folder, local or remote."""

    path: str = MISSING
    layout: WeightsLayout = WeightsLayout.open_clip
    # fnmatch patterns of this model's keys that may stay as initialised (heads meant to be new),
    # and of arriving keys that are dropped (e.g. a MIM checkpoint's decoder head).
    allow_missing: list[str] = field(default_factory=list)
    allow_unexpected: list[str] = field(default_factory=list)


@dataclass
class LockConfig:
    """A frozen tower (open_clip's --lock-image / --lock-text); frozen parameters get no optimizer state."""

    unlocked_groups: int = 0  # the last N layer groups (image) / layers (text) still train
    freeze_norm_stats: bool = False  # image tower: also freeze BatchNorm statistics (ResNets)


@dataclass
class ModelConfig:
    # An open_clip model name (`open_clip.list_models()`), or the name given to `custom`.
    name: str = "ViT-B-16"
    # Inline open_clip model config (embed_dim, vision_cfg, text_cfg) registered under `name`.
    custom: Optional[dict[str, Any]] = None
    # Text length override (FLIP trains with 32 tokens); None keeps the model's own.
    context_length: Optional[int] = None
    # The contrastive loss (pipeline/model/loss.py): clip (softmax) or siglip (sigmoid, learnt bias).
    loss: LossName = LossName.clip
    # SigLIP's initial logit bias and log logit scale; None: SigLIP's -10 and log(10) (its paper).
    init_logit_bias: Optional[float] = None
    init_logit_scale: Optional[float] = None
    # open_clip ClipLoss options: the negatives are the whole global batch when gathering with grad.
    gather_with_grad: bool = True
    local_loss: bool = False
    # Weights to start from (the model's own init otherwise): a whole open_clip-layout model, then
    # per tower (EVA-CLIP: EVA02 MIM weights in timm's layout, OpenAI CLIP's text tower).
    pretrained: Optional[WeightsConfig] = None
    visual_init: Optional[WeightsConfig] = None
    text_init: Optional[WeightsConfig] = None
    lock_image: Optional[LockConfig] = None
    lock_text: Optional[LockConfig] = None


@dataclass
class TowerOptimConfig:
    """Per-tower overrides (EVA-CLIP trains the towers at different rates)."""

    lr: Optional[float] = None  # None: optimizer.lr
    weight_decay: Optional[float] = None  # None: optimizer.weight_decay
    # lr multiplier per block below the top of the tower (1.0 = off; EVA-CLIP: visual 0.85, text 0.75)
    layer_decay: float = 1.0

    def __post_init__(self):
        check(0 < self.layer_decay <= 1, f"layer_decay must be in (0, 1], got {self.layer_decay}")
        check(self.lr is None or self.lr >= 0, f"a tower's lr must be >= 0, got {self.lr}")


@dataclass
class LambConfig:
    """timm's LAMB options. timm clips the global grad norm at max_grad_norm (1.0) inside the step
    and skips the trust ratio for parameters without weight decay unless always_adapt; trust_clip
    caps the trust ratio at 1. DeepSpeed's FusedLamb (EVA-CLIP) clips nothing and clamps the trust
    ratio to [0.01, 10], which timm cannot express."""

    max_grad_norm: Optional[float] = 1.0  # None: no clipping inside LAMB
    trust_clip: bool = False
    always_adapt: bool = False


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    # The peak lr, or lr_per_256 (FLIP's rule: lr = lr_per_256 * global_batch_size / 256, so the
    # lr follows the batch); set one of the two, the other null.
    lr: Optional[float] = 5e-4
    lr_per_256: Optional[float] = None
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    visual: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    # The logit scale (and SigLIP bias) group: its own lr (EVA-CLIP: 5e-4); no weight decay.
    logit_scale: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    lamb: LambConfig = field(default_factory=LambConfig)

    def __post_init__(self):
        check(
            (self.lr is None) != (self.lr_per_256 is None),
            f"set exactly one of optimizer.lr and optimizer.lr_per_256 (got {self.lr} and {self.lr_per_256}); "
            "e.g. optimizer.lr=null optimizer.lr_per_256=4e-6",
        )
        check(
            (self.lr or self.lr_per_256) >= 0 and self.weight_decay >= 0, "optimizer.lr and weight_decay must be >= 0"
        )
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optimizer.betas: two in [0, 1), got {self.betas}",
        )
        check(self.eps > 0, f"optimizer.eps must be > 0, got {self.eps}")


@dataclass
class SchedulerConfig:
    # Composer time strings: "2000ba", "0.05dur", "1ep".
    warmup: str = "0.05dur"
    # Final lr as a fraction of the peak (cosine decay).
    alpha_f: float = 0.0

    def __post_init__(self):
        check_time("scheduler.warmup", self.warmup)
        check(0 <= self.alpha_f <= 1, f"scheduler.alpha_f must be in [0, 1], got {self.alpha_f}")


@dataclass
class PatchMaskingConfig:
    ratio: float = 0.5  # fraction of image patches dropped (FLIP: 0.5 or 0.75)

    def __post_init__(self):
        check(0 <= self.ratio < 1, f"algorithms.patch_masking.ratio must be in [0, 1), got {self.ratio}")


@dataclass
class UnmaskedTuningConfig:
    start: str = "0.95dur"  # Composer time: masking is off from here on
    lr: Optional[float] = None  # peak lr of the tuning phase; None keeps the schedule's

    def __post_init__(self):
        check_time("algorithms.unmasked_tuning.start", self.start)


@dataclass
class TextMaskingConfig:
    ratio: float = 0.5
    mode: TextMaskingMode = TextMaskingMode.padding_first

    def __post_init__(self):
        check(0 <= self.ratio < 1, f"algorithms.text_masking.ratio must be in [0, 1), got {self.ratio}")


@dataclass
class GradientClippingConfig:
    """Composer's GradientClipping, after the micro-batches' gradients are summed."""

    type: ClippingType = ClippingType.norm
    threshold: float = 1.0  # EVA-CLIP: norm 5.0

    def __post_init__(self):
        check(self.threshold > 0, f"algorithms.gradient_clipping.threshold must be > 0, got {self.threshold}")


@dataclass
class AlgorithmsConfig:
    """Composer algorithms; a section present (or `true`) switches one on."""

    patch_masking: Optional[PatchMaskingConfig] = None
    unmasked_tuning: Optional[UnmaskedTuningConfig] = None
    text_masking: Optional[TextMaskingConfig] = None
    flash_attention: bool = False
    grad_checkpointing: bool = False
    gradient_clipping: Optional[GradientClippingConfig] = None

    def __post_init__(self):
        check(
            self.unmasked_tuning is None or self.patch_masking is not None,
            "algorithms.unmasked_tuning needs algorithms.patch_masking",
        )


@dataclass
class ParallelismConfig:
    """Data parallelism: ddp (`none` is an alias), or one of FSDP's sharding strategies."""

    sharding: Sharding = Sharding.ddp
    fsdp_version: int = 2  # FSDP2 runs on CPU (gloo) and GPU; FSDP1 needs CUDA
    state_dict_type: StateDictType = StateDictType.full
    # HYBRID_SHARD: the ranks each replica is sharded over; None: one node's ranks.
    shard_size: Optional[int] = None

    def __post_init__(self):
        check(self.fsdp_version in (1, 2), f"parallelism.fsdp_version must be 1 or 2, got {self.fsdp_version}")
        check(
            self.shard_size is None or self.shard_size > 0, f"parallelism.shard_size must be > 0, got {self.shard_size}"
        )


class EvalTask(Enum):
    classification = "classification"
    retrieval = "retrieval"


@dataclass
class EvalDatasetConfig:
    """One eval MDS stream (`python -m data_prep.eval_sets` writes them from common layouts)."""

    type: EvalTask = MISSING
    local: str = MISSING
    remote: Optional[str] = None
    # Classification only. Each: a list, a text file (one per line: CLIP_benchmark's classnames.txt
    # and zeroshot_classification_templates.txt) or a built-in name (BUILTIN_CLASSNAMES /
    # BUILTIN_TEMPLATES in pipeline/evaluation/zeroshot.py). Templates have a "{c}" or "{}" for the class name.
    classnames: Any = None
    templates: Any = "openai_imagenet"
    # Retrieval only: the columns whose texts are the image's captions (e.g. [caption, recaption_a]),
    # each one a retrieval text. Empty: the json `captions` column, else `caption`.
    caption_columns: list[str] = field(default_factory=list)
    batch_size: int = 64

    def __post_init__(self):
        check(self.batch_size > 0, f"an eval dataset's batch_size must be > 0, got {self.batch_size}")


@dataclass
class ConsoleLoggerConfig:
    log_interval: str = "50ba"  # every metric printed this often (also with progress_bar: false)


@dataclass
class TensorboardLoggerConfig:
    log_dir: str = "${run_dir}/tensorboard"  # copied next to the checkpoints for an s3:// save_folder


@dataclass
class MlflowLoggerConfig:
    tracking_uri: str = "file:${run_dir}/mlruns"  # or any MLflow server
    experiment_name: str = "clipstream"
    # A resumed run logs into the same MLflow run (found by run_name) instead of a new one.
    resume: bool = True


@dataclass
class WandbLoggerConfig:
    project: str = "clipstream"
    entity: Optional[str] = None
    mode: str = "offline"  # offline needs no network (`wandb sync` uploads later); online, disabled
    dir: str = "${run_dir}"  # the offline run is kept in <dir>/wandb/


@dataclass
class LoggersConfig:
    """Composer loggers; a section present switches one on. The run's own record (metrics.csv,
    loss.png, summary.json) is always kept (pipeline/run/record.py)."""

    console: Optional[ConsoleLoggerConfig] = None
    tensorboard: Optional[TensorboardLoggerConfig] = None
    mlflow: Optional[MlflowLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None


class SpikeAction(Enum):
    skip = "skip"  # drop the batch's update (all ranks agree) and go on
    stop = "stop"  # stop the run naming the batch and the last good checkpoint


@dataclass
class LossGuardConfig:
    """Guards against a non-finite or spiking loss (pipeline/training/callbacks.py)."""

    window: int = 50  # batches of loss history the spike is measured against
    factor: float = 3.0  # a spike: loss > factor x the window's median (after the window is full)
    action: SpikeAction = SpikeAction.skip
    max_skips: int = 10  # more skipped batches than this in a row stops the run

    def __post_init__(self):
        check(
            self.window > 0 and self.factor > 1 and self.max_skips >= 0,
            f"loss_guard: window > 0, factor > 1, max_skips >= 0; got {self.window}, {self.factor}, {self.max_skips}",
        )


@dataclass
class CheckpointConfig:
    """Where the run saves, how often, what it keeps, and what it starts or resumes from."""

    save_folder: str = "${run_dir}/checkpoints"  # local, or s3://bucket/prefix
    save_interval: str = "1000ba"
    # The newest N checkpoints are kept, locally and in the bucket (-1: all), besides those kept for
    # good: every keep_every-th batch's (e.g. 10000) and the one `latest` names.
    keep: int = -1
    keep_every: Optional[int] = None
    # Seconds to wait for a checkpoint to appear in the bucket before stopping with an error.
    upload_timeout: int = 900
    # Resume from the newest whole checkpoint in save_folder (full or sharded), on any world size.
    autoresume: bool = False
    # Full checkpoints are loaded as tensors and plain data only; sharded ones only when this run
    # signed them (pipeline/checkpoint/saver.py). true allows any pickled object from anywhere.
    trust: bool = False
    # A checkpoint to start from (weights, optimizer and time), when there is none to resume from.
    load_path: Optional[str] = None

    def __post_init__(self):
        check_time("checkpoint.save_interval", self.save_interval)
        check(self.keep >= -1, f"checkpoint.keep must be -1 (all) or >= 0, got {self.keep}")
        check(self.upload_timeout > 0, f"checkpoint.upload_timeout must be > 0 seconds, got {self.upload_timeout}")


@dataclass
class TrainConfig:
    # Keys that moved: a YAML written before the move fails naming the new key.
    MOVED_KEYS: ClassVar[dict] = {
        "save_folder": "checkpoint.save_folder",
        "save_interval": "checkpoint.save_interval",
        "save_num_checkpoints_to_keep": "checkpoint.keep",
        "save_keep_every": "checkpoint.keep_every",
        "checkpoint_upload_timeout": "checkpoint.upload_timeout",
        "autoresume": "checkpoint.autoresume",
        "trust_checkpoints": "checkpoint.trust",
        "load_path": "checkpoint.load_path",
    }

    run_name: str = "clip"
    run_dir: str = "runs/${run_name}"
    seed: int = 17
    # Deterministic kernels (Composer's deterministic_mode): bitwise-repeatable runs, a bit slower.
    deterministic: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    max_duration: str = "1ep"
    # A training wall-clock budget in seconds (Composer's total_wct: evaluation excluded, carried
    # across resumptions). The run then ends when it is spent, max_duration (in batches) only caps
    # it, and "dur" times (the lr schedule, unmasked_tuning.start) are fractions of the budget.
    max_wall_clock: Optional[float] = None
    # Split each rank's batch into chunks of this size; the loss still sees the whole batch.
    device_train_microbatch_size: Optional[int] = None
    # Composer precision; None picks fp32 on CPU, amp_bf16 on GPU.
    precision: Optional[Precision] = None
    # Composer device; None picks gpu when available.
    device: Optional[Device] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Zero-shot eval sets (as in yamls/eval/*.yaml), run as Composer evaluators every eval_interval.
    eval_datasets: dict[str, EvalDatasetConfig] = field(default_factory=dict)
    eval_interval: str = "1000ba"
    console_log_interval: str = "50ba"
    progress_bar: bool = True
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    # Composer callbacks by name with their keyword arguments, e.g. {memory_monitor: {},
    # optimizer_monitor: {log_optimizer_metrics: true}, runtime_estimator: {}}.
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    loss_guard: Optional[LossGuardConfig] = None
    # Passed to Composer's Trainer (torch.compile), e.g. {} for the defaults or {mode: max-autotune}.
    compile_config: Optional[dict[str, Any]] = None

    def __post_init__(self):
        for key in ("max_duration", "eval_interval", "console_log_interval"):
            check_time(key, getattr(self, key))
        check(
            self.max_wall_clock is None or (self.max_wall_clock > 0 and self.max_duration.endswith("ba")),
            f"max_wall_clock (seconds, > 0; got {self.max_wall_clock}) caps the run with max_duration in batches "
            f"(got {self.max_duration}), e.g. max_duration=100000ba",
        )
        micro = self.device_train_microbatch_size
        check(micro is None or micro > 0, f"device_train_microbatch_size must be > 0, got {micro}")


# ---------------------------------------------------------------------------
# Evaluation schema
# ---------------------------------------------------------------------------


@dataclass
class EvalConfig:
    MOVED_KEYS: ClassVar[dict] = {"trust_checkpoints": "trust"}  # named as training's checkpoint.trust

    # None: the model of the run that load_path names (its saved config.yaml).
    model: Optional[ModelConfig] = None
    # A run folder (as train.py leaves it) or a Composer checkpoint, local or remote; empty: a
    # freshly initialised `model`.
    load_path: Optional[str] = None
    # Unpickle the whole checkpoint (can run code from the file) instead of tensors only.
    trust: bool = False
    seed: int = 17  # initialises the fresh model
    datasets: dict[str, EvalDatasetConfig] = field(default_factory=dict)
    num_workers: int = 2
    output: str = "zeroshot.json"
    # FLIP's masked inference: drop this fraction of image patches at eval too, through the same
    # patch-dropout module training installs (seeded by `seed`); None: full images.
    patch_masking: Optional[float] = None

    def __post_init__(self):
        check(
            self.patch_masking is None or 0 <= self.patch_masking < 1,
            f"patch_masking must be in [0, 1), got {self.patch_masking}",
        )


# ---------------------------------------------------------------------------
# Sweep schema
# ---------------------------------------------------------------------------


@dataclass
class SweepBudget:
    """Each run trains on the same samples, or the same training FLOPs: its max_duration is the
    budget over one of its global batches (rounded to a batch), with no wall-clock cap. A run that
    sets its own max_duration keeps it. Throughput is then measured, not the budget."""

    samples: Optional[int] = None
    flops: Optional[float] = None

    def __post_init__(self):
        check((self.samples is None) != (self.flops is None), "budget: set exactly one of samples and flops")
        check((self.samples or self.flops) > 0, "budget: the samples or flops must be > 0")


@dataclass
class SweepConfig:
    """Runs of one training recipe (pipeline/sweep.py): common overrides, then each run's own."""

    name: str = MISSING
    train: str = MISSING  # the training YAML every run starts from
    # Each run's run_dir is <folder>/<run name>.
    folder: str = "runs/sweeps/${name}"
    # Checkpoints under <save_folder>/<run name> (local or s3://); None: in each run's run_dir.
    save_folder: Optional[str] = None
    # Training keys (dotted or nested) for every run, e.g. {max_wall_clock: 120, data.num_workers: 1}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # One run per point of the cartesian product of these {key: [values]} (a value that is a
    # mapping is a group of keys set together, named in run names by its `name`) ...
    grid: dict[str, list[Any]] = field(default_factory=dict)
    # ... and/or one run per entry: its own keys, and optionally `name` (else named by its keys).
    runs: list[dict[str, Any]] = field(default_factory=list)
    # Equal samples seen or equal training FLOPs for every run (None: each run's max_duration / max_wall_clock).
    budget: Optional[SweepBudget] = None
    # Every run once per seed (the training key `seed`), each seed's runs in <folder>/seed<N>/, where
    # ${folder} in a run's keys (a parent run's weights) names the same seed's run. Empty: each run once.
    seeds: list[int] = field(default_factory=list)
    # Short names of keys in run names, e.g. {algorithms.patch_masking.ratio: masking}; else the last part.
    labels: dict[str, str] = field(default_factory=dict)
    # How --print launches each run on a cluster.
    launcher: str = "composer -n 8"
    # The scores `--report` shows and plots, as <dataset>/<score>; empty: all.
    metrics: list[str] = field(default_factory=list)
