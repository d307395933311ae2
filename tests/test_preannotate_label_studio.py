"""jobs/preannotate.py against a real Label Studio 1.23.2 server (the session fixture `label_studio`).

COCO prompts -> tasks created with image_id -> brush predictions read back through Label Studio's API
that decode to the same masks as the COCO output; a re-run adds nothing; a later run with
--encode-missing adds exactly the missing image's prediction. Then the other direction: rectangles
and keypoints drawn in a project become brush predictions in that project.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from backend_support import LABEL_CONFIG, encode_into_store, keypoint, make_checkpoint, rectangle
from preannotate_support import SIZE, build_prompt_file

from connectors.label_studio_prompts import region_id
from connectors.protocol import box_to_click
from connectors.rle import rle_to_mask
from interformer.clicks import Click
from pipeline.encoding import EncoderSpec, build_predictor
from pipeline.feature_store import FeatureReader
from pipeline.prompts import decode_rle

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _load_job():
    spec = importlib.util.spec_from_file_location("preannotate_job_ls", ROOT / "jobs" / "preannotate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory, label_studio):
    tmp = tmp_path_factory.mktemp("preannotate_ls")
    fx = build_prompt_file(tmp)
    ckpt = make_checkpoint(tmp / "small.pth")
    encode_into_store(ckpt, tmp / "db", "features",
                      [(i, str(fx.image_root / i), img) for i, img in fx.images.items() if i != fx.unencoded])
    client = label_studio.client()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in label_studio.env().items():
            mp.setenv(k, v)
        yield {"tmp": tmp, "fx": fx, "ckpt": ckpt, "client": client, "job": _load_job()}


def run(env, run_dir: str, *extra: str) -> dict:
    rc = env["job"].main(["--db", str(env["tmp"] / "db"), "--checkpoint", str(env["ckpt"]), "--workers", "0",
                          "--run-dir", str(env["tmp"] / run_dir), "--max-clicks", "3", *extra])
    assert rc == 0
    return json.loads((env["tmp"] / run_dir / "summary.json").read_text())


def predictions(env, project_id: int) -> dict[int, list]:
    out: dict[int, list] = {}
    for p in env["client"].predictions.list(project=project_id):
        out.setdefault(p.task, []).append(p)
    return out


def brush_masks(prediction) -> dict[str, np.ndarray]:
    masks = {}
    for r in prediction.result:
        r = dict(r)
        assert r["type"] == "brushlabels" and r["from_name"] == "tag" and r["to_name"] == "image"
        assert (r["original_height"], r["original_width"]) == SIZE
        masks[r["id"]] = rle_to_mask(r["value"]["rle"], r["original_height"], r["original_width"])
    return masks


def test_coco_prompts_become_predictions_once(env):
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="bulk from COCO", label_config=LABEL_CONFIG)
    coco_out = env["tmp"] / "masks.json"
    common = ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--ls-project", str(project.id),
              "--push", "--push-batch", "2", "--coco-out", str(coco_out)]
    s = run(env, "to-ls", *common)
    assert s["tasks_created"] == 6 and s["pushed"] == 4 and s["push_failures"] == []

    tasks = {t.data["image_id"]: t for t in client.tasks.list(project=project.id, include="id,data")}
    assert sorted(tasks) == sorted([*fx.images, fx.missing_file])
    assert tasks[fx.image_of[1000]].data["image"] == f"/data/local-files/?d={fx.image_of[1000]}"

    coco = json.loads(coco_out.read_text())
    by_key = {a["source_key"]: a for a in coco["annotations"]}
    with open(env["tmp"] / "to-ls" / "report.csv") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert rows[f"coco:{fx.cat}"]["reason"] == "label_not_in_config"  # the project cannot hold "cat"
    assert f"coco:{fx.cat}" not in by_key

    preds = predictions(env, project.id)
    assert len(preds) == 4 and all(len(v) == 1 for v in preds.values())
    mv = s["model_version"]
    seen = 0
    for image_id, task in tasks.items():
        if image_id in (fx.unencoded, fx.missing_file):
            assert task.id not in preds
            continue
        (pred,) = preds[task.id]
        assert pred.model_version == mv and 0 < pred.score <= 1
        masks = brush_masks(pred)
        keys = [f"coco:{k}" for k, img in fx.image_of.items() if img == image_id and k != fx.cat and k in fx.kinds]
        assert sorted(masks) == sorted(region_id(k) for k in keys)
        for key in keys:
            seg = by_key[key]["segmentation"]
            np.testing.assert_array_equal(masks[region_id(key)], decode_rle(seg))
            seen += 1
    assert seen == 8

    again = run(env, "to-ls", *common)
    assert again["pushed"] == 0 and again["tasks_created"] == 0 and again["delivered_before"] == 4
    assert sum(len(v) for v in predictions(env, project.id).values()) == 4

    later = run(env, "to-ls", *common, "--encode-missing")
    assert later["pushed"] == 1 and later["encoded_on_the_fly"] == 1
    preds = predictions(env, project.id)
    assert len(preds[tasks[fx.unencoded].id]) == 1 and sum(len(v) for v in preds.values()) == 5


def test_boxes_and_keypoints_drawn_in_label_studio_become_masks(env):
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="bulk from boxes", label_config=LABEL_CONFIG)
    names = sorted(i for i in fx.images if i != fx.unencoded)[:2]
    ids = client.projects.import_tasks(
        id=project.id, return_task_ids=True,
        request=[{"data": {"image": f"/data/local-files/?d={n}", "image_id": n}} for n in names]
        + [{"data": {"image": str(fx.image_root / names[1])}}]).task_ids  # no image_id: found by its uri
    box = rectangle(10, 10, 50, 60, SIZE, item_id="b1")
    client.annotations.create(id=ids[0], result=[box, keypoint(20, 30, SIZE, True, item_id="k1"),
                                                 rectangle(70, 20, 25, 40, SIZE, label="object", item_id="b2")])
    client.annotations.create(id=ids[1], result=[keypoint(50, 50, SIZE, True, item_id="k2"),
                                                 keypoint(5, 5, SIZE, False, item_id="k3")])
    client.annotations.create(id=ids[2], result=[keypoint(50, 50, SIZE, True, item_id="k5")])
    s = run(env, "from-ls", "--ls-project", str(project.id), "--push")
    assert s["pushed"] == 3 and s["segmented"] == 4

    predictor = build_predictor(EncoderSpec(checkpoint=str(env["ckpt"])), device="cpu")
    reader = FeatureReader(str(env["tmp"] / "db"), predictor.fingerprint)
    preds = predictions(env, project.id)
    click, region = box_to_click(box["value"], SIZE)
    feats = reader.get(names[0])
    expected = predictor.session(feats, box=region).replay([click, Click(int(0.3 * SIZE[0]), int(0.2 * SIZE[1]))]).mask
    bounded = np.zeros_like(expected)
    left, up, right, bottom = region
    bounded[up:bottom, left:right] = expected[up:bottom, left:right]
    masks = brush_masks(preds[ids[0]][0])
    np.testing.assert_array_equal(masks[region_id(f"ls:{ids[0]}:b1")], bounded)
    assert region_id(f"ls:{ids[0]}:b2") in masks
    points = predictor.session(reader.get(names[1])).replay(
        [Click(SIZE[0] // 2, SIZE[1] // 2), Click(int(0.05 * SIZE[0]), int(0.05 * SIZE[1]), False)]).mask
    np.testing.assert_array_equal(brush_masks(preds[ids[1]][0])[region_id(f"ls:{ids[1]}:points:object")], points)
    centre = predictor.session(reader.get(names[1])).replay([Click(SIZE[0] // 2, SIZE[1] // 2)]).mask
    np.testing.assert_array_equal(brush_masks(preds[ids[2]][0])[region_id(f"ls:{ids[2]}:points:object")], centre)

    again = run(env, "from-ls", "--ls-project", str(project.id), "--push")
    assert again["pushed"] == 0 and again["computed_objects"] == 0
    assert sum(len(v) for v in predictions(env, project.id).values()) == 3
