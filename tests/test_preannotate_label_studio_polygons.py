"""jobs/preannotate.py --mask-format polygon against a real Label Studio 1.23.2 server.

A project whose config has both a BrushLabels and a PolygonLabels tag: polygon pre-annotation fills the
PolygonLabels tag with `polygonlabels` regions that Label Studio imports and gives back unchanged, and
that rasterise to the COCO polygons of the same run; boxes drawn in Label Studio become polygons too.
A project without the tag the format needs is refused before anything is created in it.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from backend_support import encode_into_store, make_checkpoint, rectangle
from preannotate_support import SIZE, build_prompt_file

from connectors.label_studio_prompts import region_id
from pipeline.polygons import rasterize

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

BOTH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="object"/><Label value="background_thing"/>
  </BrushLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="object"/><Label value="background_thing"/>
  </PolygonLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object"/></RectangleLabels>
</View>"""
BRUSH_ONLY = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
</View>"""
POLYGON_ONLY = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels>
</View>"""


def _load_job():
    spec = importlib.util.spec_from_file_location("preannotate_job_ls_polygons", ROOT / "jobs" / "preannotate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory, label_studio):
    tmp = tmp_path_factory.mktemp("preannotate_ls_polygons")
    fx = build_prompt_file(tmp, n_grabcut=2, n_berkeley=1)
    ckpt = make_checkpoint(tmp / "small.pth")
    encode_into_store(ckpt, tmp / "db", "features",
                      [(i, str(fx.image_root / i), img) for i, img in fx.images.items() if i != fx.unencoded])
    client = label_studio.client()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in label_studio.env().items():
            mp.setenv(k, v)
        yield {"tmp": tmp, "fx": fx, "ckpt": ckpt, "client": client, "job": _load_job()}


def run(env, run_dir: str, *extra: str) -> int:
    return env["job"].main(["--db", str(env["tmp"] / "db"), "--checkpoint", str(env["ckpt"]), "--workers", "0",
                            "--run-dir", str(env["tmp"] / run_dir), "--max-clicks", "3", *extra])


def summary(env, run_dir: str) -> dict:
    return json.loads((env["tmp"] / run_dir / "summary.json").read_text())


def polygon_masks(prediction) -> dict[str, np.ndarray]:
    """Region id prefix (the object's region id) -> the union of its polygons, rasterised by pycocotools."""
    parts: dict[str, list[list[float]]] = {}
    for r in prediction.result:
        r = dict(r)
        assert r["type"] == "polygonlabels" and r["from_name"] == "poly" and r["to_name"] == "image"
        assert (r["original_height"], r["original_width"]) == SIZE and r["value"]["closed"]
        h, w = SIZE
        points = np.asarray(r["value"]["points"], dtype=np.float64) * [w / 100.0, h / 100.0]
        parts.setdefault(r["id"].rsplit("-", 1)[0], []).append(points.reshape(-1).tolist())
    return {k: rasterize(v, SIZE) for k, v in parts.items()}


def test_coco_prompts_become_polygon_predictions_that_read_back(env):
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="polygons from COCO", label_config=BOTH_CONFIG)
    coco_out = env["tmp"] / "poly.json"
    common = ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--ls-project", str(project.id),
              "--push", "--coco-out", str(coco_out), "--mask-format", "polygon"]
    assert run(env, "to-ls", *common) == 0
    s = summary(env, "to-ls")
    assert s["pushed"] == 2 and s["push_failures"] == [] and s["polygon_iou_min"] >= 0.98

    by_key = {a["source_key"]: a for a in json.loads(coco_out.read_text())["annotations"]}
    tasks = {t.data["image_id"]: t for t in client.tasks.list(project=project.id, include="id,data")}
    preds = {}
    for p in client.predictions.list(project=project.id):
        preds.setdefault(p.task, []).append(p)
    assert sum(len(v) for v in preds.values()) == 2
    seen = 0
    for image_id, task in tasks.items():
        if image_id in (fx.unencoded, fx.missing_file):
            assert task.id not in preds
            continue
        (pred,) = preds[task.id]
        assert pred.model_version == s["model_version"]
        masks = polygon_masks(pred)
        keys = [f"coco:{k}" for k, img in fx.image_of.items() if img == image_id and k != fx.cat and k in fx.kinds]
        assert sorted(masks) == sorted(region_id(k) for k in keys if k in by_key)
        for key in keys:
            if key in by_key:
                coco_mask = rasterize(by_key[key]["segmentation"], SIZE)
                np.testing.assert_array_equal(masks[region_id(key)], coco_mask)
                seen += 1
    assert seen >= 3

    assert run(env, "to-ls", *common) == 0  # resumed: nothing twice
    assert summary(env, "to-ls")["pushed"] == 0
    assert sum(1 for _ in client.predictions.list(project=project.id)) == 2


def test_boxes_drawn_in_label_studio_become_polygons(env):
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="polygons from boxes", label_config=BOTH_CONFIG)
    name = sorted(i for i in fx.images if i != fx.unencoded)[0]
    (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={name}", "image_id": name}}]).task_ids
    client.annotations.create(id=tid, result=[rectangle(10, 10, 60, 70, SIZE, item_id="b1")])
    assert run(env, "from-ls", "--ls-project", str(project.id), "--push", "--mask-format", "polygon") == 0
    assert summary(env, "from-ls")["pushed"] == 1
    (pred,) = client.predictions.list(task=tid)
    masks = polygon_masks(pred)
    assert list(masks) == [region_id(f"ls:{tid}:b1")] and masks[region_id(f"ls:{tid}:b1")].any()


@pytest.mark.parametrize("config, extra, message", [
    (BRUSH_ONLY, ["--mask-format", "polygon"], "no PolygonLabels tag for --mask-format polygon"),
    (POLYGON_ONLY, [], "no BrushLabels tag for --mask-format rle"),
])
def test_a_project_without_the_formats_tag_is_refused_before_anything_is_created(env, capsys, config, extra, message):
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="wrong tag", label_config=config)
    rc = run(env, f"refused-{project.id}", "--coco", str(fx.coco_path), "--image-root", str(fx.image_root),
             "--ls-project", str(project.id), "--push", *extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "--mask-format" in err
    assert list(client.tasks.list(project=project.id)) == []
    assert not (env["tmp"] / f"refused-{project.id}" / "ledger.jsonl").exists()
