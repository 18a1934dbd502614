"""The one way images are decoded, for training, evaluation and the eval-set converters.

Open, decode, convert to RGB, and only then transform. Converting first is what CLIP_benchmark
(webdataset's "pil" decoder) and torchvision's image loaders do; open_clip's transforms convert
to RGB only after resizing, and Pillow resizes an RGBA image with its alpha (premultiplied) and a
palette image with nearest-neighbour, so transparent and palette images would come out
different. Transparent pixels keep the colour stored under them (alpha is dropped, not blended).
"""

from __future__ import annotations

import io
import os
from typing import Callable, Optional, Union

from PIL import Image

ImageSource = Union[bytes, str, os.PathLike]


def decode_rgb(source: ImageSource, transform: Optional[Callable] = None):
    """An image's bytes or path -> RGB PIL image, or `transform` of it when one is given."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        rgb = image.convert("RGB")  # decodes the whole image; a corrupt one raises here
    return rgb if transform is None else transform(rgb)
