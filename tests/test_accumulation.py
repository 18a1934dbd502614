"""Exact gradient accumulation: 4 micro-batches give the full batch's loss and gradients."""

import pytest
import torch
from composer.loggers import InMemoryLogger

from pipeline.algorithms.contrastive_accumulation import FeatureCache
from pipeline.algorithms.patch_masking import PatchMasking
from tests.accumulation_check import accumulate
from tests.conftest import run_check_script
from tests.tiny import TINY, TINY_SIGLIP, GradCapture, make_trainer, tiny_model


def one_batch(microbatch, model_cfg=TINY, **kwargs):
    capture, log = GradCapture(), InMemoryLogger()
    make_trainer(
        tiny_model(cfg=model_cfg),
        batch_size=32,
        device_train_microbatch_size=microbatch,
        callbacks=[capture],
        loggers=[log],
        max_duration="1ba",
        **kwargs,
    ).fit()
    return float(log.data["loss/train/total"][0][1]), capture.grads[0]


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys() and len(expected) > 20
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_cfg", [TINY, TINY_SIGLIP], ids=["clip", "siglip"])
def test_four_chunks_equal_one_full_batch(model_cfg):
    full_loss, full_grads = one_batch(None, model_cfg)
    chunked_loss, chunked_grads = one_batch(8, model_cfg)
    assert chunked_loss == pytest.approx(full_loss, rel=1e-6)
    assert_same_gradients(chunked_grads, full_grads)


def test_plain_microbatching_would_shrink_the_negatives():
    """The control: Composer's own accumulation computes a per-chunk loss, which differs."""
    full_loss, _ = one_batch(None)
    plain_loss, _ = one_batch(8, exact_accumulation=False)
    assert abs(plain_loss - full_loss) > 0.5  # log(8) negatives instead of log(32)


def test_recomputed_chunks_replay_the_masks(monkeypatch):
    differences = []
    splice = FeatureCache.splice

    def checked_splice(self, chunk, live):
        differences.append(float((live.image - self.features[chunk][0]).abs().max()))
        return splice(self, chunk, live)

    monkeypatch.setattr(FeatureCache, "splice", checked_splice)
    one_batch(8, algorithms=[PatchMasking(0.5)])
    assert len(differences) == 4 and max(differences) < 1e-6


LOSSES = ["clip", "siglip"]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> dict:
    """{ranks: {loss: accumulation_check's runs}}: one rank in this process, two in one launch."""
    two = run_check_script("accumulation_check.py", 2, tmp_path_factory.mktemp("accumulation") / "n2.pt", *LOSSES)
    return {1: {loss: accumulate(loss) for loss in LOSSES}, 2: two}


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_exact_accumulation_on_two_ranks(accumulated, loss):
    results = {n: accumulated[n][loss] for n in (1, 2)}
    two = results[2]
    assert two["chunked"]["loss"] == pytest.approx(two["full"]["loss"], rel=1e-6)
    assert_same_gradients(two["chunked"]["grads"], two["full"]["grads"])
    # The 2-rank loss sees all 32 samples as negatives, as one rank with the whole batch does.
    assert two["full"]["loss"] == pytest.approx(results[1]["full"]["loss"], rel=1e-5)
    assert_same_gradients(two["full"]["grads"], results[1]["full"]["grads"])
