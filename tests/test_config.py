import glob
import os

import pytest

from data_prep.sources import SourcesConfig
from pipeline.config.schema import ConfigError, EvalConfig, TrainConfig, load
from tests.conftest import REPO


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"'optimizer.lrr'.*Did you mean 'optimizer.lr'\?"):
        load(TrainConfig, None, ["optimizer.lrr=0.1"])


def test_a_key_that_moved_into_the_checkpoint_section_names_its_new_place(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'save_folder' \(from command line\)\. Did you mean 'checkpoint.save_folder'\?"
    ):
        load(TrainConfig, None, ["save_folder=s3://bucket/run"])
    old = tmp_path / "old.yaml"
    old.write_text("save_num_checkpoints_to_keep: 3\n")
    with pytest.raises(
        ConfigError, match=rf"'save_num_checkpoints_to_keep' \(from {old}\)\. Did you mean 'checkpoint.keep'\?"
    ):
        load(TrainConfig, str(old))
    with pytest.raises(
        ConfigError, match=r"Did you mean 'checkpoint.keep_every'\?.*Valid keys at 'checkpoint': autoresume"
    ):
        load(TrainConfig, None, ["checkpoint.keep_evry=4"])
    with pytest.raises(ConfigError, match=r"'trust_checkpoints' \(from command line\)\. Did you mean 'trust'\?"):
        load(EvalConfig, None, ["trust_checkpoints=true"])  # eval's key, named as training's checkpoint.trust


def test_unknown_key_inside_a_named_stream():
    with pytest.raises(ConfigError, match=r"Did you mean 'data.streams.web.proportion'\?.*local, proportion, remote"):
        load(TrainConfig, None, ["data.streams.web.local=x", "data.streams.web.proportoin=0.5"])


def test_typo_in_yaml_file_fails_with_file_name(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_duraton: 10ba\n")
    with pytest.raises(ConfigError, match=r"from .*bad.yaml.*Did you mean 'max_duration'"):
        load(TrainConfig, str(path))


def test_wrong_type_and_malformed_override_are_rejected():
    with pytest.raises(ConfigError, match="seed"):
        load(TrainConfig, None, ["seed=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load(TrainConfig, None, ["seed"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="Missing required config keys: data.streams.web.local"):
        load(TrainConfig, None, ["data.streams.web.proportion=1"])


def test_overrides_win_and_interpolations_resolve():
    cfg = load(TrainConfig, os.path.join(REPO, "yamls", "demo_cpu.yaml"), ["run_name=x", "optimizer.lr=0.5"])
    assert cfg.optimizer.lr == 0.5
    assert cfg.checkpoint.save_folder == "runs/x/checkpoints"
    assert cfg.data.streams["web"].proportion == 0.5


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yamls", "*.yaml"))))
def test_every_training_yaml_matches_the_schema(path):
    assert isinstance(load(TrainConfig, path), TrainConfig)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yamls", "data", "*.yaml"))))
def test_every_sources_yaml_matches_the_schema(path):
    assert load(SourcesConfig, path).sources


BAD_CHOICES = [
    ("optimizer.name=sgd", r"expected one of \[adamw, lamb\]"),
    ("parallelism.sharding=FULLSHARD", r"expected one of \[ddp, none, FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD\]"),
    ("parallelism.state_dict_type=dcp", r"expected one of \[full, sharded\]"),
    ("algorithms.text_masking.mode=prefix", r"expected one of \[random, padding_first\]"),
    ("precision=fp8", r"expected one of \[fp32, amp_bf16, amp_fp16\]"),
    ("device=tpu", r"expected one of \[cpu, gpu\]"),
    ("model.loss=sigmoid", r"expected one of \[clip, siglip\]"),
    ("data.global_batch_size=0", r"data.global_batch_size must be > 0"),
    ("algorithms.patch_masking.ratio=1.0", r"patch_masking.ratio must be in \[0, 1\)"),
    ("data.streams.web.proportion=-1", r"proportion must be > 0"),
    ("max_duration=10batches", r"max_duration='10batches' is not a Composer time"),
    ("optimizer.visual.layer_decay=1.5", r"layer_decay must be in \(0, 1\]"),
    ("algorithms.unmasked_tuning.start=0.9dur", r"unmasked_tuning needs algorithms.patch_masking"),
]


@pytest.mark.parametrize("override, message", BAD_CHOICES)
def test_bad_choices_and_ranges_fail_before_the_model_is_built(monkeypatch, override, message):
    import pipeline.train

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(pipeline.train, "build_clip", never)
    monkeypatch.setattr(pipeline.train, "build_trainer", never)
    with pytest.raises(ConfigError, match=message):
        pipeline.train.main([os.path.join(REPO, "yamls", "demo_cpu.yaml"), override])


def test_sharding_none_is_an_alias_of_ddp():
    from pipeline.config.schema import Sharding

    assert load(TrainConfig, None, ["parallelism.sharding=none"]).parallelism.sharding is Sharding.ddp


def test_a_recipe_extends_its_base_and_overrides_keys():
    b16 = load(TrainConfig, os.path.join(REPO, "yamls", "flip_b16.yaml"))
    l14 = load(TrainConfig, os.path.join(REPO, "yamls", "flip_l14.yaml"))
    assert (l14.model.name, l14.run_name, l14.checkpoint.save_folder) == (
        "ViT-L-14",
        "flip-l14",
        "s3://my-bucket/runs/flip-l14",
    )
    b16.model.name, b16.run_name, b16.checkpoint.save_folder, b16.run_dir = (
        "ViT-L-14",
        "flip-l14",
        l14.checkpoint.save_folder,
        l14.run_dir,
    )
    assert l14 == b16  # everything else comes from the base


def test_base_cycles_missing_files_and_typos_in_a_base_fail_clearly(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load(TrainConfig, str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml does not exist \(the base of .*c.yaml\)"):
        load(TrainConfig, str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("optimizer: {lrr: 1}\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"from .*d.yaml.*Did you mean 'optimizer.lr'"):
        load(TrainConfig, str(tmp_path / "e.yaml"))
