"""Prompt parsing for bulk pre-annotation (COCO files and Label Studio tasks), the ledger, COCO writing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from backend_support import LABEL_CONFIG, keypoint, rectangle

from connectors.label_studio_prompts import prediction_for, region_id, task_prompts
from connectors.protocol import box_to_click, parse_label_config
from connectors.region_meta import StartClicks, model_key, parse_click_meta
from connectors.rle import rle_to_mask
from interformer.clicks import Click
from pipeline.coco_output import coco_annotations, coco_results
from pipeline.ledger import Ledger, LedgerError
from pipeline.polygons import mask_to_polygons
from pipeline.preannotation import ClickPolicy, ImageResult, ObjectResult
from pipeline.prompts import (
    ImageJob,
    ObjectPrompt,
    clip_box,
    coco_prompts,
    decode_rle,
    encode_mask,
    filter_labels,
)

H, W = 40, 60
POLYGON_LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels>
</View>"""


def doc(annotations, images=None, categories=None) -> dict:
    return {"images": images or [{"id": 1, "file_name": "a/x.png", "height": H, "width": W}],
            "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "object"}, {"id": 2, "name": "dog"}]}


def square(top=10, left=20, size=12) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[top:top + size, left:left + size] = True
    return m


def reasons(ps) -> dict:
    return {p.key: p.reason for p in ps.problems}


def test_auto_takes_points_then_segmentation_then_box():
    poly = [[20, 10, 32, 10, 32, 22, 20, 22]]
    ps = coco_prompts(doc([
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 10, 12, 12], "segmentation": poly,
         "points": [[25, 15], [5, 5]], "point_labels": [1, 0]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 10, 12, 12], "segmentation": poly},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [20, 10, 12, 12]},
        {"id": 4, "image_id": 1, "category_id": 1, "keypoints": [25, 15, 2, 0, 0, 0, 30, 20, 1]},
    ]), image_root="/imgs")
    assert ps.problems == []
    (job,) = ps.images
    assert job.image_id == "a/x.png" and job.size == (H, W) and job.uri == "/imgs/a/x.png"
    assert job.source_image_id == 1
    objs = {o.key: o for o in job.objects}
    assert objs["coco:1"].kind == "points"
    assert objs["coco:1"].clicks == (Click(15, 25, True), Click(5, 5, False))
    assert objs["coco:1"].coarse is not None  # kept for the IoU report
    assert objs["coco:2"].kind == "mask" and objs["coco:2"].label == "dog" and objs["coco:2"].category_id == 2
    assert decode_rle(objs["coco:2"].coarse).sum() > 0
    assert objs["coco:3"].kind == "box"
    assert objs["coco:4"].clicks == (Click(15, 25, True), Click(20, 30, True))


def test_a_box_becomes_the_backends_centre_click_and_region():
    ps = coco_prompts(doc([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [12, 8, 24, 16]}]))
    (obj,) = ps.images[0].objects
    click, region = box_to_click({"x": 20.0, "y": 20.0, "width": 40.0, "height": 40.0}, (H, W))
    assert obj.clicks == (click,) and obj.box == region
    assert obj.clicks[0] == Click(16, 24, True)


def test_forcing_a_kind_reports_objects_without_it():
    ps = coco_prompts(doc([{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                           {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5],
                            "segmentation": encode_mask(square())}]), use="mask")
    assert reasons(ps) == {"coco:1": "no_prompt"}
    assert [o.kind for o in ps.images[0].objects] == ["mask"]


def test_bad_objects_are_reported_one_by_one_and_the_rest_goes_on():
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, -5, 5]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, float("nan"), 5]},
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [W + 1, 0, 5, 5]},
        {"id": 6, "image_id": 1, "category_id": 1, "segmentation": [[W + 5, 0, W + 9, 0, W + 9, 9]]},
        {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]]},
        {"id": 8, "image_id": 1, "category_id": 1, "points": [[W + 3, 2]]},
        {"id": 9, "image_id": 1, "category_id": 1, "points": [[3, 2]], "point_labels": [0]},
        {"id": 10, "image_id": 1, "category_id": 1},
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": {"size": [5, 5], "counts": "abc"}},
        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10]},  # the good one
    ]
    images = [{"id": 1, "file_name": "a/x.png", "height": H, "width": W}, {"id": 2, "file_name": "b.png"}]
    ps = coco_prompts(doc(anns, images=images))
    assert reasons(ps) == {
        "coco:1": "missing_image_entry", "coco:2": "unknown_category", "coco:3": "degenerate_box",
        "coco:4": "degenerate_box", "coco:5": "box_outside", "coco:6": "polygon_outside",
        "coco:7": "degenerate_polygon", "coco:8": "bad_points", "coco:9": "bad_points", "coco:10": "no_prompt",
        "coco:11": "bad_segmentation", "coco:12": "bad_image_entry",
    }
    assert [o.key for j in ps.images for o in j.objects] == ["coco:13"]
    assert all(p.detail for p in ps.problems)


