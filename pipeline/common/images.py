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
from collections.abc import Callable
from typing import Optional, Union

from PIL import Image

ImageSource = Union[bytes, str, os.PathLike]


def open_image(source: ImageSource) -> Image.Image:
    """Opened, not decoded: the header (size, mode) is read; pixels decode on first use."""
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def decode_rgb(source: ImageSource, transform: Optional[Callable] = None):
    """An image's bytes or path -> RGB PIL image, or `transform` of it when one is given."""
    with open_image(source) as image:
        rgb = image.convert("RGB")  # decodes the whole image; a corrupt one raises here
    return rgb if transform is None else transform(rgb)


def decode_rgb_region(source: ImageSource, choose_box: Callable, size: tuple) -> tuple:
    """Decode only the detail a crop resized to `size` (w, h) keeps: (RGB image, box in its pixels).

    `choose_box(width, height)` picks the crop in stored pixels from the header alone. A JPEG whose
    crop is at least twice `size` is then decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (Pillow's `draft`, libjpeg's scaled IDCT), as far as the crop stays at least `size`; other
    formats decode in full. The same RGB conversion as `decode_rgb`.
    """
    with open_image(source) as image:
        width, height = image.size
        box = choose_box(width, height)
        box_w, box_h = box[2] - box[0], box[3] - box[1]
        # draft keeps the decoded image at least this large, so the crop keeps at least `size`
        drafted = image.draft(None, (-(-width * size[0] // box_w), -(-height * size[1] // box_h)))
        rgb = image.convert("RGB")
    if drafted is None:  # not a JPEG
        return rgb, box
    reduction = width / drafted[1][2]
    return rgb, tuple(c / reduction for c in box)
