"""FLIP's text masking ablation: drop a fraction of text tokens after position embedding.

Modes: `random` keeps a random subset; `padding_first` drops padding before real tokens.
The end-of-text token (the one the tower pools) is always kept. Kept tokens go through the
transformer in their original order under the causal mask; their outputs are put back at
their original positions, so open_clip's pooling finds the end-of-text token where it was.
"""

from __future__ import annotations

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from pipeline.algorithms.unwrap import clip_of

MODES = ("random", "padding_first")


class TextTokenDropout:
    """Hooks on a text tower's token embedding and transformer; active only in training."""

    def __init__(self, ratio: float, mode: str):
        self.ratio, self.mode = ratio, mode
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
        score = torch.rand(batch, length, device=x.device)
        if self.mode == "padding_first":
            score += (self.tokens != 0).float()  # every real token outranks every pad
        score.scatter_(1, self.tokens.argmax(dim=-1, keepdim=True), 3.0)  # end-of-text stays
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


def install_text_masking(clip: torch.nn.Module, ratio: float, mode: str) -> TextTokenDropout:
    tower = clip.text if hasattr(clip, "text") else clip
    if not hasattr(tower, "token_embedding") or not hasattr(tower, "transformer"):
        raise ValueError(f"text masking needs an open_clip text transformer, not {type(tower).__name__}")
    hooks = TextTokenDropout(ratio, mode)
    tower.token_embedding.register_forward_pre_hook(hooks.remember_tokens)
    tower.transformer.register_forward_pre_hook(hooks.drop, with_kwargs=True)
    tower.transformer.register_forward_hook(hooks.restore, with_kwargs=True)
    return hooks


class TextMasking(Algorithm):
    def __init__(self, ratio: float = 0.5, mode: str = "padding_first"):
        if mode not in MODES or not 0 <= ratio < 1:
            raise ValueError(f"algorithms.text_masking: mode in {MODES}, ratio in [0, 1); got {mode}, {ratio}")
        self.ratio, self.mode = ratio, mode

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        install_text_masking(clip_of(state.model), self.ratio, self.mode)
