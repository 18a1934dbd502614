"""Weights in (model.pretrained, visual_init, text_init), locked towers, gradient clipping, augmentation."""

import os
import subprocess

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.config.schema import (
    AugmentConfig,
    ConfigError,
    EvalConfig,
    LockConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    WeightsConfig,
    WeightsLayout,
    load,
)
from pipeline.data.augment import build_augment
from pipeline.evaluation.evaluate import evaluate, evaluate_dataset
from pipeline.evaluation.evaluators import build_scores
from pipeline.model.clip import build_clip, lock_towers
from pipeline.model.export import export
from pipeline.model.weights import load_initial_weights
from pipeline.training.optim import build_optimizer, param_groups
from tests.conftest import DEMO_YAML, REPO, run_check_script, train_here, train_overrides
from tests.tiny import TINY, clipping_norms, make_trainer, tiny_model

EVA_TINY = ModelConfig(
    name="tiny-eva",
    custom={
        "embed_dim": 32,
        "vision_cfg": {
            "timm_model_name": "eva02_tiny_patch14_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
)


def init(path, layout=WeightsLayout.open_clip, **kwargs) -> WeightsConfig:
    return WeightsConfig(path=str(path), layout=layout, **kwargs)


def state(clip, prefix: str) -> dict:
    return {k: v.clone() for k, v in clip.state_dict().items() if k.startswith(prefix)}


def test_a_tower_from_an_open_clip_export_arrives_unchanged_and_the_other_stays(tmp_path):
    source = tiny_model(seed=1).clip
    export(source, TINY, str(tmp_path / "other"))  # open_clip's hub layout
    target = tiny_model(seed=2).clip
    own_text = {k: v for k, v in state(target, "").items() if not k.startswith("visual.")}
    load_initial_weights(target, ModelConfig(name=TINY.name, custom=TINY.custom, visual_init=init(tmp_path / "other")))
    for key, value in state(source, "visual.").items():
        assert torch.equal(target.state_dict()[key], value), key
    for key, value in own_text.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_eva02_mim_weights_in_timms_layout_go_into_the_trunk_with_resampled_positions(tmp_path):
    mim = timm.create_model("eva02_tiny_patch14_224", img_size=112)  # an 8x8 grid; the model has 16x16
    save_file({k: v.contiguous() for k, v in mim.state_dict().items()}, tmp_path / "model.safetensors")
    clip = build_clip(EVA_TINY)[0]
    weights = init(tmp_path / "model.safetensors", WeightsLayout.timm)
    with pytest.raises(ConfigError, match=r"missing \['visual.head.proj.weight'\]"):  # the CLIP projection is new
        load_initial_weights(clip, ModelConfig(name=EVA_TINY.name, custom=EVA_TINY.custom, visual_init=weights))
    weights.allow_missing = ["visual.head.*"]
    load_initial_weights(clip, ModelConfig(name=EVA_TINY.name, custom=EVA_TINY.custom, visual_init=weights))
    trunk = clip.visual.trunk.state_dict()
    for key, value in mim.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(trunk[key], value), key
    assert trunk["pos_embed"].shape == (1, 1 + 16 * 16, 192)
    assert torch.equal(trunk["pos_embed"][:, 0], mim.state_dict()["pos_embed"][:, 0])  # class token's kept


def test_openai_layout_text_tower_with_a_longer_context(tmp_path):
    long_text = ModelConfig(
        name="tiny-77", custom={**TINY.custom, "text_cfg": {**TINY.custom["text_cfg"], "context_length": 77}}
    )
    source = tiny_model(seed=3, cfg=long_text).clip
    torch.save(
        {k: v for k, v in source.state_dict().items() if not k.startswith("visual.")}, tmp_path / "openai_text.pt"
    )
    target = tiny_model(seed=4).clip
    load_initial_weights(
        target,
        ModelConfig(
            name=TINY.name, custom=TINY.custom, text_init=init(tmp_path / "openai_text.pt", WeightsLayout.openai)
        ),
    )
    for key, value in source.state_dict().items():
        if not key.startswith("visual.") and key not in ("positional_embedding", "logit_scale"):
            assert torch.equal(target.state_dict()[key], value), key
    assert target.positional_embedding.shape == (16, 64)  # resampled from 77 positions


def test_a_mismatched_key_or_shape_fails_naming_it(tmp_path):
    weights = {k: v for k, v in tiny_model(seed=1).clip.state_dict().items() if k.startswith("visual.")}
    weights["visual.extra.weight"] = torch.zeros(2)
    del weights["visual.proj"]
    save_file(weights, tmp_path / "odd.safetensors")
    model = ModelConfig(name=TINY.name, custom=TINY.custom, visual_init=init(tmp_path / "odd.safetensors"))
    with pytest.raises(ConfigError, match=r"missing \['visual.proj'\], unexpected \['visual.extra.weight'\]"):
        load_initial_weights(tiny_model().clip, model)
    del weights["visual.extra.weight"]
    weights["visual.proj"] = torch.zeros(64, 7)
    save_file(weights, tmp_path / "odd.safetensors")
    with pytest.raises(ConfigError, match=r"'visual.proj' has shape \(64, 7\), this model's has \(64, 32\)"):
        load_initial_weights(tiny_model().clip, model)
    torch.save({"payload": subprocess.Popen}, tmp_path / "code.pt")  # pickled code is refused, not run
    with pytest.raises(ConfigError, match="holds more than tensors"):
        load_initial_weights(
            tiny_model().clip, ModelConfig(name=TINY.name, custom=TINY.custom, pretrained=init(tmp_path / "code.pt"))
        )


def test_a_composer_checkpoint_as_pretrained_scores_as_the_checkpoint_itself(sample_build, tmp_path):
    from tests.conftest import eval_overrides

    cfg, _ = sample_build
    run_dir = tmp_path / "run"
    train_here(
        train_overrides(
            cfg,
            run_dir,
            "data.global_batch_size=32",
            "max_duration=3ba",
            "checkpoint.save_interval=3ba",
            "scheduler.warmup=0ba",
        )
    )
    eval_cfg = load(
        EvalConfig, os.path.join(REPO, "yamls", "eval", "zeroshot.yaml"), [*eval_overrides(cfg), f"load_path={run_dir}"]
    )
    direct = evaluate(eval_cfg)["datasets"]["fashion_mnist"]
    checkpoint = str(run_dir / "checkpoints" / "latest-rank0.pt")
    model = load(TrainConfig, DEMO_YAML, [f"model.pretrained.path={checkpoint}"]).model
    clip, _, transform, tokenizer = build_clip(model)
    load_initial_weights(clip, model)
    dataset = eval_cfg.datasets["fashion_mnist"]
    scores = evaluate_dataset(
        clip.eval(), dataset, build_scores(dataset, tokenizer), transform, tokenizer, num_workers=0
    )
    assert scores == direct


def test_locked_towers_stay_unchanged_and_get_no_optimizer_state():
    model = tiny_model()
    cfg = ModelConfig(
        name=TINY.name, custom=TINY.custom, lock_image=LockConfig(), lock_text=LockConfig(unlocked_groups=2)
    )
    lock_towers(model.clip, cfg)
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2))
    trainer = make_trainer(model, max_duration="2ba", optimizers=optimizer)
    trainer.fit()
    after = model.clip.state_dict()
    trained = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("visual.") for k in trained)
    assert any(k.startswith("transformer.resblocks.1.") for k in trained)  # the unlocked last text layer
    assert not any(k.startswith("transformer.resblocks.0.") or k.startswith("token_embedding") for k in trained)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p not in optimizer.state for p in frozen)
    assert sum(len(g["params"]) for g in param_groups(model, OptimizerConfig())) == len(list(model.parameters())) - len(
        frozen
    )


