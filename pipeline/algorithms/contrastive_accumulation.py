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

    def splice(self, chunk: int, image_features: torch.Tensor, text_features: torch.Tensor):
        """The whole batch's features, live (with grad) for `chunk` only; and the grad scale."""
        images = [f if i != chunk else image_features for i, (f, _) in enumerate(self.features)]
        texts = [f if i != chunk else text_features for i, (_, f) in enumerate(self.features)]
        # Composer scales each micro-batch's loss by its share of the batch; the cached loss
        # is already the whole batch's, so its gradient is scaled back up.
        return torch.cat(images), torch.cat(texts), self.batch_size / len(image_features)


class ContrastiveAccumulation(Algorithm):
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BEFORE_TRAIN_BATCH, Event.AFTER_TRAIN_BATCH)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = composer_model_of(state.model)
        model.feature_cache = None  # forward without a cache: plain encoding
        images, texts = state.batch
        size = state.device_train_microbatch_size
        if event == Event.AFTER_TRAIN_BATCH or size is None or size >= len(images):
            return
        features, rng_states = [], []
        with torch.no_grad(), get_precision_context(state.precision):
            for chunk_images, chunk_texts in zip(images.split(size), texts.split(size)):
                rng_states.append(rng_state())
                features.append(model.encode(chunk_images, chunk_texts)[:2])
        model.feature_cache = FeatureCache(features, rng_states)
