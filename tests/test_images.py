"""The one image decoder: RGB first, then the transform, as CLIP_benchmark and torchvision load images."""

import io
import random

import pytest
import torch
import webdataset
from open_clip.transform import image_transform
from PIL import Image, ImageDraw
from torchvision.datasets.folder import pil_loader

from pipeline.common.images import decode_rgb

TRANSFORM = image_transform(32, is_train=False)  # open_clip's eval transform: resize, crop, RGB, normalise


def picture(seed: int, size=(48, 40)) -> Image.Image:
    """An RGB drawing, larger than the model's 32 px so that the transform resizes it."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(size[0] - 8), rng.randrange(size[1] - 8)
        draw.ellipse(
            (x, y, x + rng.randrange(5, 20), y + rng.randrange(5, 20)), fill=tuple(rng.randrange(256) for _ in range(3))
        )
    return image


def in_mode(image: Image.Image, mode: str, seed: int) -> Image.Image:
    """`image` as RGBA (a transparent frame over colours the alpha hides), palette, grey or CMYK."""
    if mode == "RGBA":
        alpha = Image.new("L", image.size, 0)
        margin = 4 + seed % 5
        ImageDraw.Draw(alpha).rectangle((margin, margin, image.width - margin, image.height - margin), fill=255)
        rgba = image.copy()
        rgba.putalpha(alpha)
        return rgba
    if mode == "P":
        return image.quantize(colors=16)
    if mode == "CMYK":  # with black ink in stripes, as print files have it (Pillow's own conversion has none)
        cyan, magenta, yellow, _ = image.convert("CMYK").split()
        black = Image.new("L", image.size, 0)
        ImageDraw.Draw(black).rectangle((0, 0, image.width // 2, image.height), fill=96 + 8 * (seed % 8))
        return Image.merge("CMYK", (cyan, magenta, yellow, black))
    return image.convert(mode)


def encoded(image: Image.Image) -> bytes:
    """PNG, or JPEG for CMYK (PNG has no CMYK)."""
    out = io.BytesIO()
    image.save(out, "JPEG" if image.mode == "CMYK" else "PNG")
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "RGB"])
def test_decoded_like_torchvision_and_webdataset_loaders(mode, tmp_path):
    data = encoded(in_mode(picture(3), mode, 3))
    path = tmp_path / "image"
    path.write_bytes(data)
    assert Image.open(path).mode == mode
    pixels = decode_rgb(data, TRANSFORM)
    assert pixels.shape == (3, 32, 32)
    assert torch.equal(pixels, decode_rgb(str(path), TRANSFORM))
    assert torch.equal(pixels, TRANSFORM(pil_loader(str(path))))  # torchvision's ImageFolder loader
    # CLIP_benchmark's webdataset decoder ("pil")
    assert torch.equal(pixels, TRANSFORM(webdataset.autodecode.ImageHandler("pil")("x.png", data)))


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK"])
def test_transform_before_rgb_would_give_other_pixels(mode):
    """What the eval did before: open_clip's transform resizes in the image's own mode."""
    data = encoded(in_mode(picture(5), mode, 5))
    assert not torch.equal(decode_rgb(data, TRANSFORM), TRANSFORM(Image.open(io.BytesIO(data))))


def test_without_a_transform_an_rgb_image_and_a_clear_error_for_bad_bytes():
    image = decode_rgb(encoded(in_mode(picture(1), "RGBA", 1)))
    assert image.mode == "RGB" and image.size == (48, 40)
    assert image.getpixel((0, 0)) == picture(1).getpixel((0, 0))  # alpha dropped: the colour under it stays
    with pytest.raises(Exception, match="cannot identify image file"):
        decode_rgb(b"\x89PNG\r\n\x1a\n not an image")
