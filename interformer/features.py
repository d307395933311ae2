"""`ImageFeatures`: the click-independent result of `encode`, and its flat serialisation.

The feature store (LanceDB) holds one image's pyramid as one flat array plus the level shapes and
the geometry needed to map masks back to the original image. Storage dtypes (the model always computes
from fp32 tensors):
  float32   bit-exact.
  float16   2 bytes per value, within fp16 rounding.
  bfloat16  2 bytes per value, fp32's range with 8 significant bits (rounded to nearest even).
  int8      1 byte per value: per channel of each level, 8-bit codes with an fp32 scale and offset
            (x = code * scale + offset, codes spanning the channel's min..max), stored as a header of
            all scales, then all offsets (fp32), then the codes; half the bytes of fp16.
  int8sqrt  the same bytes and layout, the codes companded: code = round(255 * sqrt((x - min) / range)),
            x = code^2 * scale + offset with scale = range / 255^2. The pyramid's levels end in GELU, whose
            outputs crowd near each channel's minimum; there the steps are up to 255x finer (at the top 2x
            coarser). On the trained small model the masks' disagreement with fp32's (1 - per-click IoU) falls
            ~4x against int8's (bench/bench_engine_quality.py --storage-dtype, docs/benchmarks.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import PYRAMID_CHANNELS, PYRAMID_STRIDES, SIZE_DIVISOR

# Storage dtype -> the numpy element type of the flat array `to_flat` returns.
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int8": np.uint8,
                  "int8sqrt": np.uint8}
# The largest magnitude a storage dtype keeps finite (fp32 values above it round to inf).
# The coded dtypes store each channel's span (max - min) in fp32, which overflows beyond half of fp32's range.
_FINITE_LIMIT = {"float16": float(np.finfo(np.float16).max), "bfloat16": float(torch.finfo(torch.bfloat16).max),
                 "int8": float(np.finfo(np.float32).max) / 2, "int8sqrt": float(np.finfo(np.float32).max) / 2}
CODED = ("int8", "int8sqrt")  # the 8-bit coded dtypes: a header of per-channel scales and offsets, then codes


@dataclass(frozen=True)
class ImageGeometry:
    """Sizes that link the original image to the padded network canvas.

    original_size: (H0, W0) of the image as given.
    resized_size: (H, W) after the optional longest-side resize (== original_size when not resized).
    padded_size: (Hp, Wp), resized_size padded bottom/right to a multiple of the size divisor.
    scale: resized / original (1.0 when not resized).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    padded_size: tuple[int, int]
    scale: float = 1.0

    def __post_init__(self) -> None:
        """Refuse sizes no encoder produces: a canvas smaller than the image (masks cut short), one the /32
        pyramid cannot divide, or zero sizes (a division by zero much later)."""
        sizes = {"original_size": self.original_size, "resized_size": self.resized_size,
                 "padded_size": self.padded_size}
        for name, size in sizes.items():
            if len(size) != 2 or not all(int(v) == v and v >= 1 for v in size):
                raise ValueError(f"ImageGeometry.{name} must be two positive integers (H, W), got {size!r}")
        if any(r > p for r, p in zip(self.resized_size, self.padded_size)):
            raise ValueError(f"ImageGeometry.padded_size {self.padded_size!r} is smaller than resized_size "
                             f"{self.resized_size!r}")
        if any(v % SIZE_DIVISOR for v in self.padded_size):
            raise ValueError(f"ImageGeometry.padded_size {self.padded_size!r} must be a multiple of {SIZE_DIVISOR}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"ImageGeometry.scale must be a finite number > 0, got {self.scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_size": list(self.original_size),
            "resized_size": list(self.resized_size),
            "padded_size": list(self.padded_size),
            "scale": float(self.scale),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageGeometry":
        return cls(
            tuple(int(v) for v in d["original_size"]),
            tuple(int(v) for v in d["resized_size"]),
            tuple(int(v) for v in d["padded_size"]),
            float(d["scale"]),
        )

    @property
    def resized(self) -> bool:
        return tuple(self.resized_size) != tuple(self.original_size)


def pyramid_shapes(padded_size: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(C, h, w) of the four pyramid levels for a padded input size."""
    hp, wp = padded_size
    return [(c, hp // s, wp // s) for c, s in zip(PYRAMID_CHANNELS, PYRAMID_STRIDES)]


@dataclass
class ImageFeatures:
    """Offline features of one image: the SimpleFPN pyramid (fp32 [1, C, h, w] tensors) + geometry.

    `cache` holds click-independent tensors derived from the pyramid by a specific model (e.g. the
    keys/values of each I-MSA stage's cross-attention); it is rebuilt on demand and never stored.
    """

    pyramid: tuple[torch.Tensor, ...]
    geometry: ImageGeometry
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.pyramid) != 4:
            raise ValueError(f"expected 4 pyramid levels, got {len(self.pyramid)}")
        expected = pyramid_shapes(self.geometry.padded_size)
        for i, (t, shp) in enumerate(zip(self.pyramid, expected)):
            if tuple(t.shape) != (1, *shp):
                raise ValueError(f"pyramid level {i} has shape {tuple(t.shape)}, expected {(1, *shp)}")

    @property
    def device(self) -> torch.device:
        return self.pyramid[0].device

    def to(self, device: torch.device | str) -> "ImageFeatures":
        return ImageFeatures(tuple(p.to(device) for p in self.pyramid), self.geometry)

    @property
    def num_floats(self) -> int:
        return sum(int(p.numel()) for p in self.pyramid)

    def nbytes(self, dtype: str = "float16") -> int:
        """Bytes of the stored pyramid in the given storage dtype."""
        shapes = [list(p.shape[1:]) for p in self.pyramid]
        return flat_size(shapes, dtype) * np.dtype(_storage_dtype(dtype)).itemsize

    def to_flat(self, dtype: str = "float16") -> tuple[np.ndarray, list[list[int]]]:
        """All levels concatenated into one 1-D array (its bytes are what is stored), and the [C, h, w] shape
        of each level."""
        np_dtype = _storage_dtype(dtype)
        shapes = [list(p.shape[1:]) for p in self.pyramid]
        levels = [p.detach().to("cpu", torch.float32).contiguous() for p in self.pyramid]
        check_storable(levels, dtype)
        if dtype in CODED:
            return _quantize(levels, companded=dtype == "int8sqrt"), shapes
        if dtype == "bfloat16":
            flat = torch.cat([t.ravel() for t in levels]).to(torch.bfloat16).view(torch.int16).numpy()
            return flat.view(np.uint16), shapes
        parts = [t.numpy().ravel() for t in levels]
        return np.concatenate(parts).astype(np_dtype, copy=False), shapes

    @classmethod
    def from_flat(
        cls,
        flat: np.ndarray,
        shapes: list[list[int]] | list[tuple[int, int, int]],
        geometry: ImageGeometry,
        device: torch.device | str = "cpu",
        dtype: str | None = None,
    ) -> "ImageFeatures":
        """Inverse of `to_flat`: rebuild fp32 tensors from a flat array (float16/float32 by its numpy dtype;
        bfloat16 and int8 payloads are uint16 / uint8 arrays and need `dtype`)."""
        flat = np.asarray(flat)
        if dtype is None:
            dtype = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}.get(flat.dtype)
            if dtype is None:
                raise ValueError(f"feature array must be float16 or float32 (else name its dtype), got {flat.dtype}")
        if flat.dtype != np.dtype(_storage_dtype(dtype)):
            raise ValueError(f"a {dtype} feature array holds {np.dtype(_storage_dtype(dtype))}, got {flat.dtype}")
        values = flat_to_float32(torch.from_numpy(np.ascontiguousarray(flat)), dtype, shapes).to(device)
        return cls(tuple(levels_of(values, shapes)), geometry)


def check_storable(levels: list[torch.Tensor], dtype: str) -> None:
    """Raise ValueError when a level holds NaN/inf, or (float16) a value beyond the dtype's finite range:
    stored, it would become inf, and under int8/int8sqrt one such value turns its whole channel into NaN."""
    limit = _FINITE_LIMIT.get(dtype, math.inf)
    for i, t in enumerate(levels):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"pyramid level {i} holds NaN or inf values; such features cannot be stored "
                             f"(re-encode the image; damaged weights produce them)")
        if limit < math.inf and t.numel() and float(t.abs().max()) > limit:
            raise ValueError(f"pyramid level {i} holds values up to {float(t.abs().max()):.4g}, beyond {dtype}'s "
                             f"finite range (+-{limit:.6g}); store it as float32 or bfloat16")


def _storage_dtype(dtype: str) -> type:
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}") from None


def flat_size(shapes: list[list[int]] | list[tuple[int, int, int]], dtype: str) -> int:
    """Elements of the flat stored array for these level shapes (int8 and int8sqrt add a scale and an offset
    per channel)."""
    values = sum(int(np.prod(s)) for s in shapes)
    if dtype in CODED:
        return values + 8 * sum(int(s[0]) for s in shapes)  # two fp32 per channel, as bytes
    return values


def _quantize(levels: list[torch.Tensor], companded: bool = False) -> np.ndarray:
    """Per-channel 8-bit codes of fp32 levels [1, C, h, w]: header (scales, offsets as fp32), then codes; with
    `companded`, codes of the square root of the channel-normalised value (int8sqrt)."""
    scales, offsets, codes = [], [], []
    levels_max = 255.0 * 255.0 if companded else 255.0
    for t in levels:
        x = t.reshape(t.shape[1], -1)
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        span = hi - lo
        span = torch.where(span > 0, span, torch.ones_like(span))  # a constant channel: code 0 is exact
        u = (x - lo[:, None]) / span[:, None]
        if companded:
            u = u.clamp_(0, 1).sqrt_()
        codes.append((u * 255.0).round_().clamp_(0, 255).to(torch.uint8).ravel())
        scales.append(span / levels_max)
        offsets.append(lo)
    header = torch.cat([torch.cat(scales), torch.cat(offsets)]).numpy().view(np.uint8)
    return np.concatenate([header, torch.cat(codes).numpy()])


def flat_to_float32(flat: torch.Tensor, dtype: str, shapes: list[list[int]] | list[tuple[int, int, int]]) -> torch.Tensor:
    """A stored flat array (as a CPU tensor of its storage element type) -> one fresh 1-D fp32 tensor of all
    levels' values; raises ValueError when its size does not match the level shapes."""
    need = flat_size(shapes, dtype)
    if flat.numel() != need:
        raise ValueError(f"stored features have {flat.numel()} elements, {dtype} level shapes {shapes} need {need}")
    if dtype == "bfloat16":
        return flat.view(torch.bfloat16).to(torch.float32)
    if dtype not in CODED:
        return flat.to(torch.float32, copy=True)
    channels = sum(int(s[0]) for s in shapes)
    raw = flat.numpy()
    header = raw[: 8 * channels].view(np.float32)
    scales, offsets = header[:channels, None], header[channels:, None]
    codes = raw[8 * channels :]
    values = np.empty(codes.size, dtype=np.float32)
    offset, channel = 0, 0
    # numpy, one thread: two passes per level, three for int8sqrt (a 256-entry table lookup instead measured 10x
    # slower), without the thread hand-offs of small parallel torch ops, which on a loaded machine cost more
    # than the arithmetic.
    for c, h, w in shapes:
        c, n = int(c), int(c) * int(h) * int(w)
        out = values[offset : offset + n].reshape(c, -1)
        level = codes[offset : offset + n].reshape(c, -1)
        if dtype == "int8sqrt":  # code^2 (exact in fp32) times the scale, which holds range / 255^2
            np.multiply(level, level, out=out, dtype=np.float32)
            out *= scales[channel : channel + c]
        else:
            np.multiply(level, scales[channel : channel + c], out=out)
        out += offsets[channel : channel + c]
        offset, channel = offset + n, channel + c
    return torch.from_numpy(values)


def levels_of(values: torch.Tensor, shapes: list[list[int]] | list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Split a 1-D fp32 tensor of all levels' values into [1, C, h, w] views."""
    levels, offset = [], 0
    for shp in shapes:
        n = int(np.prod(shp))
        levels.append(values[offset : offset + n].view(1, *[int(v) for v in shp]))
        offset += n
    return levels
