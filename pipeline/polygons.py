"""Binary mask -> polygons: COCO `segmentation` polygons and Label Studio `polygonlabels` values.

Coordinates are pixel-edge coordinates: pixel (row r, col c) is the unit square [c, c+1) x [r, r+1), so
a polygon around the pixels' outer edges encloses exactly them. This is how pycocotools rasterises
polygons (`frPyObjects` -> `decode`) and how Label Studio maps points in percent of the width/height.
OpenCV traces contours through pixel centres, which loses half a pixel on every side; tracing the mask
upsampled 2x and mapping each contour coordinate u to ceil(u / 2) gives the pixel-edge outline instead
(exact: every foreground run starts at an even and ends at an odd index of the upsampled mask).

Holes: COCO polygons are unioned, so a polygon list cannot cut a hole, and a Label Studio region is a
single polygon. Each hole is therefore joined to its outer ring by a zero-width bridge (the ring walks
to the hole, around it, and back along the same segment). Under both the even-odd rule (pycocotools)
and the non-zero rule (canvas rendering: OpenCV traces holes against the outer orientation) the
bridge cancels out and the hole stays empty. Every ring is simplified on its own, before bridging, so
the two walks of a bridge stay identical. One polygon per outer component; an island inside a hole is
its own component. Simplification (Douglas-Peucker, `tolerance` pixels) costs area accuracy, most on
thin and small objects, so `MaskPolygons.iou` reports the IoU of the rasterised polygons against the
mask they came from, and a mask below `min_iou` is simplified again at half the tolerance (down to no
simplification, which is exact). At the defaults (1 px, 0.98) GrabCut / Berkeley objects average
~140 vertices and every one reaches IoU >= 0.98.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_TOLERANCE = 1.0  # pixels (Douglas-Peucker); the most a mask is simplified
DEFAULT_MIN_IOU = 0.98  # below this IoU against the mask, the tolerance is halved (down to exact polygons)
_MIN_TOLERANCE = 0.25  # below this, the next step is no simplification at all

__all__ = ["DEFAULT_MIN_IOU", "DEFAULT_TOLERANCE", "MaskPolygons", "PolygonError", "checked_polygons",
           "clip_polygon", "coco_segmentation", "mask_to_polygons", "MAX_POLYGON_WORK", "polygons_rle", "rasterize"]


@dataclass(frozen=True, eq=False)
class MaskPolygons:
    """Polygons of one mask.

    polygons: one (k, 2) float64 array of (x, y) pixel-edge coordinates per outer component, holes
              bridged in; k >= 3.
    size: (height, width) of the mask.
    iou: IoU of the rasterised polygons against the source mask (1.0 for an empty mask, which has none).
    holes: number of holes bridged into the polygons.
    tolerance: the simplification tolerance used (pixels).
    """

    polygons: list[np.ndarray]
    size: tuple[int, int]
    iou: float
    holes: int
    tolerance: float

    def coco(self) -> list[list[float]]:
        """COCO `segmentation`: [[x1, y1, x2, y2, ...], ...] in pixels."""
        return [p.reshape(-1).astype(float).tolist() for p in self.polygons]

    def label_studio_points(self) -> list[list[list[float]]]:
        """Per polygon, Label Studio `points`: [[x, y], ...] in percent of the image width / height."""
        h, w = self.size
        size = np.array([w, h], dtype=np.float64)
        return [np.clip(p * 100.0 / size, 0.0, 100.0).tolist() for p in self.polygons]


def _check_mask(mask: np.ndarray) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask array, got {getattr(mask, 'shape', type(mask).__name__)}")
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"expected a bool or integer mask, got dtype {mask.dtype}")
    if 0 in mask.shape:
        raise ValueError(f"mask is empty: shape {mask.shape}")
    return mask.astype(bool)


def _edge_rings(mask: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Pixel-edge rings (int (k, 2) x, y) of outer boundaries and holes, and each ring's parent (-1: outer)."""
    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), dtype=np.uint8))
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return [], []
    rings = [(c.reshape(-1, 2) + 1) // 2 for c in contours]
    return rings, [int(p) for p in hierarchy[0][:, 3]]


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    ring = _drop_repeats(ring)
    if tolerance > 0 and len(ring) > 3:
        simple = cv2.approxPolyDP(ring.reshape(-1, 1, 2).astype(np.int32), float(tolerance), True).reshape(-1, 2)
        if len(_drop_repeats(simple)) >= 3:
            return _drop_repeats(simple)
    return ring


def _drop_repeats(ring: np.ndarray) -> np.ndarray:
    """Remove consecutive duplicate vertices (the 2x trace maps neighbouring pixels onto one corner)."""
    if len(ring) < 2:
        return ring
    keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)
    return ring[keep] if keep.any() else ring[:1]


