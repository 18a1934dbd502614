"""Training augmentation: torchvision's crop distribution from a per-sample RNG, exactly torchvision's
pixels at full decode scale, close to them at a reduced JPEG scale, and the same on the device."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from pipeline.common.images import decode_rgb
from pipeline.data.augment import Augment, collate_device_parts
from tests.test_images import encoded, in_mode, picture

MEAN, STD = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)


def augment(scale=(0.5, 1.0), hflip=True, size=32) -> Augment:
    return Augment(size, scale, hflip, MEAN, STD)


def jpeg(image: Image.Image, quality: int = 92) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.mark.parametrize("width,height", [(320, 256), (512, 512), (200, 600)])
def test_crops_follow_torchvisions_distribution(width, height):
    """Crop area share, log aspect ratio and centre position: two-sample KS tests against torchvision's
    RandomResizedCrop.get_params (open_clip's crop) over 4,000 crops each."""
    ours, theirs = augment(scale=(0.5, 1.0)), RandomResizedCrop(224, scale=(0.5, 1.0))
    image = Image.new("RGB", (width, height))
    torch.manual_seed(0)
    reference = []
    for _ in range(4000):
        top, left, h, w = theirs.get_params(image, theirs.scale, theirs.ratio)
        reference.append((left, top, left + w, top + h))
    drawn = [ours.crop_box(random.Random(seed), width, height) for seed in range(4000)]

    def features(boxes):
        b = np.array(boxes, dtype=float)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return {
            "area": w * h / (width * height),
            "log_ratio": np.log(w / h),
            "centre_x": (b[:, 0] + b[:, 2]) / 2 / width,
            "centre_y": (b[:, 1] + b[:, 3]) / 2 / height,
        }

    for name, values in features(drawn).items():
        assert ks_2samp(values, features(reference)[name]).pvalue > 1e-3, name
    assert all(0 <= left < right <= width and 0 <= top < bottom <= height for left, top, right, bottom in drawn)


def test_the_same_seed_gives_the_same_crop_and_flip_and_both_flips_occur():
    a = augment()
    assert a.crop_box(random.Random(7), 320, 256) == a.crop_box(random.Random(7), 320, 256)
    assert {a.flips(random.Random(seed)) for seed in range(20)} == {True, False}
    assert not any(augment(hflip=False).flips(random.Random(seed)) for seed in range(20))


def torchvision_reference(a: Augment, data: bytes, seed: int) -> torch.Tensor:
    """open_clip's train pipeline spelled with torchvision, for the crop and flip `a` draws from `seed`."""
    rng, image = random.Random(seed), decode_rgb(data)
    left, top, right, bottom = a.crop_box(rng, *image.size)
    out = TF.resized_crop(image, top, left, bottom - top, right - left, [a.size, a.size], TF.InterpolationMode.BICUBIC)
    if a.flips(rng):
        out = TF.hflip(out)
    return TF.normalize(TF.to_tensor(out), a.mean, a.std)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "CMYK"])
def test_cpu_path_is_torchvisions_crop_resize_flip_normalise(mode):
    a, data = augment(), encoded(in_mode(picture(2, (60, 44)), mode, 2))
    for seed in range(5):
        assert torch.allclose(a.on_cpu(data, random.Random(seed)), torchvision_reference(a, data, seed), atol=1e-6)


def test_large_jpegs_decode_at_a_reduced_scale_close_to_the_full_decode_and_in_full_without_the_draft():
    a = augment(scale=(0.9, 1.0), size=64)
    data = jpeg(picture(5, (256, 256)).resize((512, 512), Image.Resampling.BICUBIC))
    for seed in range(5):
        crop = a.decode_crop(data, random.Random(seed))
        assert 64 <= min(crop.size) < 256  # the crop (>= 460 px stored) decoded at 1/4 or 1/2 scale
        diff = (a.on_cpu(data, random.Random(seed)) - torchvision_reference(a, data, seed)).abs()
        assert diff.mean() < 0.03, diff.mean()  # normalised units: about 2/255 of a pixel value
    full = Augment(a.size, a.scale, a.hflip, a.mean, a.std, jpeg_draft=False)
    for seed in range(5):  # without the draft: the whole image decoded, exactly torchvision's pixels
        assert torch.allclose(full.on_cpu(data, random.Random(seed)), torchvision_reference(a, data, seed), atol=1e-6)


@pytest.mark.parametrize("decode_on_device", [False, True])
def test_device_path_matches_the_cpu_path(decode_on_device):
    """Workers' parts of RGB / RGBA / palette / grey / CMYK images (PNG and JPEG) finished in one batch."""
    a = augment(size=32)
    sources = [
        encoded(in_mode(picture(i, (60, 44)), mode, i)) for i, mode in enumerate(["RGB", "RGBA", "P", "L", "CMYK"])
    ]
    sources += [jpeg(picture(9, (60, 44))), jpeg(picture(10, (60, 44)).convert("L"))]
    items = [
        (a.worker_part(data, random.Random(seed), decode_on_device), torch.tensor([seed]), seed)
        for seed, data in enumerate(sources)
    ]
    (payloads, boxes, flips), tokens, sample_ids = collate_device_parts(items)
    assert sample_ids.tolist() == list(range(len(sources)))
    assert [p.dim() for p in payloads] == [3] * 5 + ([1, 1] if decode_on_device else [3, 3])  # JPEG bytes travel
    batch = a.on_device(payloads, boxes, flips, torch.device("cpu"))
    cpu = torch.stack([a.on_cpu(data, random.Random(seed)) for seed, data in enumerate(sources)])
    assert batch.shape == cpu.shape and tokens.tolist() == [[s] for s in range(len(sources))]
    assert (batch - cpu).abs().mean() < 0.02  # torch's antialiased bicubic against Pillow's: same crop, same flip
