"""jobs/preannotate.py against a real Label Studio 1.23.2 server (the session fixture `label_studio`).

COCO prompts -> tasks created with image_id -> brush predictions read back through Label Studio's API
that decode to the same masks as the COCO output; a re-run adds nothing; a later run with
--encode-missing adds exactly the missing image's prediction. Then the other direction: rectangles
and keypoints drawn in a project become brush predictions in that project. With --mask-format polygon,
the project's PolygonLabels tag is filled with `polygonlabels` regions that Label Studio gives back
unchanged and that rasterise to the run's COCO polygons; a project without the tag the format needs is
refused before anything is created in it.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from backend_support import LABEL_CONFIG, keypoint, rectangle
from label_studio_sdk.core.api_error import ApiError
from ls_proxy import LabelStudioProxy
from preannotate_support import SIZE, load_preannotate_job, prepare_store

from connectors.label_studio_prompts import region_id
from connectors.protocol import box_to_click
from connectors.rle import rle_to_mask
from interformer.clicks import Click
from pipeline.encoding import EncoderSpec, build_predictor
from pipeline.feature_store import FeatureReader
from pipeline.polygons import rasterize
from pipeline.prompts import decode_rle

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


@pytest.fixture(scope="module")
def env(tmp_path_factory, label_studio):
    tmp = tmp_path_factory.mktemp("preannotate_ls")
    store = prepare_store(tmp)
    shutil.copytree(tmp / "db", tmp / "db-as-built")  # for tests that need the table as no test left it
    client = label_studio.client()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in label_studio.env().items():
            mp.setenv(k, v)
        yield {**store, "client": client, "job": load_preannotate_job("preannotate_job_ls")}


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


def predicted_objects(env, project_id: int, tasks: dict):
    """(prediction, keys of its image's objects) per task of an image with features; the others have none."""
    fx = env["fx"]
    preds = predictions(env, project_id)
    for image_id, task in tasks.items():
        if image_id in (fx.unencoded, fx.missing_file):
            assert task.id not in preds
            continue
        (pred,) = preds[task.id]
        yield pred, [f"coco:{k}" for k, img in fx.image_of.items() if img == image_id and k != fx.cat and k in fx.kinds]


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
    # the project cannot hold "cat": segmented into the COCO file, left out of the push (checked below)
    assert rows[f"coco:{fx.cat}"]["status"] == "ok" and f"coco:{fx.cat}" in by_key
    assert s["not_pushed_labels"] == [{"key": f"coco:{fx.cat}", "label": "cat"}]

    preds = predictions(env, project.id)
    assert len(preds) == 4 and all(len(v) == 1 for v in preds.values())
    mv = s["model_version"]
    seen = 0
    for pred, keys in predicted_objects(env, project.id, tasks):
        assert pred.model_version == mv and 0 < pred.score <= 1
        masks = brush_masks(pred)
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
    db = env["tmp"] / "polygons-db"  # its own table: another test encodes the missing image into the shared one
    shutil.copytree(env["tmp"] / "db-as-built", db)
    common = ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--ls-project", str(project.id),
              "--push", "--coco-out", str(coco_out), "--mask-format", "polygon", "--db", str(db)]
    s = run(env, "polygons-to-ls", *common)
    assert s["pushed"] == 4 and s["push_failures"] == [] and s["polygon_iou_min"] >= 0.98

    by_key = {a["source_key"]: a for a in json.loads(coco_out.read_text())["annotations"]}
    tasks = {t.data["image_id"]: t for t in client.tasks.list(project=project.id, include="id,data")}
    assert sum(len(v) for v in predictions(env, project.id).values()) == 4
    seen = 0
    for pred, keys in predicted_objects(env, project.id, tasks):
        assert pred.model_version == s["model_version"]
        masks = polygon_masks(pred)
        assert sorted(masks) == sorted(region_id(k) for k in keys if k in by_key)
        for key in keys:
            if key in by_key:
                coco_mask = rasterize(by_key[key]["segmentation"], SIZE)
                np.testing.assert_array_equal(masks[region_id(key)], coco_mask)
                seen += 1
    assert seen >= 6

    assert run(env, "polygons-to-ls", *common)["pushed"] == 0  # resumed: nothing twice
    assert sum(1 for _ in client.predictions.list(project=project.id)) == 4