def test_gradient_clipping_bounds_the_summed_micro_batch_gradients():
    norms = clipping_norms(batch_size=32, device_train_microbatch_size=8)
    assert norms["raw"] > 0.5
    assert norms["clipped"] == pytest.approx(0.05, rel=1e-4)


CLIPPED_PARALLELISMS = ["ddp", "FULL_SHARD"]


@pytest.fixture(scope="module")
def two_rank_norms(tmp_path_factory) -> dict:
    """{parallelism: clipping norms}, both from one 2-rank launch."""
    return run_check_script("clipping_check.py", 2, tmp_path_factory.mktemp("clip") / "n.pt", *CLIPPED_PARALLELISMS)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", CLIPPED_PARALLELISMS)
def test_gradient_clipping_on_two_ranks(two_rank_norms, parallelism):
    norms = two_rank_norms[parallelism]
    assert norms["raw"] > 0.5 and norms["clipped"] == pytest.approx(0.05, rel=1e-4)


def test_augmentation_defaults_to_open_clips_size_normalisation_and_crop_scale():
    import open_clip

    clip = tiny_model().clip
    open_clips = open_clip.create_model_and_transforms(TINY.name)[1].transforms
    ours = build_augment(clip, AugmentConfig())
    crop, normalize = open_clips[0], open_clips[-1]
    assert (ours.size, ours.size) == tuple(crop.size) and ours.scale == crop.scale
    assert ours.mean == tuple(normalize.mean) and ours.std == tuple(normalize.std) and not ours.hflip
    flip = build_augment(clip, AugmentConfig(scale=[1.0, 1.0], hflip=True, mean=[0.5] * 3, std=[0.25] * 3))
    assert (flip.scale, flip.hflip, flip.mean, flip.std) == ((1.0, 1.0), True, (0.5,) * 3, (0.25,) * 3)


