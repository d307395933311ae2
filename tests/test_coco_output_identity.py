"""The COCO output names each mask by the prompt file as it is NOW: its category id, and the image entry the
object was annotated on, whatever run made the mask (a resumed run reuses masks from the ledger, which the
category does not decide) and whatever the type of the entry's id; and it is strict JSON.
"""
from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.coco_output import coco_annotations, coco_results
from pipeline.preannotation import ImageResult, ObjectResult
from pipeline.prompts import coco_prompts, encode_mask, read_coco_file

H, W = 20, 30
NAMES = ["object", "background_thing", "cat"]


def prompt_doc(cat_ids: list[int], image_ids=(1,)) -> dict:
    images = [{"id": i, "file_name": "a.png", "height": H, "width": W} for i in image_ids]
    annotations = [{"id": 10 + n, "image_id": image_ids[n % len(image_ids)], "category_id": cat_ids[n],
                    "bbox": [2 + n, 2, 10, 10]} for n in range(len(cat_ids))]
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": NAMES[n]} for n, c in enumerate(cat_ids)]}


def masks_for(prompts) -> list[ImageResult]:
    """What a run's workers return for these prompts (a mask per object), as the ledger keeps it."""
    mask = np.zeros((H, W), bool)
    mask[3:9, 4:12] = True
    out = []
    for job in prompts.images:
        objects = [ObjectResult(p.key, p.image_id, p.label, p.kind, "ok", p.category_id, clicks=[[5, 6, 1]],
                                score=0.9, area=int(mask.sum()), bbox=[4.0, 3.0, 8.0, 6.0], rle=encode_mask(mask))
                   for p in job.objects]
        out.append(ImageResult(job.key, job.image_id, job.digest(), [H, W], objects))
    return out


@settings(max_examples=30, deadline=None)
@given(renumbered=st.permutations([1, 2, 3, 11, 12, 13, 40]).map(lambda p: p[:3]))
def test_a_resumed_run_writes_the_categories_of_the_prompt_file_now(renumbered):
    before = coco_prompts(prompt_doc([1, 2, 3]))
    ledger = masks_for(before)
    now = coco_prompts(prompt_doc(renumbered))
    by_key = {j.key: j for j in now.images}
    expected = {f"coco:{10 + n}": c for n, c in enumerate(renumbered)}

    doc = coco_annotations(ledger, by_key, "mv", now.categories, now.image_entries)
    assert {a["source_key"]: a["category_id"] for a in doc["annotations"]} == expected
    assert sorted(c["name"] for c in doc["categories"]) == sorted(NAMES)
    results = coco_results(ledger, by_key, "mv")
    assert {a["source_key"]: a["category_id"] for a in results} == expected


def test_each_object_goes_on_the_entry_it_was_annotated_on_whatever_the_id_type():
    prompts = coco_prompts(prompt_doc([1, 2], image_ids=(1, "1")))
    (job,) = prompts.images
    doc = coco_annotations(masks_for(prompts), {job.key: job}, "mv", prompts.categories, prompts.image_entries)
    assert [e["id"] for e in doc["images"]] == [1, "1"]
    assert {a["source_key"]: a["image_id"] for a in doc["annotations"]} == {"coco:10": 1, "coco:11": "1"}


def test_non_json_numbers_in_a_prompt_file_never_reach_an_output(tmp_path):
    text = json.dumps(prompt_doc([1])).replace('"height": 20', '"height": 20, "license": NaN, "date": Infinity')
    path = tmp_path / "prompts.json"
    path.write_text(text)
    prompts = coco_prompts(read_coco_file(str(path)))
    (job,) = prompts.images
    doc = coco_annotations(masks_for(prompts), {job.key: job}, "mv", prompts.categories, prompts.image_entries)
    json.loads(json.dumps(doc, allow_nan=False))
    assert doc["images"][0]["license"] is None
