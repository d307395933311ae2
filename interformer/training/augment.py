"""Per-sample training pipeline of the official config (spec §6, `configs/_base_/coco_lvis_512x512.py`).

Order: random resize (ratio 0.5-2.0 of the original size, keep ratio) -> horizontal flip (p 0.5) -> pad
bottom/right to at least crop x crop (image 0 = black, segments 0 = background) -> random crop (up to 10
tries to keep the largest segment below `cat_max_ratio` of the crop) -> photometric distortion (mmseg
defaults) -> normalise -> object sampler (one random segment still present; 255 = ignore is kept).

Inputs are an RGB uint8 image and an int32 segment map: 0 background, 1..N segments, IGNORE_SEGMENT (-1)
for pixels to ignore. All randomness comes from an explicit numpy Generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..cli_types import COUNT, FRACTION, POSITIVE, integer, real
from ..config import PIXEL_MEAN, PIXEL_STD

IGNORE_SEGMENT = -1
IGNORE_LABEL = 255


class NoObjectError(ValueError):
    """No segment is left in the crop (the sample is retried with new randomness)."""


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; defaults are the official values (512 crops; smaller crops suit CPUs)."""

    crop_size: int = field(default=512, metadata={"range": integer(32),
        "help": "training crop side in pixels (a multiple of 32)"})
    ratio_range: tuple[float, float] = field(default=(0.5, 2.0), metadata={"range": POSITIVE,
        "help": "random resize ratio range"})
    flip_prob: float = field(default=0.5, metadata={"range": FRACTION, "help": "horizontal flip probability"})
    cat_max_ratio: float = field(default=0.75, metadata={"range": FRACTION,
        "help": "re-draw a crop (up to crop_tries times) while one segment covers this fraction of it or more"})
    crop_tries: int = field(default=10, metadata={"range": COUNT, "help": "crop re-draws for cat_max_ratio"})
    photometric: bool = field(default=True, metadata={"help": "photometric distortion (brightness, contrast, "
                                                               "saturation, hue)"})
    brightness_delta: int = field(default=32, metadata={"range": integer(0, 255),
        "help": "brightness shift range (+/-)"})
    contrast_range: tuple[float, float] = field(default=(0.5, 1.5), metadata={"range": real(0),
        "help": "contrast factor range"})
    saturation_range: tuple[float, float] = field(default=(0.5, 1.5), metadata={"range": real(0),
        "help": "saturation factor range"})
    hue_delta: int = field(default=18, metadata={"range": integer(0, 180),
        "help": "hue shift range (+/-, OpenCV hue units of 2 degrees)"})


def random_resize(img: np.ndarray, seg: np.ndarray, ratio_range: tuple[float, float], rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """mmseg Resize(img_scale=None, ratio_range, keep_ratio): bilinear image, nearest segments."""
    h, w = img.shape[:2]
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target_w, target_h = int(w * ratio), int(h * ratio)
    factor = min(max(target_w, target_h) / max(h, w), min(target_w, target_h) / min(h, w))
    new_w, new_h = max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5))
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return img, seg


def random_flip(img: np.ndarray, seg: np.ndarray, prob: float, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip with probability `prob`."""
    if rng.random() < prob:
        return np.ascontiguousarray(img[:, ::-1]), np.ascontiguousarray(seg[:, ::-1])
    return img, seg


def pad_to(img: np.ndarray, seg: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least size x size: image with 0 (black, before normalisation), segments with 0."""
    h, w = img.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return img, seg
    img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
    seg = np.pad(seg, ((0, ph), (0, pw)))
    return img, seg


def random_crop(img: np.ndarray, seg: np.ndarray, size: int, rng: np.random.Generator,
                cat_max_ratio: float = 0.75, tries: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """mmseg RandomCrop: a size x size window; with cat_max_ratio < 1, up to `tries` windows are drawn until
    one has more than one segment value (background included, ignore excluded) and no value covers
    `cat_max_ratio` or more of the counted pixels; otherwise the last draw is used."""
    h, w = seg.shape

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            window = seg[top:top + size, left:left + size]
            _, counts = np.unique(window[window != IGNORE_SEGMENT], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return img[top:top + size, left:left + size], seg[top:top + size, left:left + size]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion on an RGB uint8 image: brightness, contrast (before or after), saturation,
    hue; each applied with probability 0.5."""
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-cfg.brightness_delta, cfg.brightness_delta))
    contrast_last = rng.integers(2) == 0

    def contrast(x: np.ndarray) -> np.ndarray:
        return _convert(x, alpha=rng.uniform(*cfg.contrast_range)) if rng.integers(2) else x

    if not contrast_last:
        img = contrast(img)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*cfg.saturation_range))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int32) + int(rng.integers(-cfg.hue_delta, cfg.hue_delta))) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if contrast_last:
        img = contrast(img)
    return img


def normalize(img: np.ndarray) -> np.ndarray:
    """RGB uint8 HWC -> float32 CHW, (x - mean) / std."""
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32)
    std = np.asarray(PIXEL_STD, dtype=np.float32)
    return ((img.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy()


def sample_object(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ObjectSampler: one random segment present in `seg` becomes 1, the rest 0, ignore pixels 255 (uint8)."""
    ids = np.unique(seg)
    ids = ids[ids > 0]
    if len(ids) == 0:
        raise NoObjectError("no segment left in the crop")
    chosen = ids[rng.integers(len(ids))]
    label = (seg == chosen).astype(np.uint8)
    label[seg == IGNORE_SEGMENT] = IGNORE_LABEL
    return label


def augment(img: np.ndarray, seg: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """The full training pipeline: -> (float32 [3, S, S] normalised image, uint8 [S, S] label 0/1/255).
    Raises NoObjectError when the crop holds no segment."""
    if img.shape[:2] != seg.shape:
        raise ValueError(f"image {img.shape[:2]} and segment map {seg.shape} differ in size")
    seg = seg.astype(np.int32, copy=False)
    img, seg = random_resize(img, seg, cfg.ratio_range, rng)
    img, seg = random_flip(img, seg, cfg.flip_prob, rng)
    img, seg = pad_to(img, seg, cfg.crop_size)
    img, seg = random_crop(img, seg, cfg.crop_size, rng, cfg.cat_max_ratio, cfg.crop_tries)
    if cfg.photometric:
        img = photometric_distortion(img, cfg, rng)
    return normalize(img), sample_object(seg, rng)