def test_partly_outside_boxes_and_polygons_are_clipped_with_a_note():
    ps = coco_prompts(doc([
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-5, 30, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[-10, -10, 30, -10, 30, 20, -10, 20]]},
    ]))
    objs = {o.key: o for o in ps.images[0].objects}
    assert objs["coco:1"].notes == ("box clipped to the image",)
    assert clip_box([-5, 30, 20, 20], (H, W)) == ((0.0, 30.0, 15.0, 10.0), True)
    assert objs["coco:2"].notes == ("polygon clipped to the image",)
    assert decode_rle(objs["coco:2"].coarse)[:20, :30].all()


def test_image_ids_follow_the_encode_job_and_digests_follow_the_prompts():
    base = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 10]}]
    by_name = coco_prompts(doc(base)).images[0]
    by_id = coco_prompts(doc(base), id_from="id").images[0]
    assert (by_name.image_id, by_id.image_id) == ("a/x.png", "1")
    moved = coco_prompts(doc([dict(base[0], bbox=[2, 3, 11, 10])])).images[0]
    assert by_name.digest() == coco_prompts(doc(base)).images[0].digest()
    assert by_name.digest() != moved.digest()


def test_labels_missing_from_the_target_are_reported():
    job = ImageJob("x", (H, W), (ObjectPrompt("k1", "x", "object", "box", (H, W)),
                                 ObjectPrompt("k2", "x", "cat", "box", (H, W))))
    kept, problems = filter_labels([job], ["object"], "project 1")
    assert [o.key for o in kept[0].objects] == ["k1"]
    assert [(p.key, p.reason) for p in problems] == [("k2", "label_not_in_config")]
    assert filter_labels([job], ["dog"], "p")[0] == []


def ls_task(tid, regions, data=None, source="annotations"):
    entry = {"id": tid * 10, "result": regions, "created_at": "2026-01-01T00:00:00Z"}
    return {"id": tid, "data": data if data is not None else {"image": f"/data/upload/{tid}.png", "image_id": f"img{tid}"},
            "annotations": [entry] if source == "annotations" else [],
            "predictions": [dict(entry, model_version="detector")] if source == "predictions" else []}


def test_label_studio_rectangles_and_keypoints_become_objects():
    config = parse_label_config(LABEL_CONFIG)
    brush = config.brush_for(None)
    size = (H, W)
    tasks = [
        ls_task(1, [rectangle(10, 10, 40, 50, size, item_id="b1"), rectangle(60, 10, 30, 30, size, item_id="b2"),
                    keypoint(20, 30, size, True, item_id="k1"), keypoint(22, 32, size, False, item_id="k2"),
                    keypoint(95, 90, size, True, item_id="k3")]),
        ls_task(2, [keypoint(50, 50, size, False, item_id="n1")]),
        ls_task(3, [rectangle(10, 10, 0, 50, size, item_id="z"), rectangle(10, 10, 95, 50, size, item_id="o")]),
        ls_task(4, [keypoint(50, 50, size)], data={"image": "/data/upload/4.png"}),
        ls_task(5, [keypoint(50, 50, size)], data={}),
        ls_task(6, []),
    ]
    ps = task_prompts(tasks, config, brush)
    jobs = {j.task_id: j for j in ps.images}
    objs = {o.key: o for o in jobs[1].objects}
    c1, r1 = box_to_click(tasks[0]["annotations"][0]["result"][0]["value"], size)
    assert objs["ls:1:b1"].clicks == (c1, Click(12, 12, True), Click(12, 13, False)) and objs["ls:1:b1"].box == r1
    assert len(objs["ls:1:b2"].clicks) == 1
    assert objs["ls:1:points:object"].clicks == (Click(36, 57, True),)
    assert jobs[1].image_id == "img1" and jobs[1].via_label_studio and jobs[1].key == "task:1"
    assert jobs[4].image_id == "/data/upload/4.png"  # no image_id: the URL, as the backend stores it
    assert {p.key: p.reason for p in ps.problems} == {
        "ls:2:points:object": "bad_points", "ls:3:z": "degenerate_box", "ls:3:o": "box_outside",
        "ls:5": "missing_image_entry"}
    assert sorted(jobs) == [1, 4]


