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

from interformer.polygons import (MAX_POLYGON_WORK, PolygonError, checked_polygons, clip_polygon, polygons_rle,
                                 rasterize)

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
