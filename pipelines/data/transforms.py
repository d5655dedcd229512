"""Image preprocessing without torchvision: resize, crop, flip, normalize, from a PIL image.

Evaluation: resize the shorter side to `resize`, center-crop `size` x `size`. Training with
augmentation: the standard random resized crop (scale 0.08-1, ratio 3/4-4/3) and a
horizontal flip, drawn from a generator seeded by (seed, epoch, index), so every worker and
every executor draws the same crops. Pixels are scaled to [0, 1] and normalized per channel.
The same steps are recorded in the bundle (`Preprocessing`), so a device prepares an image
exactly as training did, without reading this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_SCALE = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input tensor (channels x size x size)."""

    channels: int
    size: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"images have 1 (grayscale) or 3 (RGB) channels, got model.in_channels={self.channels}")
        if not 0 < self.size <= self.resize:
            raise ValueError(f"data.resize ({self.resize}) must be >= model.input_size ({self.size})")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError(f"data.mean and data.std need {self.channels} values each (std > 0), "
                             f"got {list(self.mean)} and {list(self.std)}")

    def __call__(self, image, *, train: bool = False, seed: int = 0, epoch: int = 0, index: int = 0) -> torch.Tensor:
        from PIL import Image

        image = image.convert("L" if self.channels == 1 else "RGB")
        if train and self.augment:
            gen = np.random.default_rng([seed, epoch, index])
            image = _random_resized_crop(image, self.size, gen)
            if gen.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = _center(image, self.resize, self.size)
        return self.normalize(np.asarray(image, dtype=np.uint8))

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 H x W (x C) -> float32 C x H x W, scaled to [0, 1] and normalized."""
        array = pixels.astype(np.float32) / 255.0
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray((array - mean) / std))


def _center(image, resize: int, size: int):
    from PIL import Image

    w, h = image.size
    if min(w, h) != resize:
        scale = resize / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        w, h = image.size
    if (w, h) == (size, size):
        return image
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _random_resized_crop(image, size: int, gen: np.random.Generator):
    """torchvision's RandomResizedCrop: 10 tries at a random area and aspect, else the center."""
    from PIL import Image

    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * gen.uniform(*_SCALE)
        aspect = math.exp(gen.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(gen.integers(0, w - cw + 1)), int(gen.integers(0, h - ch + 1))
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
    return _center(image, max(size, min(w, h)), min(w, h)).resize((size, size), Image.Resampling.BILINEAR)
