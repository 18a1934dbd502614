"""The one place that knows how open_clip builds its towers (torchtitan's parallelize.py idea).

Everything else asks here: which modules are the blocks of each tower (for FSDP units, FLOPs and
layer-wise lr decay), where the text tower and its embeddings are, where patch dropout goes, which
attention modules are causal, and which token ids pad and end a caption. Supported:

- vision: open_clip's VisionTransformer, or a timm ViT / EVA trunk inside open_clip's TimmModel;
- text: CLIP's built-in text transformer, or the TextTransformer of a CustomTextCLIP (`clip.text`).

A new tower type means editing this file only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block as TimmBlock

from pipeline.model.sample_noise import PATCH_STREAM, sample_uniform

# Parameters of the logit scale and (SigLIP) bias: the "logit_scale" group of the optimizer.
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")
# Attribute names, per tower type, of what comes before the first block (depth 0 for layer decay).
VISION_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
TIMM_EMBEDDINGS = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre")
TEXT_EMBEDDINGS = ("token_embedding", "positional_embedding")
# Embedding tables that get no weight decay (patch embeddings are convolutions and do decay).
NO_DECAY_EMBEDDINGS = (
    "class_embedding",
    "positional_embedding",
    "cls_token",
    "reg_token",
    "pos_embed",
    "token_embedding",
)


@dataclass
class Tower:
    name: str  # "visual" or "text"
    root: torch.nn.Module  # the module holding the tower's embeddings and blocks
    blocks: torch.nn.ModuleList
    width: int
    embeddings: tuple  # attribute names on `root` that come before the first block
    causal: bool  # does the tower attend causally (the text tower's mask)


def vision_tower(clip: torch.nn.Module) -> Tower:
    visual = clip.visual
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        return Tower("visual", trunk, trunk.blocks, trunk.embed_dim, TIMM_EMBEDDINGS, causal=False)
    if isinstance(visual, VisionTransformer):
        transformer = visual.transformer
        return Tower("visual", visual, transformer.resblocks, transformer.width, VISION_EMBEDDINGS, causal=False)
    raise ValueError(f"unsupported vision tower {type(visual).__name__} (see pipeline/model/towers.py)")


def text_tower(clip: torch.nn.Module) -> Tower:
    root = clip.text if hasattr(clip, "text") else clip  # CustomTextCLIP keeps it apart; CLIP inline
    transformer = getattr(root, "transformer", None)
    if transformer is None or not hasattr(root, "token_embedding"):
        raise ValueError(f"unsupported text tower {type(root).__name__} (see pipeline/model/towers.py)")
    return Tower("text", root, transformer.resblocks, transformer.width, TEXT_EMBEDDINGS, root.attn_mask is not None)


def towers(clip: torch.nn.Module) -> tuple:
    return vision_tower(clip), text_tower(clip)


def fsdp_unit(module: torch.nn.Module) -> bool:
    """FSDP shards each transformer block of either tower as its own unit."""
    return isinstance(module, (ResidualAttentionBlock, TimmBlock, EvaBlock))


# ---------------------------------------------------------------------------
# FLIP patch dropout
# ---------------------------------------------------------------------------


class SamplePatchDropout(torch.nn.Module):
    """open_clip's PatchDropout (timm's, `with_indices`, for EVA's RoPE), its noise drawn per sample
    (pipeline/model/sample_noise.py): in training, drops `prob` of the tokens after the `prefix` (class)
    token(s), the same ones for a sample whichever rank or micro-batch encodes it."""

    def __init__(self, prob: float, seed: int, prefix: int = 1, with_indices: bool = False):
        super().__init__()
        self.prob, self.seed, self.prefix, self.with_indices = prob, seed, prefix, with_indices

    def forward(self, x: torch.Tensor):
        keep = None
        if self.training and self.prob > 0:
            prefix, patches = x[:, : self.prefix], x[:, self.prefix :]
            num_keep = max(1, int(patches.shape[1] * (1 - self.prob)))
            keep = sample_uniform(self.seed, PATCH_STREAM, patches.shape[1], x.device).topk(num_keep, dim=1).indices
            x = torch.cat((prefix, patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))), dim=1)
        return (x, keep) if self.with_indices else x


def install_patch_dropout(clip: torch.nn.Module, ratio: float, seed: int) -> SamplePatchDropout:
    """Put a patch-dropout module of `ratio` where the vision tower applies it; returns it.
    open_clip's runs after class + position embedding; timm's also keeps RoPE aligned (EVA)."""
    tower = vision_tower(clip)
    if isinstance(clip.visual, TimmModel):
        tower.root.patch_drop = SamplePatchDropout(ratio, seed, tower.root.num_prefix_tokens, with_indices=True)
        return tower.root.patch_drop
    tower.root.patch_dropout = SamplePatchDropout(ratio, seed)
    return tower.root.patch_dropout


def patch_dropout(clip: torch.nn.Module) -> SamplePatchDropout:
    tower = vision_tower(clip)
    module = tower.root.patch_drop if isinstance(clip.visual, TimmModel) else tower.root.patch_dropout
    if not isinstance(module, SamplePatchDropout):
        raise ValueError("no patch masking installed: add algorithms.patch_masking")
    return module


def kept_image_tokens(clip: torch.nn.Module) -> int:
    """Prefix token(s) + the patches that survive patch masking in training."""
    tower = vision_tower(clip)
    if isinstance(clip.visual, TimmModel):
        patches, prefix, dropout = (
            tower.root.patch_embed.num_patches,
            tower.root.num_prefix_tokens,
            tower.root.patch_drop,
        )
    else:
        patches, prefix, dropout = clip.visual.grid_size[0] * clip.visual.grid_size[1], 1, clip.visual.patch_dropout
    ratio = getattr(dropout, "prob", 0.0) if clip.training else 0.0
    return prefix + (max(1, int(patches * (1 - ratio))) if ratio > 0 else patches)


# ---------------------------------------------------------------------------
# Attention, FLOPs
# ---------------------------------------------------------------------------


def attention_modules(clip: torch.nn.Module) -> list:
    """(nn.MultiheadAttention, causal) of every block of both towers (timm's blocks have none)."""
    return [
        (module, tower.causal)
        for tower in towers(clip)
        for module in tower.blocks.modules()
        if type(module) is torch.nn.MultiheadAttention
    ]


def forward_flops(tower: Tower, tokens: int) -> float:
    """2 FLOPs per weight per token through the blocks, plus the attention products."""
    weights = sum(p.numel() for p in tower.blocks.parameters() if p.ndim > 1)
    return 2 * weights * tokens + 4 * len(tower.blocks) * tokens**2 * tower.width


# ---------------------------------------------------------------------------
# Layer ids (optimizer groups)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerId:
    tower: str  # "visual", "text" or "logit_scale"
    depth: int  # 0: embeddings, k + 1: block k, num_blocks + 1: final norm / projection
    num_blocks: int
    decays: bool  # weight decay applies (not biases, norms, embedding tables, the logit scale)


def layer_ids(clip: torch.nn.Module) -> dict:
    """{parameter name in the CLIP: LayerId} for every parameter."""
    vision, text = towers(clip)
    visual = {id(p) for p in clip.visual.parameters()}
    depths = {tower.name: _depths(tower) for tower in (vision, text)}
    no_decay = _ids(vision.root, NO_DECAY_EMBEDDINGS) | _ids(text.root, NO_DECAY_EMBEDDINGS)
    ids = {}
    for name, param in clip.named_parameters():
        if name in LOGIT_PARAMETERS:
            ids[name] = LayerId("logit_scale", 0, 0, decays=False)
            continue
        tower = vision if id(param) in visual else text
        depth = depths[tower.name].get(id(param), len(tower.blocks) + 1)
        decays = param.ndim >= 2 and id(param) not in no_decay
        ids[name] = LayerId(tower.name, depth, len(tower.blocks), decays)
    return ids


def _depths(tower: Tower) -> dict:
    depths = {i: 0 for i in _ids(tower.root, tower.embeddings)}
    depths.update({id(p): k + 1 for k, block in enumerate(tower.blocks) for p in block.parameters()})
    return depths


def _ids(root: torch.nn.Module, attrs: tuple) -> set:
    """Ids of the parameters that the attributes `attrs` of `root` are or hold."""
    found = set()
    for attr in attrs:
        value = getattr(root, attr, None)
        if isinstance(value, torch.nn.Parameter):
            found.add(id(value))
        elif isinstance(value, torch.nn.Module):
            found.update(id(p) for p in value.parameters())
    return found


# ---------------------------------------------------------------------------
# Text tokens
# ---------------------------------------------------------------------------


def text_token_ids(tokenizer) -> tuple:
    """(padding id, end-of-text id) of an open_clip tokenizer: what text masking drops first and
    what it must keep (the token the text tower pools)."""
    if isinstance(tokenizer, SimpleTokenizer):  # pads with zeros
        return 0, tokenizer.eot_token_id
    hf = tokenizer.tokenizer  # open_clip's HFTokenizer
    return hf.pad_token_id, hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id


# ---------------------------------------------------------------------------
# State-dict layouts (initialising a tower from another model's weights)
# ---------------------------------------------------------------------------

# Keys of open_clip's built-in (OpenAI CLIP) text tower, which lives inline in a CLIP.
CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def tower_of_key(key: str) -> Optional[str]:
    """'visual', 'text' or None (the logit scale / bias) for a key of the CLIP's state dict."""
    if key.startswith("visual."):
        return "visual"
    if key.split(".")[0] in LOGIT_PARAMETERS:
        return None
    return "text"


def text_key_in_clip(clip: torch.nn.Module, key: str) -> str:
    """An open_clip text-tower key (CLIP inline layout, or CustomTextCLIP's `text.`) as this CLIP names it."""
    bare = key.removeprefix("text.")
    return f"text.{bare}" if hasattr(clip, "text") else bare


def layout_to_clip(clip: torch.nn.Module, tower: str, layout: str, source: dict) -> dict:
    """The tower's tensors of `source`, keyed as this CLIP names them.

    open_clip / openai: the tower's keys of an open_clip (or OpenAI CLIP) state dict; the other
    tower's keys are not this tower's and are left out. timm: a timm ViT / EVA state dict, every key
    the trunk of open_clip's TimmModel."""
    if layout == "timm":
        if tower != "visual" or not isinstance(clip.visual, TimmModel):
            raise ValueError(
                f"timm-layout weights go into a timm vision tower (open_clip's TimmModel), not the {tower} tower "
                f"of this model ({type(clip.visual).__name__})"
            )
        return {f"visual.trunk.{k}": v for k, v in source.items()}
    if tower == "visual":
        return {k: v for k, v in source.items() if k.startswith("visual.")}
    text = {k: v for k, v in source.items() if k.startswith("text.") or k.startswith(CLIP_TEXT_KEYS)}
    return {text_key_in_clip(clip, k): v for k, v in text.items()}


def resample_to_fit(clip: torch.nn.Module, key: str, value: torch.Tensor) -> Optional[torch.Tensor]:
    """`value` resampled to this CLIP's tensor at `key` when that is a position embedding (another
    grid or context length) or a timm patch embedding (another patch size: EVA02's MIM weights are
    14 px, EVA02-CLIP-B/16's patches 16 px, as EVA-CLIP resamples them); else None."""
    if key == "visual.trunk.patch_embed.proj.weight":
        return resample_patch_embed(value, list(clip.visual.trunk.patch_embed.patch_size))
    if key == "visual.trunk.pos_embed":
        trunk = clip.visual.trunk
        return resample_abs_pos_embed(
            value, list(trunk.patch_embed.grid_size), num_prefix_tokens=trunk.num_prefix_tokens
        )
    if key == "visual.positional_embedding":
        state = {key: value}
        resize_pos_embed(state, clip)
        return state[key]
    if key.removeprefix("text.") == "positional_embedding":
        state = {key: value}
        resize_text_pos_embed(state, clip)
        return state[key]
    return None