def test_label_studio_prompts_from_predictions_of_one_model_version():
    config = parse_label_config(LABEL_CONFIG)
    tasks = [ls_task(1, [rectangle(10, 10, 40, 50, (H, W), item_id="b1")], source="predictions")]
    brush = config.brush_for(None)
    assert task_prompts(tasks, config, brush).images == []
    assert len(task_prompts(tasks, config, brush, "predictions").images) == 1
    assert task_prompts(tasks, config, brush, "predictions", prompt_model_version="other").images == []
    assert task_prompts(tasks, config, brush, "predictions", skip_model_version="detector").images == []


def result_for(masks: dict[str, np.ndarray], labels: dict[str, str]) -> ImageResult:
    objects = [ObjectResult(k, "img", labels[k], "box", "ok", category_id=1, clicks=[[1, 2, 1]], score=0.7,
                            area=int(m.sum()), bbox=[0, 0, 1, 1], rle=encode_mask(m)) for k, m in masks.items()]
    objects.append(ObjectResult("bad", "img", "object", "box", "failed", reason="degenerate_box", detail="x"))
    return ImageResult("img", "img", "d", [H, W], objects)


def test_predictions_carry_brush_rle_that_decodes_to_the_masks():
    config = parse_label_config(LABEL_CONFIG)
    masks = {"a": square(), "b": square(25, 40, 8)}
    pred = prediction_for(result_for(masks, {"a": "object", "b": "background_thing"}), 17,
                          config.brush_for(None), "mv1")
    assert pred["task"] == 17 and pred["model_version"] == "mv1" and pred["score"] == pytest.approx(0.7)
    assert [r["id"] for r in pred["result"]] == [region_id("a"), region_id("b")]
    for region, (key, mask) in zip(pred["result"], masks.items()):
        assert region["value"]["brushlabels"] == [{"a": "object", "b": "background_thing"}[key]]
        np.testing.assert_array_equal(rle_to_mask(region["value"]["rle"], H, W), mask)
    empty = ImageResult("img", "img", "d", [H, W], [])
    assert prediction_for(empty, 17, config.brush_for(None), "mv1") is None


def test_regions_prompted_by_clicks_or_masks_carry_their_clicks_for_the_backend():
    """Each region of a points- or mask-prompted object names its clicks and model in `meta` (what the backend
    replays, connectors/region_meta.py); a box-prompted one does not (its box bounds the mask); polygon parts
    all carry their object's clicks; without a fingerprint nothing is added."""
    config = parse_label_config(LABEL_CONFIG)
    clicks = [[3, 4, 1], [10, 2, 0]]
    objects = [ObjectResult(k, "img", "object", kind, "ok", clicks=clicks, score=0.5, area=int(square().sum()),
                            rle=encode_mask(square())) for k, kind in (("p", "points"), ("m", "mask"), ("b", "box"))]
    result = ImageResult("img", "img", "d", [H, W], objects)
    regions = prediction_for(result, 17, config.brush_for(None), "mv1", fingerprint="fp")["result"]
    assert [parse_click_meta(r.get("meta"), (H, W)) for r in regions] == [
        StartClicks(model_key("fp"), (Click(3, 4, True), Click(10, 2, False)))] * 2 + [None]
    assert all("meta" not in r for r in prediction_for(result, 17, config.brush_for(None), "mv1")["result"])
    two_parts = square() | square(30, 40, 5)
    poly = [ObjectResult("q", "img", "object", "points", "ok", clicks=clicks, score=0.5, area=int(two_parts.sum()),
                         polygons=mask_to_polygons(two_parts).coco(), polygon_iou=1.0)]
    polygon_tag = parse_label_config(POLYGON_LABEL_CONFIG).output_for(None, "object")
    parts = prediction_for(ImageResult("img", "img", "d", [H, W], poly), 17, polygon_tag, "mv1", "fp")["result"]
    assert len(parts) == 2 and all(parse_click_meta(r["meta"], (H, W)).model == model_key("fp") for r in parts)


def test_coco_files_hold_only_segmented_objects():
    from pycocotools import mask as mask_utils

    r = result_for({"a": square()}, {"a": "object"})
    job = ImageJob("img", (H, W), (), source_image_id=5)
    res = coco_results([r], {"img": job}, "mv")
    assert [(e["image_id"], e["category_id"], e["clicks"]) for e in res] == [(5, 1, 1)]
    assert "bbox" not in res[0]  # loadRes would otherwise use the box area
    ann = coco_annotations([r], {"img": job}, "mv")
    assert ann["images"] == [{"id": 1, "file_name": "img", "height": H, "width": W}]
    assert ann["categories"] == [{"id": 1, "name": "object"}]
    (a,) = ann["annotations"]
    seg = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
    np.testing.assert_array_equal(mask_utils.decode(seg).astype(bool), square())
    json.dumps(ann)


