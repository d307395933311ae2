"""The two pixel grids of a photo with an EXIF orientation tag, and exact maps between them. Pure.

A camera stores the sensor's grid (the STORED grid: what the encoder, training, evaluation and COCO files use)
and a tag (1..8, the EXIF standard's) saying how to turn it for display. Browsers, and so Label Studio, show the
DISPLAYED grid: the stored one with the tag applied, as Pillow's `ImageOps.exif_transpose` makes it. Label
Studio's coordinates are in the displayed grid, so the Label Studio boundary (the ML backend and bulk
pre-annotation) maps prompts displayed -> stored before the model sees them and masks stored -> displayed before
they go back. Every map here is a pixel permutation (a flip, a transpose or a quarter turn): nothing is
resampled, and each map is the exact inverse of its counterpart (tests/test_exif_orientation.py checks them
against Pillow).

  tag  displayed grid, from the stored one          tag  displayed grid, from the stored one
  1    as stored                                    5    transposed (mirrored along the main diagonal)
  2    mirrored left-right                          6    turned 90 degrees clockwise
  3    turned 180 degrees                           7    transversed (mirrored along the anti-diagonal)
  4    mirrored top-bottom                          8    turned 90 degrees counter-clockwise
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from interformer.clicks import Click, Roi

IDENTITY = 1
TAGS = tuple(range(1, 9))
SWAPS_AXES = frozenset({5, 6, 7, 8})  # tags whose displayed grid is the stored one with height and width swapped


def normalize_tag(value: Any) -> int:
    """The orientation a browser applies for an EXIF Orientation value: 1..8 as given, anything else (absent,
    0, 9, a string, a tuple) 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return IDENTITY
    return int(value) if 1 <= int(value) <= 8 else IDENTITY


def displayed_size(stored_size: tuple[int, int], tag: int) -> tuple[int, int]:
    """(H, W) of the displayed grid of an image stored at `stored_size` (H, W) with orientation `tag`."""
    h, w = (int(v) for v in stored_size)
    return (w, h) if _checked(tag) in SWAPS_AXES else (h, w)


def _checked(tag: int) -> int:
    if isinstance(tag, bool) or tag not in TAGS:
        raise ValueError(f"EXIF orientation must be one of 1..8, got {tag!r} (normalize_tag reads a raw value)")
    return int(tag)


def _to_stored(tag: int, row: int, col: int, h: int, w: int) -> tuple[int, int]:
    """The stored pixel shown at displayed pixel (row, col); (h, w) is the STORED size."""
    return {
        1: (row, col),
        2: (row, w - 1 - col),
        3: (h - 1 - row, w - 1 - col),
        4: (h - 1 - row, col),
        5: (col, row),
        6: (h - 1 - col, row),
        7: (h - 1 - col, w - 1 - row),
        8: (col, w - 1 - row),
    }[tag]


def _to_displayed(tag: int, row: int, col: int, h: int, w: int) -> tuple[int, int]:
    """The displayed pixel that shows stored pixel (row, col); (h, w) is the STORED size."""
    return {
        1: (row, col),
        2: (row, w - 1 - col),
        3: (h - 1 - row, w - 1 - col),
        4: (h - 1 - row, col),
        5: (col, row),
        6: (col, h - 1 - row),
        7: (w - 1 - col, h - 1 - row),
        8: (w - 1 - col, row),
    }[tag]


def mask_to_displayed(mask: np.ndarray, tag: int) -> np.ndarray:
    """A stored-grid array (H, W, ...) as the displayed grid shows it (a contiguous copy for tags other than 1)."""
    tag = _checked(tag)
    if tag == IDENTITY:
        return mask
    out = {
        2: lambda m: m[:, ::-1],
        3: lambda m: m[::-1, ::-1],
        4: lambda m: m[::-1],
        5: lambda m: m.swapaxes(0, 1),
        6: lambda m: np.rot90(m, -1),
        7: lambda m: m[::-1, ::-1].swapaxes(0, 1),
        8: lambda m: np.rot90(m, 1),
    }[tag](mask)
    return np.ascontiguousarray(out)


def mask_to_stored(mask: np.ndarray, tag: int) -> np.ndarray:
    """A displayed-grid array (H, W, ...) in the stored grid: the inverse of `mask_to_displayed`."""
    tag = _checked(tag)
    inverse = {6: 8, 8: 6}.get(tag, tag)  # the other tags are their own inverse
    return mask_to_displayed(mask, inverse)