def test_boxes_drawn_in_label_studio_become_polygons(env):
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="polygons from boxes", label_config=BOTH_CONFIG)
    name = sorted(i for i in fx.images if i != fx.unencoded)[0]
    (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={name}", "image_id": name}}]).task_ids
    client.annotations.create(id=tid, result=[rectangle(10, 10, 60, 70, SIZE, item_id="b1")])
    s = run(env, "polygons-from-ls", "--ls-project", str(project.id), "--push", "--mask-format", "polygon")
    assert s["pushed"] == 1
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
    run_dir = env["tmp"] / f"refused-{project.id}"
    rc = env["job"].main(["--db", str(env["tmp"] / "db"), "--checkpoint", str(env["ckpt"]), "--workers", "0",
                          "--run-dir", str(run_dir), "--coco", str(fx.coco_path), "--image-root", str(fx.image_root),
                          "--ls-project", str(project.id), "--push", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "--mask-format" in err
    assert list(client.tasks.list(project=project.id)) == []
    assert not (run_dir / "ledger.jsonl").exists()


def test_images_encoded_for_label_studio_tasks_are_keyed_by_url_as_the_backend_keys_them(env, label_studio):
    """Two projects whose tasks reuse one image_id for two pictures: --encode-missing stores each picture under
    its URL (never under the project-chosen id), so each project gets masks of its own picture, made from the
    row as stored; a task whose image_id is unknown is then found by its URL, without encoding again."""
    fx, client = env["fx"], env["client"]
    folder = label_studio.files_root / "shared-image-id"
    folder.mkdir()
    pictures = sorted(i for i in fx.images if i != fx.unencoded)[:2]
    urls = []
    for n, name in enumerate(pictures):
        cv2.imwrite(str(folder / f"p{n}.png"), cv2.cvtColor(fx.images[name], cv2.COLOR_RGB2BGR))
        urls.append(f"/data/local-files/?d={folder.name}/p{n}.png")
    db = env["tmp"] / "by-url-db"
    shutil.copytree(env["tmp"] / "db-as-built", db)
    predictor = build_predictor(EncoderSpec(checkpoint=str(env["ckpt"])), device="cpu")
    click = keypoint(50, 50, SIZE, item_id="k1")

    def project_with(url: str, image_id: str) -> tuple[int, int]:
        project = client.projects.create(title=f"shared id {image_id}", label_config=LABEL_CONFIG)
        client.import_storage.local.create(project=project.id, path=str(folder), title="files", use_blob_urls=True)
        (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
            {"data": {"image": url, "image_id": image_id}}]).task_ids
        client.annotations.create(id=tid, result=[click])
        return project.id, tid

    for n, url in enumerate(urls):
        pid, tid = project_with(url, "photo1.jpg")
        s = run(env, f"by-url-{n}", "--ls-project", str(pid), "--push", "--encode-missing", "--db", str(db))
        assert s["pushed"] == 1 and s["encoded_on_the_fly"] == 1
        reader = FeatureReader(str(db), predictor.fingerprint)
        expected = predictor.session(reader.get(url)).replay([Click(SIZE[0] // 2, SIZE[1] // 2)]).mask
        (pred,) = client.predictions.list(task=tid)
        np.testing.assert_array_equal(brush_masks(pred)[region_id(f"ls:{tid}:points:object")], expected)
    ids = set(FeatureReader(str(db), predictor.fingerprint)._ds.to_table(columns=["image_id"])
              .column("image_id").to_pylist())
    assert set(urls) <= ids and "photo1.jpg" not in ids

    pid, tid = project_with(urls[1], "another-name")
    s = run(env, "by-url-found", "--ls-project", str(pid), "--push", "--db", str(db))
    assert s["pushed"] == 1 and s["encoded_on_the_fly"] == 0


def test_a_task_that_names_its_image_by_url_only_is_the_images_task(env):
    """A task a storage sync created ({"image": URL}, no image_id) is found by the URL the run would give the
    image: it gets the prediction, and no second task of the same picture is created, now or on a rerun."""
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="url-only tasks", label_config=LABEL_CONFIG)
    name = sorted(i for i in fx.images if i != fx.unencoded)[0]
    (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={name}"}}]).task_ids
    common = ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--ls-project", str(project.id),
              "--push"]
    s = run(env, "url-only", *common)
    tasks = list(client.tasks.list(project=project.id, include="id,data"))
    urls = [t.data["image"] for t in tasks]
    assert len(urls) == len(set(urls)) and s["tasks_created"] == len(tasks) - 1
    assert len(list(client.predictions.list(task=tid))) == 1
    again = run(env, "url-only", *common)
    assert again["tasks_created"] == 0 and again["pushed"] == 0
    assert len(list(client.tasks.list(project=project.id, include="id"))) == len(tasks)



def test_two_images_of_a_run_showing_one_file_never_put_two_predictions_on_its_task(env, label_studio):
    """Two COCO image entries (ids 1 and 2, --coco-id id) of one file, whose task a storage sync made (URL
    only): both find that task by URL; the first image's prediction goes there and the second image is
    reported as not pushed (the task holds one prediction of a version), never pushed onto it as well."""
    fx, client = env["fx"], env["client"]
    name = sorted(i for i in fx.images if i != fx.unencoded)[0]
    h, w = SIZE
    coco = env["tmp"] / "one-file-twice.json"
    coco.write_text(json.dumps({
        "images": [{"id": n, "file_name": name, "height": h, "width": w} for n in (1, 2)],
        "annotations": [{"id": n, "image_id": n, "category_id": 1, "bbox": [10, 10, 40, 40]} for n in (1, 2)],
        "categories": [{"id": 1, "name": "object"}]}))
    db = env["tmp"] / "one-file-twice-db"
    shutil.copytree(env["tmp"] / "db-as-built", db)
    project = client.projects.create(title="one file twice", label_config=LABEL_CONFIG)
    (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"image": f"/data/local-files/?d={name}"}}]).task_ids
    run_dir = env["tmp"] / "one-file-twice"
    rc = env["job"].main(["--db", str(db), "--checkpoint", str(env["ckpt"]), "--workers", "0", "--run-dir",
                          str(run_dir), "--max-clicks", "3", "--coco", str(coco), "--image-root", str(fx.image_root),
                          "--coco-id", "id", "--encode-missing", "--ls-project", str(project.id), "--push"])
    s = json.loads((run_dir / "summary.json").read_text())
    assert rc == 1 and s["pushed"] == 1 and s["tasks_created"] == 0
    assert [g["image_id"] for g in s["no_task"]] == ["2"] and f"task {tid}" in s["no_task"][0]["reason"]
    assert len(list(client.predictions.list(task=tid))) == 1



def test_a_run_ending_in_an_error_leaves_no_earlier_runs_summary(env, label_studio, monkeypatch, capsys):
    """A rerun that Label Studio refuses before it segments anything (the task list answers 503) exits 2 and
    leaves no summary.json: a script reading the folder never takes the earlier run's summary for this one's."""
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="summary of an error", label_config=LABEL_CONFIG)
    common = ["--coco", str(fx.coco_path), "--image-root", str(fx.image_root), "--ls-project", str(project.id),
              "--push"]
    run(env, "error-summary", *common)
    summary = env["tmp"] / "error-summary" / "summary.json"
    assert summary.exists()
    proxy = LabelStudioProxy(label_studio.url, lambda m, p: ("refuse", 503, {}) if "/api/tasks" in p else None)
    try:
        monkeypatch.setenv("LABEL_STUDIO_URL", proxy.url)
        rc = env["job"].main(["--db", str(env["tmp"] / "db"), "--checkpoint", str(env["ckpt"]), "--workers", "0",
                              "--run-dir", str(env["tmp"] / "error-summary"), "--max-clicks", "3", *common])
    finally:
        proxy.close()
    assert rc == 2 and "503" in capsys.readouterr().err
    assert not summary.exists()


