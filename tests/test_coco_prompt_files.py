"""Hostile COCO prompt files (pipeline/prompts.py): every input gives jobs + problems or a PromptFileError, job
keys are unique, no annotation is lost without a problem, and an RLE is used only when it covers the image."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.prompts import (
    BAD_IMAGE_ENTRY,
    BAD_SEGMENTATION,
    DUPLICATE_ID,
    MISSING_IMAGE_ENTRY,
    PromptError,
    PromptFileError,
    coco_prompts,
    decode_rle,
    encode_mask,
    read_coco_file,
    rle_area,
    segmentation_to_rle,
)

H, W = 40, 60


def base_doc() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                   {"id": 2, "file_name": "b.png", "height": H, "width": W}],
        "categories": [{"id": 1, "name": "cup"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 10]},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [[20, 10, 32, 10, 32, 22, 20, 22]]},
            {"id": 12, "image_id": 2, "category_id": 1, "points": [[5, 6], [30, 20]], "point_labels": [1, 0]},
            {"id": 13, "image_id": 2, "category_id": 2, "keypoints": [25, 15, 2, 0, 0, 0]},
            {"id": 14, "image_id": 2, "category_id": 1, "segmentation": encode_mask(np.eye(H, W, dtype=bool))},
            {"id": 15, "image_id": 1, "category_id": 1,
             "segmentation": {"size": [H, W], "counts": [100, 20, H * W - 120]}},
        ],
    }


def annotation_key(n: int, ann) -> str:
    ident = ann.get("id") if isinstance(ann, dict) else None
    ok = (isinstance(ident, int) and not isinstance(ident, bool)) or isinstance(ident, str)
    return f"coco:{ident}" if ok else f"coco:#{n}"


def check_invariants(doc: dict, **kw) -> None:
    """coco_prompts returns or raises PromptFileError; job keys and object keys are unique; each annotation is an
    object or a problem; every object's size is its job's."""
    try:
        ps = coco_prompts(doc, image_root="/images", **kw)
    except PromptFileError as e:
        assert str(e)
        return
    keys = [j.key for j in ps.images]
    assert len(keys) == len(set(keys))
    objects = [o.key for j in ps.images for o in j.objects]
    assert len(objects) == len(set(objects))
    accounted = set(objects) | {p.key for p in ps.problems}
    for n, ann in enumerate(doc["annotations"]):
        assert annotation_key(n, ann) in accounted
    for j in ps.images:
        assert all(o.size == j.size and o.image_id == j.image_id for o in j.objects)
        for o in j.objects:
            if o.coarse is not None:
                assert decode_rle(o.coarse).shape == j.size and rle_area(o.coarse) == decode_rle(o.coarse).sum()
    assert all(p.reason and p.detail for p in ps.problems)
    json.dumps([p.to_dict() for p in ps.problems])


# ------------------------------------------------------------------------------------------------------------
# Mutations of a valid file: replace any value by one of another JSON type, drop keys, repeat entries

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10 ** 20), 10 ** 400) | st.floats(allow_nan=True)
    | st.sampled_from([math.inf, -math.inf, 1e300, -1e300, 0, -1, 1, 2, 10]) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _parent(doc, path):
    node = doc
    for step in path[:-1]:
        node = node[step]
    return node


@st.composite
def mutated_docs(draw):
    doc = base_doc()
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        action = draw(st.sampled_from(["replace", "replace", "drop", "repeat", "repeat_changed"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, list):
            twin = copy.deepcopy(parent[path[-1]])
            if action == "repeat_changed" and isinstance(twin, dict) and twin:
                twin[draw(st.sampled_from(sorted(twin, key=str)))] = draw(json_values)
            parent.insert(draw(st.integers(0, len(parent))), twin)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_docs(), st.sampled_from(["file_name", "id"]), st.sampled_from(["auto", "box", "mask", "points"]))
def test_a_mutated_prompt_file_gives_jobs_and_problems_or_a_prompt_file_error(doc, id_from, use):
    if not isinstance(doc.get("annotations"), list):
        with pytest.raises(PromptFileError):
            coco_prompts(doc)
        return
    check_invariants(doc, id_from=id_from, use=use)


@st.composite
def repeated_entries(draw):
    """Files whose image entries repeat ids and file names, with objects on every entry."""
    names = ["a.png", "b.png", "c.png"]
    n = draw(st.integers(1, 6))
    images = [{"id": draw(st.integers(1, 3)), "file_name": draw(st.sampled_from(names)),
               "height": H, "width": draw(st.sampled_from([W, W, W + 1]))} for _ in range(n)]
    anns = [{"id": 100 + k, "image_id": draw(st.integers(1, 4)), "category_id": 1,
             "bbox": [draw(st.integers(0, 30)), 2, 10, 10]} for k in range(draw(st.integers(1, 8)))]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cup"}]}


@settings(max_examples=200, deadline=None)
@given(repeated_entries(), st.sampled_from(["file_name", "id"]))
def test_job_keys_are_unique_and_no_object_is_lost_when_entries_repeat(doc, id_from):
    check_invariants(doc, id_from=id_from)
    ps = coco_prompts(doc, id_from=id_from)
    for j in ps.images:
        for o in j.objects:
            ann = next(a for a in doc["annotations"] if f"coco:{a['id']}" == o.key)
            assert o.source_image_id == ann["image_id"]


# ------------------------------------------------------------------------------------------------------------
# The reported cases


def test_entries_naming_one_file_share_one_job_and_each_object_keeps_its_coco_image_id():
    doc = {"images": [{"id": 1, "file_name": "coffee.jpg", "height": 400, "width": 600},
                      {"id": 2, "file_name": "coffee.jpg", "height": 400, "width": 600}],
           "categories": [{"id": 1, "name": "cup"}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [200, 50, 250, 250]},
                           {"id": 11, "image_id": 2, "category_id": 1, "bbox": [10, 10, 100, 100]}]}
    ps = coco_prompts(doc, image_root="/imgs")
    (job,) = ps.images
    assert ps.problems == [] and job.key == "coffee.jpg" and job.uri == "/imgs/coffee.jpg"
    assert [(o.key, o.source_image_id) for o in job.objects] == [("coco:10", 1), ("coco:11", 2)]
    assert job.source_image_id == 1 and ps.image_entries["coffee.jpg"][0]["id"] == 1


def test_a_repeated_image_id_is_a_problem_for_every_object_on_it():
    doc = {"images": [{"id": 1, "file_name": "coffee.jpg", "height": 400, "width": 600},
                      {"id": 1, "file_name": "other.jpg", "height": 400, "width": 600},
                      {"id": 1, "file_name": "coffee.jpg", "height": 400, "width": 600}],
           "categories": [{"id": 1, "name": "cup"}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [200, 50, 250, 250]},
                           {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100]}]}
    ps = coco_prompts(doc)
    assert ps.images == [] and [(p.key, p.reason) for p in ps.problems] == [("coco:10", DUPLICATE_ID),
                                                                           ("coco:11", DUPLICATE_ID)]
    assert "images[0] and images[1]" in ps.problems[0].detail and "other.jpg" in ps.problems[0].detail
    same = dict(doc, images=[doc["images"][0], dict(doc["images"][0])])
    assert [o.key for o in coco_prompts(same).images[0].objects] == ["coco:10", "coco:11"]  # identical: one entry


def test_entries_of_one_image_that_disagree_on_its_size_are_a_problem():
    doc = base_doc()
    doc["images"][1] = {"id": 2, "file_name": "a.png", "height": H + 1, "width": W}
    ps = coco_prompts(doc)
    assert ps.images == [] and {p.reason for p in ps.problems} == {BAD_IMAGE_ENTRY}
    assert "images[0] and images[1]" in ps.problems[0].detail


def test_different_annotations_with_one_id_are_problems_identical_ones_are_one():
    doc = base_doc()
    doc["annotations"].append(dict(doc["annotations"][0], bbox=[1, 1, 4, 4]))
    ps = coco_prompts(doc)
    assert [(p.key, p.reason) for p in ps.problems] == [("coco:10", DUPLICATE_ID)] * 2
    doc["annotations"][-1] = dict(doc["annotations"][0])
    assert [o.key for j in coco_prompts(doc).images for o in j.objects].count("coco:10") == 1


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d["categories"][0].update(id="cup"), None),
    (lambda d: d["categories"][0].update(id=[1]), None),
    (lambda d: d["categories"][0].update(id=None), None),
    (lambda d: d["categories"][0].update(name=["cup"]), None),
    (lambda d: d["categories"].append({"id": 1, "name": "mug"}), None),
    (lambda d: d.update(categories={"id": 1}), None),
    (lambda d: d["images"][0].update(id=[1]), None),
    (lambda d: d["images"][0].update(file_name=7), None),
    (lambda d: d["images"].append(5), None),
    (lambda d: d["annotations"][0].update(image_id=[1]), MISSING_IMAGE_ENTRY),
    (lambda d: d["annotations"][0].update(category_id=True), "unknown_category"),
    (lambda d: d["annotations"][0].update(bbox=[1, 1, 10 ** 400, 5]), "degenerate_box"),
    (lambda d: d["annotations"][0].update(segmentation={"size": "40x60", "counts": "abc"}), BAD_SEGMENTATION),
    (lambda d: d["annotations"][0].update(segmentation={"size": 5, "counts": [2400]}), BAD_SEGMENTATION),
    (lambda d: d["annotations"][0].update(segmentation=5), BAD_SEGMENTATION),
    (lambda d: d["images"][0].update(height=10 ** 6, width=10 ** 6), BAD_IMAGE_ENTRY),
])
def test_wrong_types_are_a_prompt_file_error_or_a_problem(edit, reason):
    doc = base_doc()
    edit(doc)
    if reason is None:
        with pytest.raises(PromptFileError, match=r"categories|images"):
            coco_prompts(doc)
    else:
        ps = coco_prompts(doc)
        assert {p.key: p.reason for p in ps.problems}.get("coco:10") == reason


@pytest.mark.parametrize("counts", [[5, 10], [5, 10 ** 9], [-5, H * W + 5], [H * W, 0.5], [True, H * W - 1],
                                    "None", "0PP", "", "abc", "0\x00", "]]]]]]]1", 7, None])
def test_rle_counts_that_do_not_cover_the_image_are_bad_segmentations(counts):
    with pytest.raises(PromptError) as e:
        segmentation_to_rle({"size": [H, W], "counts": counts}, (H, W))
    assert e.value.reason == BAD_SEGMENTATION


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_rle_of_any_mask_is_accepted_and_any_change_of_its_total_is_not(h, w, data):
    mask = data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
        lambda v: np.array(v, dtype=bool).reshape(h, w)))
    rle = encode_mask(mask)
    got, _ = segmentation_to_rle(rle, (h, w))
    assert np.array_equal(decode_rle(got), mask)
    flat = mask.ravel(order="F").astype(int)
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]]))
    counts = ([0] if flat[0] else []) + [int(r) for r in runs]
    assert sum(counts) == h * w
    got, _ = segmentation_to_rle({"size": [h, w], "counts": counts}, (h, w))
    assert np.array_equal(decode_rle(got), mask)
    delta = data.draw(st.integers(-5, 5).filter(bool))
    counts[-1] += delta
    if counts[-1] >= 0:
        with pytest.raises(PromptError, match="sum"):
            segmentation_to_rle({"size": [h, w], "counts": counts}, (h, w))


def test_very_deeply_nested_json_is_a_malformed_prompt_file(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(PromptFileError, match="nested too deeply"):
        read_coco_file(str(deep))
