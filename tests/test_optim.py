import pytest
import torch
from timm.optim import Lamb

from pipeline.config.schema import ConfigError, OptimizerConfig, OptimizerName, TowerOptimConfig, TrainConfig, load
from pipeline.training.optim import build_optimizer, param_groups
from tests.tiny import tiny_model


def group_of(groups: list, param: torch.nn.Parameter) -> dict:
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_every_trainable_parameter_in_exactly_one_group():
    model = tiny_model()
    groups = param_groups(model, OptimizerConfig())
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})


def test_no_weight_decay_on_biases_norms_embeddings_logit_scale():
    model = tiny_model()
    groups = param_groups(model, OptimizerConfig(weight_decay=0.2))
    clip = model.clip
    no_decay = [
        clip.logit_scale,
        clip.token_embedding.weight,
        clip.positional_embedding,
        clip.visual.class_embedding,
        clip.visual.positional_embedding,
        clip.ln_final.weight,
        clip.transformer.resblocks[0].attn.in_proj_bias,
    ]
    for param in no_decay:
        assert group_of(groups, param)["weight_decay"] == 0.0
    for param in (clip.transformer.resblocks[0].attn.in_proj_weight, clip.visual.conv1.weight, clip.text_projection):
        assert group_of(groups, param)["weight_decay"] == 0.2


def test_per_tower_lr_and_layer_decay():
    cfg = OptimizerConfig(
        lr=1e-3,
        visual=TowerOptimConfig(lr=2e-4, layer_decay=0.5),
        text=TowerOptimConfig(lr=2e-5, weight_decay=0.05, layer_decay=0.75),
    )
    model = tiny_model()
    groups = param_groups(model, cfg)
    clip = model.clip
    # 2 blocks per tower: embeddings depth 0, blocks 1-2, head 3.
    assert group_of(groups, clip.visual.proj)["lr"] == pytest.approx(2e-4)
    assert group_of(groups, clip.visual.transformer.resblocks[1].mlp.c_fc.weight)["lr"] == pytest.approx(2e-4 * 0.5)
    assert group_of(groups, clip.visual.transformer.resblocks[0].mlp.c_fc.weight)["lr"] == pytest.approx(2e-4 * 0.25)
    assert group_of(groups, clip.visual.conv1.weight)["lr"] == pytest.approx(2e-4 * 0.125)
    assert group_of(groups, clip.token_embedding.weight)["lr"] == pytest.approx(2e-5 * 0.75**3)
    assert group_of(groups, clip.transformer.resblocks[0].mlp.c_fc.weight)["weight_decay"] == 0.05
    assert group_of(groups, clip.logit_scale)["lr"] == pytest.approx(1e-3)


def test_lamb_is_timms_and_unknown_optimizer_fails():
    model = tiny_model()
    assert isinstance(build_optimizer(model, OptimizerConfig(name=OptimizerName.lamb)), Lamb)
    with pytest.raises(ConfigError, match=r"expected one of \[adamw, lamb\]"):
        load(TrainConfig, None, ["optimizer.name=sgdd"])
