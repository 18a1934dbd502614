"""FLIP's text masking ablation: drop a fraction of text tokens after position embedding.

Modes: `random` keeps a random subset; `padding_first` drops padding before real tokens.
The end-of-text token (the one the tower pools) is always kept. Which ids pad and end a caption
comes from the tokenizer (`pipeline.model.towers.text_token_ids`). Kept tokens go through the
transformer in their original order under the causal mask; their outputs are put back at
their original positions, so open_clip's pooling finds the end-of-text token where it was.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from pipeline.algorithms.unwrap import clip_of
from pipeline.config.schema import TextMaskingMode
from pipeline.model.sample_noise import TEXT_STREAM, sample_uniform
from pipeline.model.towers import text_token_ids, text_tower


class TextTokenDropout:
    """Hooks on a text tower's token embedding and transformer; active only in training."""

    def __init__(self, ratio: float, mode: TextMaskingMode, pad_id: int, eot_id: int, seed: int):
        self.ratio, self.mode, self.seed = ratio, TextMaskingMode(mode), seed
        self.pad_id, self.eot_id = pad_id, eot_id
        self.tokens = self.keep = None

    def remember_tokens(self, module, args):
        self.tokens = args[0]

    def drop(self, transformer, args, kwargs):
        x = args[0]
        if not transformer.training or self.ratio == 0:
            self.keep = None
            return None
        batch, length, width = x.shape
        num_keep = max(1, int(length * (1 - self.ratio)))
        score = sample_uniform(self.seed, TEXT_STREAM, length, x.device)  # the sample's own noise
        if self.mode == TextMaskingMode.padding_first:
            score += (self.tokens != self.pad_id).float()  # every real token outranks every pad
        end_of_text = (self.tokens == self.eot_id).int().argmax(dim=-1, keepdim=True)  # the first one
        score.scatter_(1, end_of_text, 3.0)  # end-of-text stays
        self.keep = score.topk(num_keep, dim=1).indices.sort(dim=1).values
        kept = x.gather(1, self.keep.unsqueeze(-1).expand(-1, -1, width))
        mask = kwargs.get("attn_mask")
        if mask is not None:
            kwargs["attn_mask"] = mask[:num_keep, :num_keep]  # causal among kept tokens
        return (kept, *args[1:]), kwargs

    def restore(self, transformer, args, kwargs, output):
        if self.keep is None:
            return None
        batch, _, width = output.shape
        full = output.new_zeros(batch, self.tokens.shape[1], width)
        return full.scatter(1, self.keep.unsqueeze(-1).expand(-1, -1, width), output)


def install_text_masking(
    clip: torch.nn.Module, ratio: float, mode: TextMaskingMode, tokenizer, seed: int
) -> TextTokenDropout:
    root = text_tower(clip).root
    hooks = TextTokenDropout(ratio, mode, *text_token_ids(tokenizer), seed)
    root.token_embedding.register_forward_pre_hook(hooks.remember_tokens)
    root.transformer.register_forward_pre_hook(hooks.drop, with_kwargs=True)
    root.transformer.register_forward_hook(hooks.restore, with_kwargs=True)
    return hooks


class TextMasking(Algorithm):
    def __init__(self, ratio: float, mode: TextMaskingMode, tokenizer, seed: int):
        self.ratio, self.mode, self.tokenizer, self.seed = ratio, mode, tokenizer, seed

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        install_text_masking(clip_of(state.model), self.ratio, self.mode, self.tokenizer, self.seed)
