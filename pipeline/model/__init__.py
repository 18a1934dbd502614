"""The model: the ComposerModel around open_clip's CLIP (clip.py), the one module that knows how
open_clip and timm build their towers (towers.py), the loss (loss.py), masking noise from sample
ids (sample_noise.py), weights in (weights.py) and out, for open_clip (export.py). Imports
config, common, compat and checkpoint."""
