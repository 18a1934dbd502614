"""Training augmentation: open_clip's random-resized crop, FLIP's flip, the model's normalisation.

Every random choice of a sample (its crop, its flip) is drawn from that sample's own
`random.Random(seed)`, seeded from (seed, epoch, sample), so a resumed run, or one with another
number of workers, augments exactly as an uninterrupted one; no global RNG is touched (seeding
torch's costs ~40 us a sample and reseeds every device's generator).

Two places to apply it (`data.augment_on`):
- `cpu`: the loader workers decode (at the crop's scale, `images.decode_rgb_region`), crop, resize,
  flip and normalise; batches arrive as float tensors.
- `device`: the workers only decode and cut out the crop (or, with `data.decode_on_device`, pass a
  JPEG's bytes on to nvjpeg); resizing, flipping and normalising run batched on the training device
  (Composer's `batch_transforms`), so the CPU cost per sample is a fraction of the `cpu` path's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transform import merge_preprocess_dict
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.common.images import decode_rgb, decode_rgb_region, open_image
from pipeline.config.schema import AugmentConfig

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range, as open_clip uses it
JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class Augment:
    size: int  # the model's input side
    scale: tuple  # range of the crop's share of the image's area
    hflip: bool
    mean: tuple
    std: tuple
    jpeg_draft: bool = True  # decode a JPEG at the crop's scale (data.augment.jpeg_draft)

    def crop_box(self, rng: random.Random, width: int, height: int) -> tuple:
        """torchvision's RandomResizedCrop.get_params, drawn from `rng`: (left, top, right, bottom)."""
        area = width * height
        log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                return left, top, left + w, top + h
        ratio = width / height  # after 10 misses, the centre crop at the nearest allowed ratio
        if ratio < RATIO[0]:
            w, h = width, int(round(width / RATIO[0]))
        elif ratio > RATIO[1]:
            w, h = int(round(height * RATIO[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def flips(self, rng: random.Random) -> bool:
        return self.hflip and rng.random() < 0.5

    def on_cpu(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """`augment_on: cpu`, in a loader worker: encoded image -> normalised float CHW tensor."""
        image = self.decode_crop(data, rng).resize((self.size, self.size), Image.Resampling.BICUBIC)
        if self.flips(rng):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.normalize(torch.from_numpy(np.array(image)).permute(2, 0, 1))

    def decode_crop(self, data: bytes, rng: random.Random) -> Image.Image:
        """The crop. With `jpeg_draft`, decoded at the coarsest JPEG scale that keeps it at least `size`
        (exactly torchvision's crop at full scale; within half a pixel of it at a reduced one);
        without, the whole image decoded, as open_clip's transform does."""
        if not self.jpeg_draft:
            rgb = decode_rgb(data)
            return rgb.crop(self.crop_box(rng, *rgb.size))
        rgb, box = decode_rgb_region(data, lambda w, h: self.crop_box(rng, w, h), (self.size, self.size))
        return rgb.crop(tuple(int(round(c)) for c in box))

    def worker_part(self, data: bytes, rng: random.Random, decode_on_device: bool) -> tuple:
        """`augment_on: device`, in a loader worker: (uint8 payload, crop box, flip) for `on_device`.

        The payload is the decoded crop (HWC), or with `decode_on_device` a baseline RGB or grey
        JPEG's own bytes with the crop in its pixels (other images are decoded here, as always).
        """
        if decode_on_device and data[:2] == JPEG_MAGIC:
            with open_image(data) as header:
                if header.mode in ("RGB", "L"):
                    box = self.crop_box(rng, *header.size)
                    return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(box), self.flips(rng)
        crop = self.decode_crop(data, rng)
        return torch.from_numpy(np.array(crop)), torch.tensor([0, 0, crop.width, crop.height]), self.flips(rng)

    def on_device(self, payloads: list, boxes: torch.Tensor, flips: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`augment_on: device`: the workers' parts -> a normalised float NCHW batch on `device`."""
        encoded = [i for i, p in enumerate(payloads) if p.dim() == 1]
        decoded = decode_jpeg([payloads[i] for i in encoded], mode=ImageReadMode.RGB, device=device) if encoded else []
        images = [p.to(device, non_blocking=True).permute(2, 0, 1) if p.dim() == 3 else None for p in payloads]
        for i, image in zip(encoded, decoded):
            images[i] = image
        resized = []
        for image, (left, top, right, bottom) in zip(images, boxes.tolist()):
            crop = image[None, :, top:bottom, left:right].float()
            # antialiased bicubic: the kernel (a = -0.5) and support of Pillow's BICUBIC resize
            resized.append(F.interpolate(crop, (self.size, self.size), mode="bicubic", antialias=True))
        batch = torch.cat(resized).clamp_(0, 255).round_()  # Pillow rounds to uint8, so do the same
        batch = torch.where(flips.to(device).view(-1, 1, 1, 1), batch.flip(-1), batch)
        return self.normalize(batch)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8-valued pixels (CHW or NCHW) -> (pixels / 255 - mean) / std, as ToTensor + Normalize."""
        mean = torch.tensor(self.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(3, 1, 1)
        return (pixels.float() / 255 - mean) / std


def build_augment(clip: torch.nn.Module, cfg: AugmentConfig) -> Augment:
    """The model's input size and normalisation (open_clip's preprocess config, or data.augment's)."""
    preprocess = merge_preprocess_dict(clip.visual.preprocess_cfg, {"mean": cfg.mean, "std": cfg.std})
    size = preprocess["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Augment(
        size, tuple(cfg.scale), cfg.hflip, tuple(preprocess["mean"]), tuple(preprocess["std"]), cfg.jpeg_draft
    )


def collate_device_parts(items: list) -> tuple:
    """Worker parts of `augment_on: device` -> ((payloads, boxes, flips), tokens, sample ids);
    payloads differ in size."""
    parts, tokens, sample_ids = zip(*items)
    payloads, boxes, flips = zip(*parts)
    return (list(payloads), torch.stack(boxes), torch.tensor(flips)), torch.stack(tokens), torch.tensor(sample_ids)
