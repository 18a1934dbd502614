import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from composer.loggers import InMemoryLogger

from pipeline.algorithms.flash_attention import FlashAttention, SDPAMultiheadAttention, swap_attention
from pipeline.algorithms.grad_checkpointing import GradCheckpointing
from pipeline.algorithms.patch_masking import PatchMasking
from pipeline.algorithms.text_masking import TextMasking, install_text_masking
from pipeline.algorithms.unmasked_tuning import UnmaskedTuning
from pipeline.config.schema import TextMaskingMode
from pipeline.model.clip import MAX_LOGIT_SCALE, encode
from pipeline.model.towers import install_patch_dropout
from tests.tiny import NUM_PATCHES, TOKENIZER, GradCapture, RecordInput, make_trainer, synthetic_dataset, tiny_model


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_patch_masking_drops_tokens_in_training_only(ratio):
    model = tiny_model()
    tokens = RecordInput(model.clip.visual.transformer)
    make_trainer(model, algorithms=[PatchMasking(ratio)]).fit()
    kept = 1 + int(NUM_PATCHES * (1 - ratio))  # class token + kept patches
    assert tokens.inputs == [(16, kept, 64)] * 2
    model.eval()
    images, _, _ = synthetic_dataset()[:4]
    model.clip.encode_image(images)
    assert tokens.inputs[-1] == (4, 1 + NUM_PATCHES, 64)


def test_patch_masks_belong_to_the_sample_not_to_rng_history_or_batch_position():
    """A sample is masked the same way after a resume, on another rank or in another micro-batch:
    the noise is a function of (seed, sample id) only."""
    model = tiny_model().train()
    install_patch_dropout(model.clip, 0.5, seed=3)
    tokens = RecordInput(model.clip.visual.transformer, keep_values=True)
    images, texts, ids = synthetic_dataset()[:8]
    encode(model.clip, images, texts, ids)
    torch.rand(1000)  # e.g. a restart, or anything else drawing random numbers
    order = torch.tensor([5, 2, 7, 0])  # the same samples, elsewhere in a smaller batch
    encode(model.clip, images[order], texts[order], ids[order])
    torch.testing.assert_close(tokens.inputs[1], tokens.inputs[0][order], rtol=0, atol=0)
    encode(model.clip, images[order], texts[order], ids[order] + 64)  # the same images in the next epoch
    assert not torch.equal(tokens.inputs[2], tokens.inputs[1])
    install_patch_dropout(model.clip, 0.5, seed=4)  # another run seed
    encode(model.clip, images[order], texts[order], ids[order])
    assert not torch.equal(tokens.inputs[3], tokens.inputs[1])