def phase_overrides(cfg, run_dir, checkpoint, *extra) -> list:
    """FLIP's unmasked tuning as its own run on the demo recipe: from a checkpoint's weights, unmasked."""
    return train_overrides(
        cfg,
        run_dir,
        f"model.pretrained.path={checkpoint}",
        "algorithms.patch_masking=null",
        "data.global_batch_size=16",
        "max_duration=6ba",
        "scheduler.warmup=2ba",
        "checkpoint.save_interval=2ba",
        "optimizer.lr=1e-3",
        *extra,
    )


@pytest.fixture(scope="module")
def masked_run(sample_build, tmp_path_factory):
    """4 masked batches of the demo recipe; its final checkpoint starts the tuning phase."""
    cfg, _ = sample_build
    run_dir = tmp_path_factory.mktemp("masked")
    train_here(
        train_overrides(
            cfg,
            run_dir,
            "algorithms.patch_masking.ratio=0.5",
            "max_duration=4ba",
            "data.global_batch_size=16",
            "checkpoint.save_interval=4ba",
        )
    )
    return str(run_dir / "checkpoints" / "ep0-ba4-rank0.pt")


def test_unmasked_tuning_phase_starts_fresh_from_the_weights_with_its_own_schedule(sample_build, masked_run, tmp_path):
    import math

    from composer.loggers import InMemoryLogger

    from pipeline.checkpoint.loading import read_checkpoint
    from pipeline.train import build_trainer

    cfg, _ = sample_build
    phase = load(TrainConfig, DEMO_YAML, phase_overrides(cfg, tmp_path / "phase", masked_run))
    log = InMemoryLogger()
    trainer = build_trainer(phase, loggers=[log])
    masked = read_checkpoint(masked_run)["state"]["model"]
    for key, value in trainer.state.model.state_dict().items():
        assert torch.equal(value, masked[key]), key  # the masked run's weights...
    assert all(not state for state in trainer.state.optimizers[0].state.values())  # ...and no Adam moments
    trainer.fit()
    lrs = [float(v) for _, v in log.data["lr-AdamW/group0"]]
    warmup, total = 2, 6
    expected = [
        t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        for t in range(total)
    ]
    base = trainer.state.optimizers[0].param_groups[0]["initial_lr"]
    assert lrs == pytest.approx([base * f for f in expected], rel=1e-6)


@pytest.mark.slow
def test_kill_inside_the_tuning_phase_resumes_bitwise(sample_build, masked_run, tmp_path):
    import signal
    import sys
    import time

    from pipeline.checkpoint.loading import read_checkpoint
    from tests.conftest import PYTHON, assert_bitwise_equal, run_train

    cfg, _ = sample_build
    final = {}
    for name in ("whole", "killed"):
        overrides = phase_overrides(
            cfg, tmp_path / name, masked_run, "checkpoint.autoresume=true", "deterministic=true"
        )
        if name == "killed":
            command = [sys.executable, os.path.join(REPO, "pipeline", "train.py"), DEMO_YAML, *overrides]
            proc = subprocess.Popen(
                command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            checkpoint = tmp_path / name / "checkpoints" / "ep0-ba2-rank0.pt"
            deadline = time.time() + 300
            while not (checkpoint.exists() and (tmp_path / name / "checkpoints" / "latest-rank0.pt").exists()):
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            run_train(PYTHON, overrides)  # the same command again
        else:
            train_here(overrides)
        final[name] = read_checkpoint(str(tmp_path / name / "checkpoints" / "ep0-ba6-rank0.pt"))["state"]["model"]
    assert_bitwise_equal(final["killed"], final["whole"])