@dataclass(frozen=True)
class Orientation:
    """One stored image's orientation: its stored size (H, W) and tag, and the maps between its two grids.

    Points are pixel indices (row, col); boxes are (left, up, right, bottom) with exclusive right/bottom, as
    `interformer.clicks.Roi`; a box maps to the box of its mapped corner pixels, which holds exactly the mapped
    pixels of the box."""

    stored_size: tuple[int, int]
    tag: int = IDENTITY

    def __post_init__(self) -> None:
        _checked(self.tag)

    @property
    def identity(self) -> bool:
        return self.tag == IDENTITY

    @property
    def displayed_size(self) -> tuple[int, int]:
        return displayed_size(self.stored_size, self.tag)

    def point_to_stored(self, row: int, col: int) -> tuple[int, int]:
        """The stored pixel of displayed pixel (row, col); ValueError outside the displayed grid."""
        self._inside(row, col, self.displayed_size, "displayed")
        return _to_stored(self.tag, int(row), int(col), *self.stored_size)

    def point_to_displayed(self, row: int, col: int) -> tuple[int, int]:
        """The displayed pixel of stored pixel (row, col); ValueError outside the stored grid."""
        self._inside(row, col, self.stored_size, "stored")
        return _to_displayed(self.tag, int(row), int(col), *self.stored_size)

    def clicks_to_stored(self, clicks: Iterable[Click]) -> tuple[Click, ...]:
        return tuple(Click(*self.point_to_stored(c.row, c.col), c.positive) for c in clicks)

    def clicks_to_displayed(self, clicks: Iterable[Click]) -> tuple[Click, ...]:
        return tuple(Click(*self.point_to_displayed(c.row, c.col), c.positive) for c in clicks)

    def box_to_stored(self, box: Roi | None) -> Roi | None:
        """A displayed-grid box in the stored grid (None stays None)."""
        return None if box is None else self._box(box, self.point_to_stored)

    def box_to_displayed(self, box: Roi | None) -> Roi | None:
        """A stored-grid box in the displayed grid (None stays None)."""
        return None if box is None else self._box(box, self.point_to_displayed)

    def xy_to_displayed(self, xy: np.ndarray) -> np.ndarray:
        """(k, 2) points (x, y) in pixel-edge coordinates of the stored grid (x in 0..W, y in 0..H: polygon
        vertices, as COCO writes them) -> the same points of the displayed grid. A stored pixel's square maps
        onto its displayed pixel's square, so a polygon maps onto the displayed polygon of the same pixels."""
        h, w = self.stored_size
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        x, y = xy[:, 0], xy[:, 1]
        mapped = {1: (x, y), 2: (w - x, y), 3: (w - x, h - y), 4: (x, h - y),
                  5: (y, x), 6: (h - y, x), 7: (h - y, w - x), 8: (y, w - x)}[self.tag]
        return np.stack(mapped, axis=1)

    def mask_to_stored(self, mask: np.ndarray) -> np.ndarray:
        self._shaped(mask, self.displayed_size, "displayed")
        return mask_to_stored(mask, self.tag)

    def mask_to_displayed(self, mask: np.ndarray) -> np.ndarray:
        self._shaped(mask, self.stored_size, "stored")
        return mask_to_displayed(mask, self.tag)

    @staticmethod
    def _box(box: Roi, point) -> Roi:
        left, up, right, bottom = (int(v) for v in box)
        if right <= left or bottom <= up:
            raise ValueError(f"box {tuple(box)} has no pixels")
        corners = (point(up, left), point(bottom - 1, right - 1))
        rows, cols = sorted(c[0] for c in corners), sorted(c[1] for c in corners)
        return (cols[0], rows[0], cols[1] + 1, rows[1] + 1)

    @staticmethod
    def _inside(row: int, col: int, size: tuple[int, int], grid: str) -> None:
        if not (0 <= row < size[0] and 0 <= col < size[1]):
            raise ValueError(f"pixel ({row}, {col}) is outside the {grid} grid of {size[1]}x{size[0]} (WxH)")

    @staticmethod
    def _shaped(mask: np.ndarray, size: tuple[int, int], grid: str) -> None:
        if tuple(mask.shape[:2]) != tuple(size):
            raise ValueError(f"mask of shape {mask.shape[:2]} is not on the {grid} grid {tuple(size)} (H, W)")
