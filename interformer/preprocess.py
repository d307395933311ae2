"""Image checks and preprocessing: RGB uint8 HWC -> normalised, padded network input (spec §2, §7).

The official test pipeline normalises with the ImageNet mean/std in float32 and pads bottom/right
with zeros *after* normalisation, to a multiple of 32. An optional longest-side resize (off by
default, i.e. native resolution as in the paper's evaluation) keeps very large images affordable.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from .config import PIXEL_MEAN, PIXEL_STD, PreprocessConfig
from .features import ImageGeometry


class InvalidImageError(ValueError):
    """The array given as an image cannot be used (wrong rank, channels, dtype, size)."""


# The most bytes an image file under a pixel limit is read with (by the encoder's readers and by training). The
# widest stored pixel of the image formats read (JPEG, PNG, BMP, TIFF, WebP, GIF) is 8 bytes (16-bit RGBA,
# uncompressed TIFF or stored-deflate PNG, plus PNG's filter byte per row: 9 for a one-pixel-wide image); twice
# that leaves room for a second frame or page, and the headroom for metadata (EXIF, ICC profiles, XMP, embedded
# thumbnails). A file over it cannot be an image the limit lets through.
MAX_FILE_BYTES_PER_PIXEL = 16
FILE_HEADROOM_BYTES = 64 * 1024 * 1024


def max_file_bytes(max_pixels: int | None) -> int | None:
    """The byte cap for reading an image file decoded under `max_pixels` (None: no pixel limit, no cap)."""
    return None if max_pixels is None else max_pixels * MAX_FILE_BYTES_PER_PIXEL + FILE_HEADROOM_BYTES


def validate_image(image: np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """Check that `image` is an RGB uint8 HxWx3 array (a 2-D grey image is promoted) and return it."""
    if isinstance(image, torch.Tensor):
        raise InvalidImageError("expected a numpy array (H, W, 3) uint8 RGB image, got a torch.Tensor")
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(f"expected a numpy array (H, W, 3) uint8 RGB image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidImageError(f"expected dtype uint8 (0-255 RGB), got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidImageError(f"expected shape (H, W, 3) RGB, got {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise InvalidImageError(f"image is empty: shape {image.shape}")
    if max_pixels is not None and h * w > max_pixels:
        raise InvalidImageError(f"image has {h * w} pixels, over the limit of {max_pixels}")
    return image


def compute_geometry(original_size: tuple[int, int], cfg: PreprocessConfig) -> ImageGeometry:
    """Resized and padded sizes for an image of `original_size` (H0, W0)."""
    h0, w0 = int(original_size[0]), int(original_size[1])
    scale = 1.0
    h, w = h0, w0
    if cfg.max_side is not None and max(h0, w0) > cfg.max_side:
        scale = cfg.max_side / max(h0, w0)
        h, w = max(1, int(round(h0 * scale))), max(1, int(round(w0 * scale)))
    d = cfg.size_divisor
    hp, wp = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
    return ImageGeometry((h0, w0), (h, w), (hp, wp), scale)


def resize_image(image: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Resize to `geometry.resized_size` (area interpolation when shrinking); a no-op at native size."""
    if not geometry.resized:
        return image
    h, w = geometry.resized_size
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def normalize_and_pad(image: np.ndarray, padded_size: tuple[int, int]) -> torch.Tensor:
    """(x - mean) / std in float32, CHW, zero-padded bottom/right: a [1, 3, Hp, Wp] tensor."""
    mean = np.asarray(PIXEL_MEAN, dtype=np.float32)
    std = np.asarray(PIXEL_STD, dtype=np.float32)
    norm = (image.astype(np.float32) - mean) / std
    h, w = norm.shape[:2]
    hp, wp = padded_size
    out = np.zeros((3, hp, wp), dtype=np.float32)
    out[:, :h, :w] = norm.transpose(2, 0, 1)
    return torch.from_numpy(out)[None]


def preprocess(image: np.ndarray, cfg: PreprocessConfig = PreprocessConfig()) -> tuple[torch.Tensor, ImageGeometry]:
    """Validate, resize, normalise and pad one image; returns the network input and its geometry."""
    image = validate_image(image, cfg.max_pixels)
    geometry = compute_geometry(image.shape[:2], cfg)
    return normalize_and_pad(resize_image(image, geometry), geometry.padded_size), geometry
