"""Mask -> polygons (pipeline/polygons.py): exact pixel-edge outlines, holes, simplification, IoU."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from matplotlib.path import Path as MplPath
from pycocotools import mask as mask_utils

from connectors.protocol import Prompt, polygon_results
from pipeline.datasets import berkeley, grabcut
from pipeline.polygons import DEFAULT_MIN_IOU, coco_segmentation, mask_to_polygons


def _decode(segmentation: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """What a COCO reader gets back (pycocotools frPyObjects -> merge -> decode)."""
    h, w = size
    if not segmentation:
        return np.zeros((h, w), dtype=bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))) > 0


def _nonzero_fill(polygons: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Pixel centres inside any polygon under the non-zero winding rule (how a canvas fills a path).

    The centres are nudged by a tiny irrational-ish offset: a hole's zero-width bridge may run exactly through
    a pixel centre, where "inside" is a boundary convention; a canvas covers no area there."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([xx.ravel() + 0.5 + 1.3e-4, yy.ravel() + 0.5 + 0.7e-4], axis=1)
    out = np.zeros(h * w, dtype=bool)
    for p in polygons:
        out |= MplPath(np.vstack([p, p[:1]]), closed=True).contains_points(centres)
    return out.reshape(h, w)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def _check(mask: np.ndarray, **kw) -> None:
    polys = mask_to_polygons(mask, **kw)
    h, w = mask.shape
    for p in polys.polygons:
        assert p.ndim == 2 and p.shape[1] == 2 and len(p) >= 3
        assert (p[:, 0] >= 0).all() and (p[:, 0] <= w).all() and (p[:, 1] >= 0).all() and (p[:, 1] <= h).all()
    decoded = _decode(polys.coco(), mask.shape)
    assert polys.iou == pytest.approx(_iou(decoded, mask))
    if kw.get("min_iou", DEFAULT_MIN_IOU) is not None:
        assert polys.iou >= kw.get("min_iou", DEFAULT_MIN_IOU)
    if polys.tolerance == 0:
        assert np.array_equal(decoded, mask)  # exact under the even-odd rule of pycocotools ...
        assert np.array_equal(_nonzero_fill(polys.polygons, mask.shape), mask)  # ... and the non-zero rule
    prompt = Prompt(clicks=(), label="Object", brush_name="label", image_name="image", original_size=(h, w),
                    output_type="polygonlabels")
    regions = polygon_results(polys.label_studio_points(), prompt, score=0.5)
    assert len(regions) == len(polys.polygons)
    for region, points in zip(regions, polys.label_studio_points()):
        assert region["type"] == "polygonlabels" and region["value"]["points"] == points
        assert region["original_width"] == w and region["original_height"] == h
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in points)


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_exact_polygons_of_any_mask(mask):
    _check(mask, tolerance=0.0, min_iou=None)


@settings(max_examples=150, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))),
       st.sampled_from([0.5, 1.0, 2.0, 5.0]), st.sampled_from([None, 0.9, DEFAULT_MIN_IOU, 1.0]))
def test_simplified_polygons_are_valid_and_report_their_iou(mask, tolerance, min_iou):
    _check(mask, tolerance=tolerance, min_iou=min_iou)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_degenerate_masks(h, w, data):
    empty = np.zeros((h, w), dtype=bool)
    polys = mask_to_polygons(empty)
    assert polys.polygons == [] and polys.iou == 1.0 and polys.label_studio_points() == []
    r, c = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    one = empty.copy()
    one[r, c] = True
    polys = mask_to_polygons(one)
    assert len(polys.polygons) == 1 and polys.iou == 1.0
    assert sorted(map(tuple, polys.polygons[0].tolist())) == [(c, r), (c, r + 1), (c + 1, r), (c + 1, r + 1)]
    full = ~empty  # touches every border
    polys = mask_to_polygons(full)
    assert polys.iou == 1.0 and len(polys.polygons) == 1
    assert np.array_equal(np.sort(np.unique(polys.polygons[0], axis=0), axis=0)[[0, -1]], [[0, 0], [w, h]])
    checker = (np.add.outer(np.arange(h), np.arange(w)) % 2 == 0)  # many 8-connected pixels, pinched corners
    _check(checker)
    spaced = np.zeros((h, w), dtype=bool)
    spaced[::2, ::2] = True  # many separate components
    polys = mask_to_polygons(spaced)
    assert len(polys.polygons) == spaced.sum() and polys.iou == 1.0
    _check(spaced)


def test_holes_are_bridged_and_stay_empty():
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:35, 5:45] = True
    mask[10:20, 10:20] = False  # two holes
    mask[22:30, 30:40] = False
    mask[25:27, 33:36] = True  # an island inside the second hole
    polys = mask_to_polygons(mask, tolerance=0.0, min_iou=None)
    assert polys.holes == 2 and len(polys.polygons) == 2  # the ring with both holes + the island
    _check(mask, tolerance=0.0, min_iou=None)
    _check(mask)


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((3, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="dtype"):
        mask_to_polygons(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        mask_to_polygons(np.zeros((0, 3), dtype=bool))
    with pytest.raises(ValueError, match="tolerance"):
        mask_to_polygons(np.ones((3, 3), dtype=bool), tolerance=-1)
    with pytest.raises(ValueError, match="min_iou"):
        mask_to_polygons(np.ones((3, 3), dtype=bool), min_iou=1.5)


@pytest.mark.parametrize("name, load", [("GrabCut", grabcut), ("Berkeley", berkeley)])
def test_benchmark_objects_reach_the_iou_floor_at_the_default_tolerance(shared_dir, name, load):
    refs = load(shared_dir / "data" / name)
    vertices, holes = [], 0
    for ref in refs:
        gt = ref.load().gt == 1
        segmentation, iou = coco_segmentation(gt)
        decoded = _decode(segmentation, gt.shape)
        assert iou == pytest.approx(_iou(decoded, gt)) and iou >= 0.98, ref.sample_id
        vertices.append(sum(len(p) // 2 for p in segmentation))
        holes += mask_to_polygons(gt).holes > 0
    assert len(refs) >= 50 and holes > 0  # the sets include objects with holes
    assert np.mean(vertices) < 400  # simplified: far fewer vertices than the pixel outline
