"""The RITM-layout readers give exactly RITM's ground truth, for any stored mask values.

The reference below transcribes what RITM's evaluation does with a mask file (isegm/data/datasets/grabcut.py,
davis.py and DSample.gt_mask in isegm/data/sample.py): read with cv2.imread, map the values, then take
`== 1` as the object and the ignore id as -1. The readers are compared with it through real PNG files, grey
and 3-channel, over values that sit on every edge of the rules (0, 1, 2, 127, 128, 129, 255).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.datasets import MASK_RITM_DAVIS, MASK_RITM_GRABCUT, SampleRef, ritm_davis_gt, ritm_grabcut_gt

EDGE_VALUES = [0, 1, 2, 64, 127, 128, 129, 200, 254, 255]


def ritm_dsample_gt_mask(encoded: np.ndarray, object_id: int, ignore_id: int | None) -> np.ndarray:
    """DSample(encoded, objects_ids=[object_id], ignore_ids=[ignore_id]).gt_mask: (layer == id) as int32, then
    the ignore id's pixels set to -1."""
    gt = (encoded == object_id).astype(np.int32)
    if ignore_id is not None:
        gt[encoded == ignore_id] = -1
    return gt


def ritm_grabcut_reference(mask_path: str) -> np.ndarray:
    """GrabCutDataset.get_sample (also BerkeleyDataset's) followed by DSample.gt_mask."""
    m = cv2.imread(mask_path)[:, :, 0].astype(np.int32)
    m[m == 128] = -1
    m[m > 128] = 1
    return ritm_dsample_gt_mask(m, 1, -1)


def ritm_davis_reference(mask_path: str) -> np.ndarray:
    """DavisDataset.get_sample (also COCO_MVal's, which uses the DAVIS layout) followed by DSample.gt_mask."""
    m = np.max(cv2.imread(mask_path).astype(np.int32), axis=2)
    m[m > 0] = 1
    return ritm_dsample_gt_mask(m, 1, None)


def mask_arrays() -> st.SearchStrategy[np.ndarray]:
    """uint8 masks of 1..12 x 1..12 pixels, grey or 3-channel, mostly edge values, some of any value."""
    values = st.one_of(st.sampled_from(EDGE_VALUES), st.integers(0, 255))
    shape = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
        lambda hw: st.sampled_from([hw, (*hw, 3)]))
    return shape.flatmap(lambda s: arrays(np.uint8, s, elements=values))


def loaded_gt(mask: np.ndarray, mask_format: str, folder: Path) -> tuple[np.ndarray, str]:
    """The reader's ground truth of `mask` stored as a PNG (with a same-size image), and the mask's path."""
    image_path, mask_path = folder / "im.png", folder / "im_mask.png"
    h, w = mask.shape[:2]
    assert cv2.imwrite(str(image_path), np.zeros((h, w, 3), np.uint8))
    assert cv2.imwrite(str(mask_path), mask)
    ref = SampleRef("D", "im", "im.png", str(image_path), mask_format, str(mask_path))
    return ref.load().gt, str(mask_path)


@settings(max_examples=150, deadline=None)
@given(mask=mask_arrays())
def test_grabcut_reader_equals_ritms_ground_truth(mask):
    with tempfile.TemporaryDirectory() as d:
        gt, path = loaded_gt(mask, MASK_RITM_GRABCUT, Path(d))
        expected = ritm_grabcut_reference(path)
        direct = ritm_grabcut_gt(cv2.imread(path))
    assert gt.dtype == np.int8
    np.testing.assert_array_equal(gt, expected)
    np.testing.assert_array_equal(direct, expected)


@settings(max_examples=100, deadline=None)
@given(mask=mask_arrays())
def test_davis_reader_equals_ritms_ground_truth(mask):
    with tempfile.TemporaryDirectory() as d:
        gt, path = loaded_gt(mask, MASK_RITM_DAVIS, Path(d))
        expected = ritm_davis_reference(path)
        direct = ritm_davis_gt(cv2.imread(path))
    assert gt.dtype == np.int8
    np.testing.assert_array_equal(gt, expected)
    np.testing.assert_array_equal(direct, expected)


def test_a_zero_one_mask_in_grabcut_layout_is_the_object_ritm_sees():
    """A 0/1 PNG (a common way binary masks are saved) is object where 1, as in RITM, not an empty sample."""
    mask = np.zeros((6, 7), np.uint8)
    mask[2:5, 1:4] = 1
    with tempfile.TemporaryDirectory() as d:
        gt, _ = loaded_gt(mask, MASK_RITM_GRABCUT, Path(d))
    np.testing.assert_array_equal(gt, mask.astype(np.int8))
