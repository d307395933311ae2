"""`ImageFeatures`: the click-independent result of `encode`, and its flat serialisation.

The feature store (LanceDB) holds one image's pyramid as one flat array plus the level shapes and
the geometry needed to map masks back to the original image. fp32 round-trips bit-exactly; fp16
round-trips within fp16 rounding (the model always computes in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import PYRAMID_CHANNELS, PYRAMID_STRIDES

STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


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
        return self.num_floats * np.dtype(STORAGE_DTYPES[dtype]).itemsize

    def to_flat(self, dtype: str = "float16") -> tuple[np.ndarray, list[list[int]]]:
        """All levels concatenated into one 1-D array of `dtype`, and the [C, h, w] shape of each level."""
        np_dtype = _storage_dtype(dtype)
        parts = [p.detach().to("cpu", torch.float32).contiguous().numpy().ravel() for p in self.pyramid]
        flat = np.concatenate(parts).astype(np_dtype, copy=False)
        return flat, [list(p.shape[1:]) for p in self.pyramid]

    @classmethod
    def from_flat(
        cls,
        flat: np.ndarray,
        shapes: list[list[int]] | list[tuple[int, int, int]],
        geometry: ImageGeometry,
        device: torch.device | str = "cpu",
    ) -> "ImageFeatures":
        """Inverse of `to_flat`: rebuild fp32 tensors from a flat fp16/fp32 array."""
        flat = np.asarray(flat)
        if flat.dtype not in (np.float16, np.float32):
            raise ValueError(f"feature array must be float16 or float32, got {flat.dtype}")
        sizes = [int(np.prod(s)) for s in shapes]
        if sum(sizes) != flat.size:
            raise ValueError(f"feature array has {flat.size} values, shapes {shapes} need {sum(sizes)}")
        levels = []
        offset = 0
        for shp, n in zip(shapes, sizes):
            arr = flat[offset : offset + n].reshape(1, *[int(v) for v in shp])
            offset += n
            levels.append(torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=torch.float32))
        return cls(tuple(levels), geometry)


def _storage_dtype(dtype: str) -> type:
    try:
        return STORAGE_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}") from None
