"""Every reader of JSON numbers takes ANY JSON value where a number belongs and answers with its own clear error
(or a result), never a crash: Python's json gives ints of any size (beyond int64, beyond float range), NaN and
infinities, and bools. One such value in one annotation once stopped a whole pre-annotation run with a
TypeError from `np.isfinite` (a vertex of 10**30 in a polygon).
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from interformer.numbers import is_finite_number
from interformer.polygons import PolygonError, checked_polygons
from interformer.predictor import InvalidClickError, check_box
from pipeline.datasets import DatasetError, check_segmentation
from pipeline.prompts import PromptFileError, coco_prompts

SIZE = (40, 60)
hostile = st.one_of(
    st.integers(min_value=-(10 ** 400), max_value=10 ** 400),
    st.sampled_from([10 ** 30, -(10 ** 30), 2 ** 63, 2 ** 64, 10 ** 309, True, False, None, "5", [], {}]),
    st.floats(allow_nan=True, allow_infinity=True),
)

BASE = {
    "images": [{"id": 1, "file_name": "a.png", "height": SIZE[0], "width": SIZE[1]}],
    "categories": [{"id": 1, "name": "object"}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20],
                     "segmentation": [[5, 5, 25, 5, 25, 25, 5, 25]], "point_coords": [[10, 10]],
                     "keypoints": [10, 10, 2]}],
}
SLOTS = [("bbox", i) for i in range(4)] + [("segmentation", 0, i) for i in range(8)] + [
    ("point_coords", 0, i) for i in range(2)] + [("keypoints", i) for i in range(3)] + [("area",)]


def _with(value, slot):
    doc = copy.deepcopy(BASE)
    target = doc["annotations"][0]
    for key in slot[:-1]:
        target = target[key]
    target[slot[-1]] = value
    return doc


@pytest.mark.parametrize("value, expected", [
    (0, True), (-3, True), (2.5, True), (2 ** 64, True), (10 ** 30, True), (10 ** 308, True), (10 ** 309, False),
    (-(10 ** 400), False), (float("nan"), False), (float("inf"), False), (True, False), (None, False), ("5", False),
])
def test_the_one_number_check(value, expected):
    assert is_finite_number(value) is expected


@settings(max_examples=300, deadline=None)
@given(value=hostile, slot=st.sampled_from(SLOTS), use=st.sampled_from(["auto", "box", "mask", "points"]))
@example(value=10 ** 30, slot=("segmentation", 0, 0), use="mask")
@example(value=10 ** 30, slot=("bbox", 2), use="box")
def test_a_prompt_file_with_any_value_in_a_number_slot_is_read_with_problems_not_a_crash(value, slot, use):
    try:
        prompts = coco_prompts(_with(value, slot), use=use)
    except PromptFileError:
        return
    assert len(prompts.images) + len(prompts.problems) >= 1


@settings(max_examples=200, deadline=None)
@given(value=hostile, i=st.integers(0, 7))
@example(value=10 ** 30, i=0)
def test_polygons_and_segmentations_refuse_any_bad_number_with_their_own_error(value, i):
    poly = [5, 5, 25, 5, 25, 25, 5, 25]
    poly[i] = value
    for check, error in ((checked_polygons, PolygonError), (check_segmentation, DatasetError)):
        try:
            check([poly], SIZE)
        except error:
            pass


@given(value=hostile, i=st.integers(0, 3))
@example(value=10 ** 400, i=2)
def test_a_zoom_in_box_refuses_any_bad_number_with_invalid_click_error(value, i):
    box = [1, 1, 30, 30]
    box[i] = value
    try:
        check_box(box, SIZE)
    except InvalidClickError:
        pass


def test_the_audit_cases():
    """10**30 is a finite coordinate (the polygon is clipped to the image); 10**400 is no number: a problem."""
    assert len(coco_prompts(_with(10 ** 30, ("segmentation", 0, 0)), use="mask").images) == 1
    refused = coco_prompts(_with(10 ** 400, ("segmentation", 0, 0)), use="mask")
    assert [p.reason for p in refused.problems] and not refused.images
    with pytest.raises(PolygonError):
        checked_polygons([[10 ** 400, 1, 5, 5, 10, 1]], SIZE)
