"""`legodnn-fetch predict IMAGE...`: run the assembled models on image files.

Images are turned into model inputs by the bundle's own `Preprocessing` record (Pillow and
NumPy only: a device needs no torchvision and reads no code), and the top classes are named
by the bundle's class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.device.session import DeviceSession
from infra.errors import BundleError
from infra.manifest import Preprocessing


def load_image(path: str | Path, p: Preprocessing) -> Any:
    """One image file as a float32 (C, H, W) array, preprocessed as `p` says (see its docstring)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as opened:
            img = opened.convert("L" if p.color == "grayscale" else "RGB")
    except (OSError, ValueError) as e:  # missing, unreadable, or not an image (UnidentifiedImageError)
        raise ValueError(f"{path}: cannot read it as an image ({e})") from None
    height, width = p.size
    if p.resize is not None:
        scale = p.resize / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    if p.center_crop:
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    elif img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) * np.float32(p.pixel_scale)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(p.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(p.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


@dataclass(frozen=True)
class Prediction:
    """One image through one model: its logits and the top classes with softmax probabilities."""

    image: str
    model_id: str
    logits: list[float]
    top: list[tuple[str, float]]


def predict_images(session: DeviceSession, images: Sequence[str | Path], *, top: int = 3) -> list[Prediction]:
    """Every running model of `session` on every image (one batch per model)."""
    import numpy as np

    out = []
    for model_id in session.switchers:
        manifest = session.bundles[model_id].manifest
        if manifest.preprocessing is None:
            raise BundleError(
                f"{model_id} v{manifest.version} records no preprocessing, so its images cannot be prepared "
                "without code; republish it with publish_bundle(..., preprocessing=...)"
            )
        batch = np.stack([load_image(path, manifest.preprocessing) for path in images])
        logits = np.asarray(session.predict(model_id, batch), dtype=np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        names = list(manifest.classes) if manifest.classes else [str(i) for i in range(logits.shape[1])]
        for path, row, p in zip(images, logits, probs):
            order = np.argsort(-p)[:top]
            out.append(Prediction(str(path), model_id, [float(v) for v in row],
                                  [(names[i] if i < len(names) else str(i), float(p[i])) for i in order]))
    return out