def test_unmasked_tuning_switches_masking_off_and_sets_lr():
    model = tiny_model()
    tokens = RecordInput(model.clip.visual.transformer)
    log = InMemoryLogger()
    lrs = GradCapture()
    trainer = make_trainer(
        model,
        max_duration="4ba",
        loggers=[log],
        callbacks=[lrs],
        algorithms=[PatchMasking(0.5), UnmaskedTuning(start="3ba", lr=0.01)],
    )
    trainer.fit()
    assert [shape[1] for shape in tokens.inputs] == [1 + NUM_PATCHES // 2] * 3 + [1 + NUM_PATCHES]
    assert [v for _, v in log.data["unmasked_tuning/active"]] == [0, 0, 0, 1]
    assert trainer.state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_text_masking_padding_first_keeps_real_tokens_and_pooling_position():
    model = tiny_model().train()
    hooks = install_text_masking(model.clip, 0.5, TextMaskingMode.padding_first, TOKENIZER, seed=0)
    texts = open_clip.tokenize(["a red cat", "a blue dog", "one big green shoe", "bag"], context_length=16)
    seen = RecordInput(model.clip.transformer)
    encode(model.clip, None, texts, torch.arange(4))
    assert seen.inputs[-1] == (4, 8, 64)  # 16 tokens, half dropped before the transformer
    lengths = texts.argmax(dim=-1) + 1  # through the end-of-text token
    for row, length in zip(hooks.keep, lengths):
        assert set(range(int(length))) <= set(row.tolist())  # captions are < 8 tokens: nothing real dropped
    model.eval()
    model.clip.encode_text(texts)
    assert seen.inputs[-1] == (4, 16, 64)


def test_text_masking_random_always_keeps_end_of_text():
    model = tiny_model().train()
    hooks = install_text_masking(model.clip, 0.75, TextMaskingMode.random, TOKENIZER, seed=0)
    _, texts, ids = synthetic_dataset()[:16]
    encode(model.clip, None, texts, ids)
    assert hooks.keep.shape == (16, 4)
    eot = texts.argmax(dim=-1)
    assert all(int(e) in row.tolist() for e, row in zip(eot, hooks.keep))
    assert not all(set(range(4)) == set(row.tolist()) for row in hooks.keep)  # not simply a prefix
    first = hooks.keep.clone()
    encode(model.clip, None, texts.flip(0), ids.flip(0))  # each caption keeps its own tokens wherever it is
    assert torch.equal(hooks.keep, first.flip(0))


def test_text_masking_from_the_trainer():
    model = tiny_model()
    trainer = make_trainer(model, algorithms=[TextMasking(0.5, TextMaskingMode.random, TOKENIZER, seed=0)])
    seen = RecordInput(model.clip.transformer)  # after the masking hook, which INIT installed
    trainer.fit()
    assert seen.inputs == [(16, 8, 64)] * 2


def test_flash_attention_swap_is_exact_and_uses_is_causal(monkeypatch):
    reference, model = tiny_model(), tiny_model()
    keys = set(model.state_dict())
    make_trainer(model, algorithms=[FlashAttention()])  # INIT does the swap
    assert set(model.state_dict()) == keys
    swapped = [m for m in model.modules() if isinstance(m, SDPAMultiheadAttention)]
    assert len(swapped) == 4 and sum(m.causal for m in swapped) == 2
    images, texts, _ = synthetic_dataset()[:8]
    expected = [reference.clip.encode_image(images), reference.clip.encode_text(texts)]
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or sdpa(*a, **k))
    actual = [model.clip.encode_image(images), model.clip.encode_text(texts)]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert [c.get("is_causal", False) for c in calls] == [False, False, True, True]
    assert all(c.get("attn_mask") is None for c in calls)  # no explicit mask: flash-eligible


def test_flash_attention_refuses_a_model_it_cannot_change():
    model = tiny_model()
    swap_attention(model.clip)
    with pytest.raises(ValueError, match="no nn.MultiheadAttention"):
        make_trainer(model, algorithms=[FlashAttention()])


def test_grad_checkpointing_recomputes_blocks_with_equal_gradients():
    grads, block_calls = [], []
    for algorithms in ([], [GradCheckpointing()]):
        model = tiny_model()
        calls = RecordInput(model.clip.visual.transformer.resblocks[0])
        capture = GradCapture()
        make_trainer(model, algorithms=algorithms, callbacks=[capture], max_duration="1ba").fit()
        grads.append(capture.grads[0])
        block_calls.append(len(calls.inputs))
    assert block_calls == [1, 2]  # the block ran again during backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_keeps_loss_and_logit_scale_in_fp32():
    model = tiny_model().train()
    batch = synthetic_dataset()[:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch)
        loss = model.loss(outputs, batch)
    assert outputs.image.dtype == torch.bfloat16  # autocast really ran the towers in bf16
    assert outputs.logit_scale.dtype == torch.float32 and loss.dtype == torch.float32
    assert model.clip.logit_scale.dtype == torch.float32


def test_logit_scale_is_clamped_at_100():
    model = tiny_model()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(1000.0))
    assert float(model(synthetic_dataset()[:4]).logit_scale) == pytest.approx(MAX_LOGIT_SCALE) == 100.0


def test_flops_per_batch_counts_only_kept_patches():
    model = tiny_model().train()
    batch = synthetic_dataset()[:8]
    unmasked = model.flops_per_batch(batch)
    make_trainer(model, algorithms=[PatchMasking(0.75)])
    masked = model.flops_per_batch(batch)
    assert masked < unmasked
    model.eval()  # evaluation sees every patch
    assert model.flops_per_batch(batch) == unmasked
