import glob
import os

import pytest

from data_prep.sources import SourcesConfig
from pipeline.config import ConfigError, TrainConfig, load
from tests.conftest import REPO


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"'optimizer.lrr'.*Did you mean 'optimizer.lr'\?"):
        load(TrainConfig, None, ["optimizer.lrr=0.1"])


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
    assert cfg.save_folder == "runs/x/checkpoints"
    assert cfg.data.streams["web"].proportion == 0.5


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yamls", "*.yaml"))))
def test_every_training_yaml_matches_the_schema(path):
    assert isinstance(load(TrainConfig, path), TrainConfig)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "yamls", "data", "*.yaml"))))
def test_every_sources_yaml_matches_the_schema(path):
    assert load(SourcesConfig, path).sources
