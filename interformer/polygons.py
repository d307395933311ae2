"""Polygon -> mask, the one way this project rasterises polygons: COCO polygons through pycocotools, clipped to
a frame around the image and within bounded work, so that a hostile coordinate (1e12, NaN) gives a clear
PolygonError or the right mask instead of a crash, an int32 wrap-around or minutes of rasterising.

Coordinates are pixel-edge coordinates (pixel (row r, col c) is the unit square [c, c+1) x [r, r+1)), as
pycocotools and Label Studio use them. Training (`interformer.training.data`), pre-annotation and evaluation
(`pipeline.polygons`, `pipeline.prompts`, `pipeline.datasets`) all rasterise here.
"""
from __future__ import annotations

import numpy as np

from .numbers import is_finite_number

__all__ = ["MAX_POLYGON_WORK", "PolygonError", "checked_polygons", "clip_polygon", "polygons_rle", "rasterize"]


class PolygonError(ValueError):
    """COCO polygons that cannot be rasterised: malformed, or too complex to rasterise within bounded memory."""


# pycocotools samples every edge at 5x the pixel resolution (~24 bytes per sample), so its memory grows with the
# perimeter, not with the image. This bound (vertices, and pixels of perimeter in the max-norm after clipping)
# keeps a rasterisation under ~1 GB and lets through every outline of a mask up to 4 megapixels, even an exact
# checkerboard (~2 * H * W pixels of edges); simplified outlines of far larger masks.
MAX_POLYGON_WORK = 1 << 23


def _finite_polygon(poly: object) -> bool:
    return isinstance(poly, (list, tuple)) and len(poly) >= 6 and len(poly) % 2 == 0 and all(
        is_finite_number(v) for v in poly)


def _clip_half_plane(xy: np.ndarray, axis: int, bound: float, keep_low: bool) -> np.ndarray:
    """Sutherland-Hodgman against one half-plane (`xy[:, axis] <= bound`, or >= with keep_low False).

    The part cut off is replaced by a walk along the line; the loop this adds lies outside the half-plane, so
    winding numbers (and even-odd parity) of every point inside it are unchanged."""
    inside = xy[:, axis] <= bound if keep_low else xy[:, axis] >= bound
    if inside.all() or len(xy) == 0:
        return xy
    crosses = inside != np.roll(inside, -1)
    p, q = xy[crosses], np.roll(xy, -1, axis=0)[crosses]
    # interpolate from the end nearer to the line (accurate even when the other one is ~1e300 away), in halves
    # so that no difference of two finite coordinates overflows
    near_p = np.abs(p[:, axis] - bound) <= np.abs(q[:, axis] - bound)
    base, other = np.where(near_p[:, None], p, q) / 2, np.where(near_p[:, None], q, p) / 2
    t = (bound / 2 - base[:, axis]) / (other[:, axis] - base[:, axis])
    cut = 2 * base + 2 * ((other - base) * t[:, None])
    cut[:, axis] = bound
    points = np.zeros((len(xy), 2, 2))
    points[:, 0] = xy
    points[crosses, 1] = cut
    keep = np.stack([inside, crosses], axis=1)
    return points[keep]


def clip_polygon(xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (k, 2) polygon clipped to [-1, W+1] x [-1, H+1]: the same region inside that frame (so the same
    pixels), with bounded coordinates. Fewer than 3 vertices left: the polygon lies outside."""
    h, w = float(size[0]), float(size[1])
    for axis, low, high in ((0, -1.0, w + 1.0), (1, -1.0, h + 1.0)):
        xy = _clip_half_plane(_clip_half_plane(xy, axis, low, False), axis, high, True)
    return xy


def _frame_margin(size: tuple[int, int]) -> float:
    """Polygons within this margin of the image are rasterised as given (bit-identical to pycocotools)."""
    return float(int(size[0]) + int(size[1]))


def checked_polygons(polygons: object, size: tuple[int, int]) -> list[list[float]]:
    """COCO polygons ready for pycocotools: validated, clipped to a frame around the image when some vertex lies
    far outside it, and within the work bound. Raises PolygonError saying what is wrong."""
    h, w = int(size[0]), int(size[1])
    if not isinstance(polygons, (list, tuple)):
        raise PolygonError(f"polygons must be a list of [x1, y1, x2, y2, ...] lists, got {type(polygons).__name__}")
    bound = MAX_POLYGON_WORK
    vertices = sum(len(p) // 2 for p in polygons if isinstance(p, (list, tuple)))
    if vertices > bound:
        raise PolygonError(f"too complex: {vertices} vertices, more than the {bound} allowed")
    margin = _frame_margin((h, w))
    out, perimeter = [], 0.0
    for poly in polygons:
        if not _finite_polygon(poly):
            raise PolygonError(f"a polygon needs at least 3 (x, y) vertices of finite numbers, got {str(poly)[:80]}")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if (xy[:, 0].min() < -margin or xy[:, 0].max() > w + margin
                or xy[:, 1].min() < -margin or xy[:, 1].max() > h + margin):
            xy = clip_polygon(xy, (h, w))
            if len(xy) < 3:
                continue
            if not np.isfinite(xy).all():
                raise PolygonError(f"coordinates too large to clip: {str(poly)[:80]}")
            poly = xy.reshape(-1).tolist()
        perimeter += float(np.abs(xy - np.roll(xy, -1, axis=0)).max(axis=1).sum())
        out.append([float(v) for v in poly])
    if perimeter > bound:
        raise PolygonError(f"too complex: a total perimeter of {perimeter:.4g} pixels within the {w}x{h} (WxH) image, "
                           f"more than the {bound} allowed")
    return out


def polygons_rle(polygons: object, size: tuple[int, int]) -> dict:
    """COCO polygons -> pycocotools RLE (counts as bytes) of their union; the one way polygons become masks."""
    from pycocotools import mask as mask_utils

    h, w = int(size[0]), int(size[1])
    kept = checked_polygons(polygons, (h, w))
    if not kept:
        return mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
    return mask_utils.merge(mask_utils.frPyObjects(kept, h, w))


def rasterize(polygons: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """COCO polygons -> bool mask, with pycocotools (the way every COCO reader decodes them), within bounded
    memory (see `checked_polygons`; PolygonError for malformed or too complex polygons)."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(polygons_rle(polygons, size)) > 0
