"""Exact gradient accumulation for the contrastive loss (GradCache / open_clip --accum-freq).

Composer's `device_train_microbatch_size` hands the model one micro-batch at a time, which
would shrink the negatives to one micro-batch. Instead, before the micro-batches run, this
encodes every chunk without grad (remembering the RNG state of each, so masking repeats) and
caches the features. Each micro-batch then recomputes its own chunk with grad and the loss is
taken over the whole batch: cached features everywhere else, live ones for this chunk.
Summed over chunks that is exactly the full-batch gradient. Always on; a no-op when the
batch is not split.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger

from pipeline.algorithms.unwrap import composer_model_of
from pipeline.model.clip import encode
from pipeline.model.loss import Features


def rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class FeatureCache:
    """Features of every chunk of the current batch, and the RNG state each was made under."""

    def __init__(self, features: list, rng_states: list):
        self.features = features
        self.rng_states = rng_states
        self.batch_size = sum(len(image) for image, _ in features)
        self.next = 0

    def start_chunk(self) -> int:
        """Index of the micro-batch about to run; replays the RNG its features were cached under."""
        chunk, self.next = self.next, self.next + 1
        set_rng_state(self.rng_states[chunk])
        return chunk

    def splice(self, chunk: int, live: Features) -> Features:
        """The whole batch's features, live (with grad) for `chunk` only, and the grad scale."""
        images = [f if i != chunk else live.image for i, (f, _) in enumerate(self.features)]
        texts = [f if i != chunk else live.text for i, (_, f) in enumerate(self.features)]
        # Composer scales each micro-batch's loss by its share of the batch; the cached loss
        # is already the whole batch's, so its gradient is scaled back up.
        grad_scale = self.batch_size / len(live.image)
        return Features(torch.cat(images), torch.cat(texts), live.logit_scale, live.logit_bias, grad_scale)


class ContrastiveAccumulation(Algorithm):
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BEFORE_TRAIN_BATCH, Event.AFTER_TRAIN_BATCH)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = composer_model_of(state.model)
        model.feature_cache = None  # forward without a cache: plain encoding
        images, texts, sample_ids = state.batch
        size = state.device_train_microbatch_size
        if event == Event.AFTER_TRAIN_BATCH or size is None or size >= len(images):
            return
        features, rng_states = [], []
        with torch.no_grad(), get_precision_context(state.precision):
            for chunk in zip(images.split(size), texts.split(size), sample_ids.split(size)):
                rng_states.append(rng_state())
                cached = encode(model.clip, *chunk)
                features.append((cached.image, cached.text))
        model.feature_cache = FeatureCache(features, rng_states)