def _bridge(outer: np.ndarray, holes: list[np.ndarray]) -> np.ndarray:
    """One ring that walks the outer ring and, from its vertex nearest to each hole, around that hole and back."""
    inserts: dict[int, list[np.ndarray]] = {}
    for hole in holes:
        d = ((outer[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
        k, m = np.unravel_index(int(np.argmin(d)), d.shape)
        loop = np.concatenate([np.roll(hole, -m, axis=0), hole[m:m + 1], outer[k:k + 1]])
        inserts.setdefault(int(k), []).append(loop)
    parts = []
    for i in range(len(outer)):
        parts.append(outer[i:i + 1])
        parts.extend(inserts.get(i, []))
    return np.concatenate(parts)


class PolygonError(ValueError):
    """COCO polygons that cannot be rasterised: malformed, or too complex to rasterise within bounded memory."""


# pycocotools samples every edge at 5x the pixel resolution (~24 bytes per sample), so its memory grows with the
# perimeter, not with the image. This bound (vertices, and pixels of perimeter in the max-norm after clipping)
# keeps a rasterisation under ~1 GB and lets through every outline of a mask up to 4 megapixels, even an exact
# checkerboard (~2 * H * W pixels of edges); simplified outlines of far larger masks.
MAX_POLYGON_WORK = 1 << 23


def _finite_polygon(poly: object) -> bool:
    return isinstance(poly, (list, tuple)) and len(poly) >= 6 and len(poly) % 2 == 0 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in poly)


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


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def mask_to_polygons(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                     min_iou: float | None = DEFAULT_MIN_IOU) -> MaskPolygons:
    """Polygons of a binary mask (bool or 0/non-zero), simplified to within `tolerance` pixels.

    With `min_iou`, a mask whose simplified polygons fall below that IoU is simplified again at half the
    tolerance, down to 0 (no simplification: exact, IoU 1.0); `min_iou=None` keeps `tolerance` as given.
    """
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number of pixels >= 0, got {tolerance}")
    if min_iou is not None and not 0.0 <= min_iou <= 1.0:
        raise ValueError(f"min_iou must lie in [0, 1], got {min_iou}")
    mask = _check_mask(mask)
    rings, parents = _edge_rings(mask)
    while True:
        result = _polygons(mask, rings, parents, tolerance)
        if min_iou is None or result.iou >= min_iou or tolerance == 0:
            return result
        tolerance = tolerance / 2 if tolerance > _MIN_TOLERANCE else 0.0


def _polygons(mask: np.ndarray, rings: list[np.ndarray], parents: list[int], tolerance: float) -> MaskPolygons:
    simple = [_simplify(r, tolerance) for r in rings]
    holes_of: dict[int, list[np.ndarray]] = {}
    for i, parent in enumerate(parents):
        if parent >= 0:
            holes_of.setdefault(parent, []).append(simple[i])
    polygons = [_bridge(simple[i], holes_of.get(i, [])).astype(np.float64)
                for i, parent in enumerate(parents) if parent < 0]
    coco = [p.reshape(-1).tolist() for p in polygons]
    iou = _iou(rasterize(coco, mask.shape), mask)
    return MaskPolygons(polygons, mask.shape, iou, sum(len(v) for v in holes_of.values()), tolerance)


def coco_segmentation(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                      min_iou: float | None = DEFAULT_MIN_IOU) -> tuple[list[list[float]], float]:
    """COCO `segmentation` polygons of a mask and their IoU against it (see `mask_to_polygons`)."""
    polys = mask_to_polygons(mask, tolerance, min_iou)
    return polys.coco(), polys.iou