ESCAPED_NAMES = ["sp ace.png", "a+b.png", "c#d.png", "e&f.png", "100%25.png", "ünï.png"]


def test_file_names_that_need_escaping_find_their_synced_task_and_created_tasks_show_their_image(env, label_studio):
    """Label Studio's storage sync percent-encodes file names in task URLs, and its file view decodes the query
    ('+' is a space, '#' ends the URL): a run finds the synced task of every such file (no second task), and in
    a project without tasks creates tasks whose URLs Label Studio serves the right file from."""
    fx, client = env["fx"], env["client"]
    folder = label_studio.files_root / "escaped names"
    folder.mkdir()
    picture = fx.images[sorted(i for i in fx.images if i != fx.unencoded)[0]]
    for name in ESCAPED_NAMES:
        cv2.imwrite(str(folder / name), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    h, w = SIZE
    images = [{"id": n + 1, "file_name": f"{folder.name}/{name}", "height": h, "width": w}
              for n, name in enumerate(ESCAPED_NAMES)]
    annotations = [{"id": n + 1, "image_id": n + 1, "category_id": 1, "bbox": [10, 10, 40, 40]}
                   for n in range(len(images))]
    coco = env["tmp"] / "escaped-names.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "object"}]}))
    db = env["tmp"] / "escaped-names-db"
    shutil.copytree(env["tmp"] / "db-as-built", db)
    common = ["--coco", str(coco), "--image-root", str(label_studio.files_root), "--push", "--encode-missing",
              "--db", str(db)]

    synced = client.projects.create(title="synced escaped names", label_config=LABEL_CONFIG)
    storage = client.import_storage.local.create(project=synced.id, path=str(folder), title="files",
                                                 use_blob_urls=True)
    client.import_storage.local.sync(id=storage.id)
    tasks = list(client.tasks.list(project=synced.id, include="id,data"))
    assert len(tasks) == len(ESCAPED_NAMES)
    s = run(env, "escaped-synced", "--ls-project", str(synced.id), *common)
    assert s["tasks_created"] == 0 and s["pushed"] == len(ESCAPED_NAMES)
    for t in tasks:
        assert len(list(client.predictions.list(task=t.id))) == 1, t.data
    assert len(list(client.tasks.list(project=synced.id, include="id"))) == len(ESCAPED_NAMES)

    fresh = client.projects.create(title="created escaped names", label_config=LABEL_CONFIG)
    client.import_storage.local.create(project=fresh.id, path=str(folder), title="files", use_blob_urls=True)
    s = run(env, "escaped-created", "--ls-project", str(fresh.id), *common)
    assert s["tasks_created"] == len(ESCAPED_NAMES) and s["pushed"] == len(ESCAPED_NAMES)
    expected = {name: (folder / name).read_bytes() for name in ESCAPED_NAMES}
    served = {}
    for t in client.tasks.list(project=fresh.id, include="id,data"):
        r = httpx.get(label_studio.url + t.data["image"], headers={"Authorization": f"Token {label_studio.token}"})
        assert r.status_code == 200, t.data
        served[t.data["image_id"].split("/", 1)[1]] = r.content
    assert served == expected


def test_the_documented_local_files_setup_serves_every_created_task_s_image(env, label_studio):
    """The recipe of README step 4 / preannotation.md, with Label Studio's LOCAL_FILES_DOCUMENT_ROOT standing
    for /data: images in its subfolder (/data/images) given as --image-root, --image-url
    '/data/local-files/?d=images/{file_name}' and a Local Storage on that subfolder. Every task the push
    creates for an existing file shows that file (200, same bytes); a storage on the root itself is refused."""
    fx, client = env["fx"], env["client"]
    folder = label_studio.files_root / "images-recipe"  # /data/images
    shutil.copytree(fx.image_root, folder)
    project = client.projects.create(title="documented local files", label_config=LABEL_CONFIG)
    with pytest.raises(ApiError):
        client.import_storage.local.create(project=project.id, path=str(label_studio.files_root), title="root")
    client.import_storage.local.create(project=project.id, path=str(folder), title="images", use_blob_urls=True)
    s = run(env, "documented-local-files", "--coco", str(fx.coco_path), "--image-root", str(folder),
            "--image-url", f"/data/local-files/?d={folder.name}/{{file_name}}", "--ls-project", str(project.id),
            "--push")
    # + the entry whose file is missing; what is pushed depends on the shared table (another test may have
    # encoded the unencoded image), the images shown do not
    assert s["tasks_created"] == len(fx.images) + 1
    served = {}
    for t in client.tasks.list(project=project.id, include="id,data"):
        r = httpx.get(label_studio.url + t.data["image"], headers={"Authorization": f"Token {label_studio.token}"})
        served[t.data["image_id"]] = r.content if r.status_code == 200 else r.status_code
    expected = {name: (folder / name).read_bytes() for name in fx.images}
    assert served == {**expected, fx.missing_file: 404}


TWO_IMAGES = """<View>
  <Image name="left" value="$left"/><Image name="right" value="$right"/>
  <BrushLabels name="bl" toName="left"><Label value="object"/><Label value="background_thing"/></BrushLabels>
  <BrushLabels name="br" toName="right"><Label value="object"/><Label value="background_thing"/></BrushLabels>
</View>"""


def test_images_without_a_task_in_a_several_image_project_are_reported_and_the_others_pushed(env, capsys):
    """Label Studio refuses a task that names one image of a config with several: the run creates none,
    pushes the images that have their task, reports the others as not delivered and exits 1."""
    fx, client = env["fx"], env["client"]
    project = client.projects.create(title="two images", label_config=TWO_IMAGES)
    names = sorted(i for i in fx.images if i not in (fx.unencoded, fx.missing_file))
    (tid,) = client.projects.import_tasks(id=project.id, return_task_ids=True, request=[
        {"data": {"left": f"/data/local-files/?d={names[0]}", "image_id_left": names[0],
                  "right": f"/data/local-files/?d={names[1]}"}}]).task_ids
    run_dir = env["tmp"] / "two-images"
    rc = env["job"].main(["--db", str(env["tmp"] / "db"), "--checkpoint", str(env["ckpt"]), "--workers", "0",
                          "--run-dir", str(run_dir), "--max-clicks", "3", "--coco", str(fx.coco_path),
                          "--image-root", str(fx.image_root), "--ls-project", str(project.id), "--push",
                          "--ls-brush", "bl"])
    s = json.loads((run_dir / "summary.json").read_text())
    assert rc == 1 and "import tasks for the images without one" in capsys.readouterr().err
    assert s["tasks_created"] == 0 and s["pushed"] == 1 and s["push_failures"] == []
    assert names[0] not in {g["image_id"] for g in s["no_task"]} and names[1] in {g["image_id"] for g in s["no_task"]}
    assert [t.id for t in client.tasks.list(project=project.id, include="id")] == [tid]
    (pred,) = client.predictions.list(task=tid)
    assert {dict(r)["from_name"] for r in pred.result} == {"bl"}
