"""Attention through F.scaled_dot_product_attention with flash / cuDNN kernels allowed.

open_clip's blocks use nn.MultiheadAttention, which reaches SDPA with an explicit float mask
for the causal text tower, and an explicit mask rules out the flash kernel. The swap keeps the
module's parameters and state-dict keys (in_proj_*, out_proj) and passes `is_causal=True`
instead of the mask, so PyTorch's kernel choice (flash, then cuDNN / memory-efficient, math
last) can take flash for both towers. On CPU, SDPA picks its own CPU kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from pipeline.algorithms.unwrap import clip_of
from pipeline.model.towers import attention_modules


class SDPAMultiheadAttention(torch.nn.MultiheadAttention):
    """nn.MultiheadAttention (batch_first, self-attention) computed with one SDPA call."""

    causal: bool = False

    def forward(self, query, key, value, need_weights=False, attn_mask=None, **kwargs):
        batch, length, width = query.shape
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if self.causal and attn_mask is not None:  # the text tower's mask is exactly the causal mask
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            mask = None if attn_mask is None else attn_mask.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out), None


def swap_attention(clip: torch.nn.Module) -> int:
    """Every nn.MultiheadAttention of both towers' blocks becomes an SDPAMultiheadAttention."""
    swapped = 0
    for module, causal in attention_modules(clip):
        if not module.batch_first or not module._qkv_same_embed_dim:
            raise ValueError("flash_attention expects open_clip's batch_first self-attention blocks")
        module.__class__ = SDPAMultiheadAttention
        module.causal = causal
        swapped += 1
    return swapped


class FlashAttention(Algorithm):
    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if swap_attention(clip_of(state.model)) == 0:  # timm towers already call SDPA themselves
            raise ValueError("flash_attention found no nn.MultiheadAttention to swap in this model")