def test_click_policy_checks_its_bounds():
    with pytest.raises(ValueError):
        ClickPolicy(target_iou=0.0)
    with pytest.raises(ValueError):
        ClickPolicy(max_clicks=0)


def test_ledger_survives_a_torn_last_line(tmp_path):
    ledger = Ledger(tmp_path / "l.jsonl")
    ledger.append({"n": 1})
    ledger.append({"n": 2})
    with open(ledger.path, "ab") as f:
        f.write(b'{"n": 3, "half')
    assert ledger.read() == [{"n": 1}, {"n": 2}]
    assert ledger.read(repair=True) == [{"n": 1}, {"n": 2}]
    ledger.append({"n": 4})
    assert [r["n"] for r in ledger.read()] == [1, 2, 4]
    ledger.path.write_text('{"n": 1}\nnot json\n{"n": 2}\n')
    with pytest.raises(LedgerError):
        ledger.read()


def test_coco_results_put_each_object_on_the_entry_it_was_annotated_on():
    """Two COCO image entries naming one file share one job (one encoded image); the results file still puts
    each object on its own entry's id."""
    doc = {"images": [{"id": 1, "file_name": "img.png", "height": H, "width": W},
                      {"id": 2, "file_name": "img.png", "height": H, "width": W}],
           "annotations": [{"id": 11, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
                           {"id": 21, "image_id": 2, "category_id": 1, "bbox": [20, 20, 10, 10]}],
           "categories": [{"id": 1, "name": "object"}]}
    (job,) = coco_prompts(doc).images
    masks = {p.key: square() for p in job.objects}
    res = coco_results([result_for(masks, {k: "object" for k in masks})], {"img": job}, "mv")
    assert sorted(e["image_id"] for e in res) == [1, 2]


@settings(max_examples=30, deadline=None)
@given(files=st.integers(1, 3), per_file=st.lists(st.integers(1, 3), min_size=3, max_size=3),
       placement=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=8))
def test_both_coco_forms_put_every_object_on_its_own_image_entry(tmp_path_factory, files, per_file, placement):
    """COCO files where several image entries name one file (merged datasets): whichever form is written, each
    object keeps the image id it was annotated on, every entry holding objects is written once, and
    pycocotools reads the annotations form back with each object on that entry."""
    images, entry_ids = [], []
    for f in range(files):
        ids = [100 * f + k + 1 for k in range(per_file[f])]
        images += [{"id": i, "file_name": f"f{f}.png", "height": H, "width": W} for i in ids]
        entry_ids.append(ids)
    annotations, want = [], {}
    for n, (f, k) in enumerate(placement):
        ids = entry_ids[f % files]
        image_id = ids[k % len(ids)]
        annotations.append({"id": n + 1, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 10, 10]})
        want[f"coco:{n + 1}"] = image_id
    ps = coco_prompts({"images": images, "annotations": annotations,
                       "categories": [{"id": 1, "name": "object"}]})
    assert not ps.problems
    jobs = {j.key: j for j in ps.images}
    results = []
    for job in ps.images:
        objects = [ObjectResult(p.key, job.image_id, "object", "box", "ok", category_id=1, clicks=[[1, 2, 1]],
                                score=0.7, area=144, bbox=[20, 10, 12, 12], rle=encode_mask(square()))
                   for p in job.objects]
        results.append(ImageResult(job.key, job.image_id, "d", [H, W], objects))
    res = coco_results(results, jobs, "mv")
    assert {e["source_key"]: e["image_id"] for e in res} == want
    ann = coco_annotations(results, jobs, "mv", ps.categories, ps.image_entries)
    assert {a["source_key"]: a["image_id"] for a in ann["annotations"]} == want
    written = [e["id"] for e in ann["images"]]
    assert len(written) == len(set(written)) and set(want.values()) <= set(written)
    path = tmp_path_factory.mktemp("coco") / "out.json"
    path.write_text(json.dumps(ann))
    from pycocotools.coco import COCO
    coco = COCO(str(path))
    for image_id in set(want.values()):
        keys = {coco.anns[i]["source_key"] for i in coco.getAnnIds(imgIds=[image_id])}
        assert keys == {k for k, v in want.items() if v == image_id}
