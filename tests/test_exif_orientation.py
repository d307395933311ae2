"""Photos with an EXIF orientation tag: Label Studio shows (and sizes, and draws on) the DISPLAYED grid, the
features are of the STORED grid. The geometry (pipeline/orientation.py) is checked against Pillow's
`ImageOps.exif_transpose`, the independent reference for what a browser shows; the encoder records the tag
(pipeline/images.py, the encode stages, on-demand encoding); the feature table carries it, old tables included;
and the ML backend and Label Studio pre-annotation answer displayed-grid prompts with displayed-grid masks for
every tag, every prompt kind and every output kind."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from interformer.clicks import Click

TAGS = list(range(1, 9))


def tagged_png(pixels: np.ndarray, tag: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = tag
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def shown_by_pillow(pixels: np.ndarray, tag: int) -> np.ndarray:
    """What a browser shows of a stored (H, W) uint8 grid carrying `tag`: Pillow's exif_transpose of the file."""
    with Image.open(io.BytesIO(tagged_png(pixels, tag))) as img:
        return np.asarray(ImageOps.exif_transpose(img))


sizes = st.tuples(st.integers(1, 9), st.integers(1, 9))


@st.composite
def stored_masks(draw):
    h, w = draw(sizes)
    values = draw(st.lists(st.integers(0, 255), min_size=h * w, max_size=h * w))
    return np.asarray(values, dtype=np.uint8).reshape(h, w)


# --- the geometry, against Pillow ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(stored=stored_masks(), tag=st.sampled_from(TAGS))
def test_stored_to_displayed_is_what_pillow_shows_and_displayed_to_stored_undoes_it(stored, tag):
    from pipeline.orientation import Orientation, displayed_size, mask_to_displayed, mask_to_stored

    shown = mask_to_displayed(stored, tag)
    assert np.array_equal(shown, shown_by_pillow(stored, tag))
    assert shown.shape == displayed_size(stored.shape, tag)
    assert np.array_equal(mask_to_stored(shown, tag), stored)
    view = Orientation(stored.shape, tag)
    assert np.array_equal(view.mask_to_stored(view.mask_to_displayed(stored > 127)), stored > 127)


@settings(max_examples=60, deadline=None)
@given(size=sizes, tag=st.sampled_from(TAGS), data=st.data())
def test_a_displayed_point_maps_to_the_stored_pixel_a_one_pixel_mask_there_maps_to(size, tag, data):
    from pipeline.orientation import Orientation, mask_to_stored

    view = Orientation(size, tag)
    dh, dw = view.displayed_size
    row, col = data.draw(st.integers(0, dh - 1)), data.draw(st.integers(0, dw - 1))
    shown = np.zeros((dh, dw), dtype=np.uint8)
    shown[row, col] = 255
    stored = mask_to_stored(shown, tag)
    assert list(zip(*np.nonzero(stored))) == [view.point_to_stored(row, col)]
    assert np.array_equal(shown_by_pillow(stored, tag), shown)
    assert view.point_to_displayed(*view.point_to_stored(row, col)) == (row, col)
    click = Click(row, col, data.draw(st.booleans()))
    assert view.clicks_to_displayed(view.clicks_to_stored([click])) == (click,)


@settings(max_examples=60, deadline=None)
@given(size=sizes, tag=st.sampled_from(TAGS), data=st.data())
def test_a_box_maps_to_the_box_of_its_mapped_corners_which_holds_exactly_its_pixels(size, tag, data):
    from pipeline.orientation import Orientation, mask_to_stored

    view = Orientation(size, tag)
    dh, dw = view.displayed_size
    up, left = data.draw(st.integers(0, dh - 1)), data.draw(st.integers(0, dw - 1))
    bottom, right = data.draw(st.integers(up + 1, dh)), data.draw(st.integers(left + 1, dw))
    box = (left, up, right, bottom)
    got = view.box_to_stored(box)
    corners = [view.point_to_stored(r, c) for r in (up, bottom - 1) for c in (left, right - 1)]
    rows, cols = [c[0] for c in corners], [c[1] for c in corners]
    assert got == (min(cols), min(rows), max(cols) + 1, max(rows) + 1)
    drawn = np.zeros((dh, dw), dtype=bool)
    drawn[up:bottom, left:right] = True
    inside = np.zeros(size, dtype=bool)
    inside[got[1]:got[3], got[0]:got[2]] = True
    assert np.array_equal(mask_to_stored(drawn, tag), inside)
    assert view.box_to_displayed(got) == box


def test_tags_browsers_ignore_are_the_identity_and_a_bad_tag_is_refused():
    from pipeline.orientation import Orientation, normalize_tag

    for raw in (None, 0, 9, -1, 3.0, "6", (6,), True, b"\x06"):
        assert normalize_tag(raw) == 1
    assert [normalize_tag(t) for t in TAGS] == TAGS
    assert normalize_tag(np.uint16(6)) == 6
    with pytest.raises(ValueError, match="1..8"):
        Orientation((4, 5), 0)
    with pytest.raises(ValueError, match="outside the displayed grid"):
        Orientation((4, 5), 6).point_to_stored(0, 4)  # displayed is 5 high, 4 wide
    with pytest.raises(ValueError, match="not on the stored grid"):
        Orientation((4, 5), 6).mask_to_displayed(np.zeros((5, 4), bool))


# --- Pillow as the independent reference for the e2e checks (no pipeline.orientation below) -------------------


def pillow_index_map(stored_size: tuple[int, int], tag: int) -> np.ndarray:
    """The displayed grid of an image stored at `stored_size` with `tag`, each pixel holding the flat index of the
    stored pixel it shows (what Pillow's exif_transpose, and so a browser, puts there)."""
    h, w = stored_size
    index = Image.fromarray(np.arange(h * w, dtype=np.int32).reshape(h, w), mode="I")
    index.getexif()[0x0112] = tag
    return np.asarray(ImageOps.exif_transpose(index), dtype=np.int64)


def shown(stored_mask: np.ndarray, tag: int) -> np.ndarray:
    return stored_mask.ravel()[pillow_index_map(stored_mask.shape, tag)]


def unshown(displayed_mask: np.ndarray, stored_size: tuple[int, int], tag: int) -> np.ndarray:
    out = np.zeros(stored_size[0] * stored_size[1], dtype=displayed_mask.dtype)
    out[pillow_index_map(stored_size, tag).ravel()] = displayed_mask.ravel()
    return out.reshape(stored_size)


def stored_click(click: Click, stored_size: tuple[int, int], tag: int) -> Click:
    row, col = divmod(int(pillow_index_map(stored_size, tag)[click.row, click.col]), stored_size[1])
    return Click(row, col, click.positive)


def stored_box(box: tuple[int, int, int, int], stored_size: tuple[int, int], tag: int) -> tuple[int, int, int, int]:
    left, up, right, bottom = box
    index = pillow_index_map(stored_size, tag)[up:bottom, left:right].ravel()
    rows, cols = np.divmod(index, stored_size[1])
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def test_the_reference_helpers_agree_with_pillow_on_a_file():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for tag in TAGS:
        assert np.array_equal(shown(pixels, tag), shown_by_pillow(pixels, tag))
        assert np.array_equal(unshown(shown(pixels, tag), pixels.shape, tag), pixels)


# --- real parts: the encode stages, a LanceDB table, the backend in-process, the pre-annotation worker ---------

STORED = (48, 64)  # (H, W): not square, so a 90-degree tag shows a transposed size
MV = "interformer-small-exif"
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="outline"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/><Label value="outline"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="object"/></RectangleLabels>
</View>"""


def tagged_file(pixels: np.ndarray, tag: int, path) -> None:
    """A JPEG (odd tags) or PNG (even tags) of the stored pixels carrying EXIF orientation `tag`."""
    exif = Image.Exif()
    exif[0x0112] = tag
    Image.fromarray(pixels).save(path, exif=exif, **({"quality": 95} if path.suffix == ".jpg" else {}))


def file_name(tag: int) -> str:
    return f"tag{tag}." + ("jpg" if tag % 2 else "png")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import pyarrow as pa
    from backend_support import encode_into_store, grabcut_images, make_checkpoint

    from connectors.engine import EngineConfig, InProcessSegmenter
    from interformer.config import PreprocessConfig
    from pipeline.encoding import EncoderSpec, EncoderStage, build_predictor, decode_stage, write_stage
    from pipeline.feature_store import FeatureStore
    from pipeline.image_access import ImageAccess
    from pipeline.staged_commits import StagedCommitter

    tmp = tmp_path_factory.mktemp("exif")
    ckpt = make_checkpoint(tmp / "small.pth")
    pixels = grabcut_images(1, STORED)[0][1]
    images = tmp / "images"
    images.mkdir()
    for tag in TAGS:
        tagged_file(pixels, tag, images / file_name(tag))
    (images / "ondemand").mkdir()
    for tag in (3, 6):
        tagged_file(pixels, tag, images / "ondemand" / file_name(tag))
    # the encode job's own stages: decode (reads the tag) -> encoder actor body -> staged write -> commit
    spec = EncoderSpec(checkpoint=str(ckpt), preprocess=PreprocessConfig())
    names = [file_name(t) for t in TAGS]
    batch = pa.table({"image_id": names, "uri": [str(images / n) for n in names]})
    fingerprint = build_predictor(spec, device="cpu").fingerprint
    store = FeatureStore(str(tmp / "db"), "features")
    committer = StagedCommitter(store)
    write_stage(EncoderStage(spec, fingerprint)(decode_stage(batch, spec.preprocess)), store.features_uri,
                committer.uri, fingerprint)
    committer.commit_staged()
    # a row stored before the encoder recorded the tag (a 90-degree photo): orientation unknown
    with Image.open(images / file_name(6)) as img:
        legacy = np.asarray(img.convert("RGB"))
    encode_into_store(ckpt, tmp / "db", "features", [("legacy6", str(images / file_name(6)), legacy)])
    cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), threads=2,
                       access=ImageAccess(allowed_roots=(str(images.resolve()),)))
    return {"tmp": tmp, "ckpt": ckpt, "pixels": pixels, "images": images, "fingerprint": fingerprint,
            "segmenter": InProcessSegmenter(cfg)}


@pytest.fixture(scope="module")
def client(env):
    from fastapi.testclient import TestClient

    from connectors.server import ServerSettings, create_app

    with TestClient(create_app(ServerSettings(model_version=MV), env["segmenter"])) as c:
        yield c


def reference(env, image_id: str, clicks, box=None, initial_mask=None, initial_clicks=None) -> np.ndarray:
    """The model's mask on the STORED grid from the stored features, for stored-grid prompts."""
    from backend_support import reference_mask

    return reference_mask(env["ckpt"], env["tmp"] / "db", "features", image_id, list(clicks), box,
                          initial_mask=initial_mask, initial_clicks=initial_clicks)


def displayed_size_of(tag: int) -> tuple[int, int]:
    return STORED[::-1] if tag >= 5 else STORED


def predict(client, image_id: str | None, items: list, annotations=(), image: str | None = None) -> dict:
    data = {"image": image or f"/data/{image_id}"}
    if image_id is not None:
        data["image_id"] = image_id
    body = {"tasks": [{"id": 7, "data": data, "annotations": list(annotations), "predictions": []}],
            "project": "3.1795474399", "label_config": CONFIG, "params": {"context": {"result": items}}}
    return client.post("/predict", json=body)


def brush(response, size: tuple[int, int]) -> np.ndarray:
    from connectors.rle import rle_to_mask

    assert response.status_code == 200, response.text
    region = response.json()["results"][0]["result"][0]
    assert region["type"] == "brushlabels"
    assert (region["original_height"], region["original_width"]) == size  # the grid Label Studio shows
    return rle_to_mask(region["value"]["rle"], *size)


@pytest.mark.parametrize("tag", TAGS)
def test_the_encode_stages_record_each_files_tag(env, tag):
    from pipeline.feature_store import FeatureReader

    record = FeatureReader(str(env["tmp"] / "db"), env["fingerprint"], table="features").get_record(file_name(tag))
    assert record.exif_orientation == tag
    assert tuple(record.features.geometry.original_size) == STORED  # features stay in the stored grid


@pytest.mark.parametrize("tag", TAGS)
def test_backend_keypoints_and_a_rectangle_give_the_stored_grid_answer_shown_as_the_browser_shows_it(env, client, tag):
    from backend_support import keypoint, pixel, rectangle

    from connectors.protocol import box_to_click

    size = displayed_size_of(tag)
    image_id = file_name(tag)
    items = [keypoint(40, 55, size, item_id="k1"), keypoint(80, 20, size, positive=False, item_id="k2")]
    clicks = [stored_click(pixel(40, 55, size), STORED, tag), stored_click(pixel(80, 20, size, False), STORED, tag)]
    want = shown(reference(env, image_id, clicks), tag)
    got = brush(predict(client, image_id, items), size)
    assert got.any() and np.array_equal(got, want)
    rect = rectangle(20, 25, 45, 50, size)
    click, region = box_to_click(rect["value"], size)
    want = shown(reference(env, image_id, [stored_click(click, STORED, tag)], stored_box(region, STORED, tag)), tag)
    got = brush(predict(client, image_id, [rect]), size)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("tag", TAGS)
def test_backend_polygon_output_is_drawn_on_the_displayed_grid(env, client, tag):
    from backend_support import keypoint, pixel

    from pipeline.polygons import mask_to_polygons

    size = displayed_size_of(tag)
    image_id = file_name(tag)
    r = predict(client, image_id, [keypoint(40, 55, size, label="outline")])
    assert r.status_code == 200, r.text
    regions = r.json()["results"][0]["result"]
    want = shown(reference(env, image_id, [stored_click(pixel(40, 55, size), STORED, tag)]), tag)
    assert regions and all(g["type"] == "polygonlabels" for g in regions)
    assert all((g["original_height"], g["original_width"]) == size for g in regions)
    assert [g["value"]["points"] for g in regions] == mask_to_polygons(want).label_studio_points()


def brush_region(mask: np.ndarray, label: str = "object", meta: dict | None = None) -> dict:
    from connectors.rle import mask_to_rle

    h, w = mask.shape
    region = {"id": "onscreen", "type": "brushlabels", "from_name": "tag", "to_name": "image",
              "original_width": w, "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(mask),
                                                                   "brushlabels": [label]}}
    return {**region, "meta": meta} if meta else region


def annotation(*regions) -> dict:
    return {"id": 11, "result": list(regions), "updated_at": "2024-01-01T00:00:00Z", "was_cancelled": False}


@pytest.mark.parametrize("tag", TAGS)
def test_backend_starts_from_the_brush_or_polygon_on_screen_mapped_into_the_stored_grid(env, client, tag):
    from backend_support import keypoint, pixel

    from pipeline.polygons import rasterize

    size = displayed_size_of(tag)
    h, w = size
    image_id = file_name(tag)
    on_screen = np.zeros(size, dtype=bool)
    on_screen[h // 4: h * 3 // 4, w // 5: w * 3 // 5] = True  # an off-centre block, so a wrong grid shows
    items = [keypoint(30, 40, size, item_id="s1"), keypoint(85, 85, size, item_id="s2")]
    clicks = [stored_click(pixel(30, 40, size), STORED, tag), stored_click(pixel(85, 85, size), STORED, tag)]
    got = brush(predict(client, image_id, items, [annotation(brush_region(on_screen))]), size)
    want = shown(reference(env, image_id, clicks, initial_mask=unshown(on_screen, STORED, tag)), tag)
    assert np.array_equal(got, want)
    points = [[15.0, 20.0], [58.0, 22.0], [50.0, 80.0], [18.0, 70.0]]  # percent of the displayed width / height
    polygon = {"id": "poly-onscreen", "type": "polygonlabels", "from_name": "poly", "to_name": "image",
               "original_width": w, "original_height": h, "value": {"points": points, "polygonlabels": ["object"]}}
    drawn = rasterize([(np.asarray(points) * [w / 100.0, h / 100.0]).reshape(-1).tolist()], size)
    got = brush(predict(client, image_id, items, [annotation(polygon)]), size)
    want = shown(reference(env, image_id, clicks, initial_mask=unshown(drawn, STORED, tag)), tag)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("tag", [1, 3, 6, 7])
def test_backend_replays_the_displayed_grid_clicks_a_pre_annotated_region_carries(env, client, tag, caplog):
    import logging

    from backend_support import keypoint, pixel

    from connectors.region_meta import click_meta

    size = displayed_size_of(tag)
    image_id = file_name(tag)
    for x, y in [(45, 50), (30, 40), (50, 30), (60, 40), (35, 65), (55, 70)]:  # a click whose mask covers it
        made_by = [pixel(x, y, size)]  # what a pre-annotation clicked, on the grid Label Studio shows
        stored_made_by = [stored_click(c, STORED, tag) for c in made_by]
        on_screen = shown(reference(env, image_id, stored_made_by), tag)
        if on_screen[made_by[0].row, made_by[0].col]:
            break
    else:
        pytest.fail("no click of the list is covered by its own mask")
    meta = click_meta([[c.row, c.col, 1] for c in made_by], env["fingerprint"])
    items = [keypoint(x, y, size, item_id="m1"), keypoint(10, 90, size, positive=False, item_id="m2")]
    with caplog.at_level(logging.INFO, logger="connectors"):
        got = brush(predict(client, image_id, items, [annotation(brush_region(on_screen, meta=meta))]), size)
    kinds = [getattr(r, "fields", {}).get("start_kind") for r in caplog.records]
    assert "clicks" in kinds  # the meta's clicks reproduced the region: the session continues them
    clicks = [stored_click(pixel(x, y, size), STORED, tag), stored_click(pixel(10, 90, size, False), STORED, tag)]
    want = shown(reference(env, image_id, clicks, initial_clicks=stored_made_by), tag)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("tag", [3, 6])
def test_on_demand_encoding_records_the_tag_and_answers_on_the_displayed_grid(env, client, tag):
    from backend_support import keypoint, pixel

    from pipeline.feature_store import FeatureReader

    size = displayed_size_of(tag)
    path = str(env["images"] / "ondemand" / file_name(tag))
    got = brush(predict(client, None, [keypoint(40, 55, size)], image=path), size)
    assert FeatureReader(str(env["tmp"] / "db"), env["fingerprint"], table="features").get_record(path).exif_orientation == tag
    want = shown(reference(env, path, [stored_click(pixel(40, 55, size), STORED, tag)]), tag)
    assert np.array_equal(got, want)


def test_a_row_stored_before_the_tag_was_recorded_is_refused_with_how_to_record_it(client):
    from backend_support import keypoint

    r = predict(client, "legacy6", [keypoint(40, 55, STORED[::-1])])
    assert r.status_code == 422
    assert "EXIF orientation" in r.json()["error"] and "re-encode" in r.json()["error"]
    r = predict(client, file_name(6), [keypoint(40, 55, STORED)])  # a known tag: the stored size is wrong now
    assert r.status_code == 422 and "another file" in r.json()["error"]


# --- Label Studio pre-annotation: task prompts -> worker -> prediction, in-process ------------------------------

PRE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="object"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image"><Label value="object"/></RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def workers(env):
    from pipeline.encoding import EncoderSpec
    from pipeline.preannotation import MaskFormat, PreannotateWorker, WorkerSpec

    spec = WorkerSpec(encoder=EncoderSpec(checkpoint=str(env["ckpt"])), db=str(env["tmp"] / "db"), table="features")
    return {"brushlabels": PreannotateWorker(spec),
            "polygonlabels": PreannotateWorker(WorkerSpec(**{**spec.__dict__, "output": MaskFormat("polygon")}))}


def ls_task(tag: int) -> dict:
    """A task whose annotation holds a rectangle and two keypoints outside it, drawn on the displayed grid."""
    from backend_support import keypoint, rectangle

    size = displayed_size_of(tag)
    regions = [rectangle(20, 25, 45, 50, size, item_id="r1"), keypoint(80, 80, size, item_id="p1"),
               keypoint(10, 90, size, positive=False, item_id="p2")]
    return {"id": 100 + tag, "data": {"image": f"/data/{file_name(tag)}", "image_id": file_name(tag)},
            "annotations": [{"id": 1, "result": regions, "updated_at": "2024-01-01"}], "predictions": []}


@pytest.mark.parametrize("tag", TAGS)
def test_preannotation_of_label_studio_prompts_is_pushed_on_the_displayed_grid(env, workers, tag):
    from backend_support import pixel

    from connectors.label_studio_prompts import prediction_for, region_id, task_prompts
    from connectors.protocol import box_to_click, parse_label_config
    from connectors.rle import rle_to_mask
    from pipeline.polygons import rasterize
    from pipeline.prompts import decode_rle

    size = displayed_size_of(tag)
    image_id = file_name(tag)
    config = parse_label_config(PRE_CONFIG)
    prompt_set = task_prompts([ls_task(tag)], config, config.brushes["image"])
    assert not prompt_set.problems and len(prompt_set.images) == 1
    job = prompt_set.images[0]
    box_click, region = box_to_click({"x": 20, "y": 25, "width": 45, "height": 50}, size)
    want_box = reference(env, image_id, [stored_click(box_click, STORED, tag)], stored_box(region, STORED, tag))
    shown_points = [pixel(80, 80, size), pixel(10, 90, size, False)]
    want_points = reference(env, image_id, [stored_click(c, STORED, tag) for c in shown_points])
    result = workers["brushlabels"].run(job)
    assert all(o.ok for o in result.objects), [o.detail for o in result.objects]
    assert tuple(result.size) == STORED  # results (and COCO output) stay in the stored grid
    by_kind = {o.kind: o for o in result.objects}
    assert np.array_equal(decode_rle(by_kind["box"].rle), want_box)
    assert np.array_equal(decode_rle(by_kind["points"].rle), want_points)
    pushed = prediction_for(result, 100 + tag, config.brushes["image"], MV, env["fingerprint"])
    regions = {r["id"]: r for r in pushed["result"]}
    for kind, want in (("box", want_box), ("points", want_points)):
        r = regions[region_id(by_kind[kind].key)]
        assert (r["original_height"], r["original_width"]) == size
        assert np.array_equal(rle_to_mask(r["value"]["rle"], *size), shown(want, tag))
    meta = regions[region_id(by_kind["points"].key)]["meta"]["interformer"]["clicks"]
    assert meta == [[c.row, c.col, int(c.positive)] for c in shown_points]  # what the backend replays
    result = workers["polygonlabels"].run(job)
    pushed = prediction_for(result, 100 + tag, config.polygons["image"], MV, env["fingerprint"])
    stored_polygons = {o.key: o.polygons for o in result.objects}
    for o in result.objects:
        parts = [r for r in pushed["result"] if r["id"].startswith(region_id(o.key) + "-")]
        assert parts and all((r["original_height"], r["original_width"]) == size for r in parts)
        drawn = rasterize([(np.asarray(r["value"]["points"]) * [size[1] / 100.0, size[0] / 100.0]).reshape(-1).tolist()
                           for r in parts], size)
        assert np.array_equal(drawn, shown(rasterize(stored_polygons[o.key], STORED), tag))


# --- a feature table made before the column existed ----------------------------------------------------------


def test_a_table_made_before_the_orientation_column_is_read_and_written(tmp_path):
    import lance
    import lancedb
    import pyarrow as pa
    import torch

    from interformer.features import ImageFeatures, ImageGeometry, pyramid_shapes
    from pipeline.feature_store import (
        ERROR_SCHEMA,
        FEATURE_SCHEMA,
        EncodedImage,
        FeatureReader,
        FeatureStore,
        feature_rows,
        write_feature_fragments,
    )

    def features(seed: int) -> ImageFeatures:
        gen = torch.Generator().manual_seed(seed)
        geometry = ImageGeometry((40, 70), (40, 70), (64, 96), 1.0)
        return ImageFeatures(tuple(torch.randn(1, *s, generator=gen) for s in pyramid_shapes((64, 96))), geometry)

    old_schema = pa.schema([f for f in FEATURE_SCHEMA if f.name != "exif_orientation"])
    old_rows = feature_rows([EncodedImage(i, f"/data/{i}", f"{n:064x}", features(n)) for n, i in enumerate("ab")],
                            "fp", "float32").select(old_schema.names)
    db = lancedb.connect(str(tmp_path / "db"))
    db.create_table("features", data=old_rows, schema=old_schema)
    db.create_table("features_errors", schema=ERROR_SCHEMA)

    reader = FeatureReader(str(tmp_path / "db"), "fp", table="features", refresh_interval_s=0)
    assert reader.get_record("a").exif_orientation is None  # a reader needs no writer to have opened it first
    store = FeatureStore(str(tmp_path / "db"))  # a writer gives the old table the column, all null
    FeatureStore(str(tmp_path / "db"))  # and a second one finds it there
    assert "exif_orientation" in lance.dataset(store.features_uri).schema.names
    assert store.add(feature_rows([EncodedImage("c", "/data/c", "c" * 64, features(2), 6)], "fp", "float32")) == 1
    written = write_feature_fragments(store.features_uri, feature_rows(
        [EncodedImage("d", "/data/d", "d" * 64, features(3), 3)], "fp", "float32"))  # the encode job's way
    assert store.commit_fragments(written).added == [("d", "fp")]
    got = {i: reader.get_record(i) for i in "abcd"}
    assert {i: r.exif_orientation for i, r in got.items()} == {"a": None, "b": None, "c": 6, "d": 3}
    for n, i in enumerate("abcd"):
        assert all(torch.equal(x, y) for x, y in zip(got[i].features.pyramid, features(n).pyramid))
    assert store.existing_ids("fp") == set("abcd")


# --- a running backend after `--check-content` fills in a legacy row's tag ---------------------------------------


def test_a_running_backend_answers_as_a_fresh_one_once_a_legacy_rows_tag_is_filled_in(env, tmp_path):
    """For every tag: the engine served (and cached features, tag and a session of) a legacy row read as
    untagged; `FeatureStore.fill_exif_orientation` records the tag in place (an update of one column); once the
    reader moves, the running engine answers exactly as a freshly started one does, on the displayed grid."""
    from backend_support import encode_into_store

    from connectors.engine import EngineConfig, SegmentEngine
    from connectors.rle import rle_to_mask
    from connectors.segment import SegmentError, SegmentRequest
    from pipeline.feature_store import FeatureStore

    ids = {tag: f"legacy-tag{tag}" for tag in TAGS}
    fingerprint = encode_into_store(env["ckpt"], tmp_path / "db", "features",
                                    [(i, f"/x/{i}.jpg", env["pixels"]) for i in ids.values()])
    cfg = EngineConfig(db=str(tmp_path / "db"), table="features", checkpoint=str(env["ckpt"]), threads=1)

    def answer(engine: SegmentEngine, tag: int):
        size = displayed_size_of(tag)
        req = SegmentRequest(clicks=(Click(10, 12, True),), original_size=size, image_id=ids[tag], task_id=1,
                             region_key=f"region-{tag}")  # the same region before and after the fill
        try:
            return rle_to_mask(engine.segment(req).rle, *size)
        except SegmentError as e:
            return e.status

    running = SegmentEngine(cfg, None)
    before = {tag: answer(running, tag) for tag in TAGS}
    assert all(isinstance(before[t], np.ndarray) for t in range(1, 5))  # untagged: the stored grid
    assert all(before[t] == 422 for t in range(5, 9))  # a transposed size with no tag: "re-encode"
    filled = FeatureStore(str(tmp_path / "db"), "features").fill_exif_orientation(
        {i: t for t, i in ids.items()}, fingerprint)
    assert filled == len(TAGS)
    running.reader.refresh_interval_s = 0  # the reader moves to the new version at the next request
    fresh = SegmentEngine(cfg, None)
    for tag in TAGS:
        got, want = answer(running, tag), answer(fresh, tag)
        assert isinstance(want, np.ndarray) and want.shape == displayed_size_of(tag)
        assert isinstance(got, np.ndarray) and np.array_equal(got, want), f"tag {tag}"


@pytest.mark.parametrize("tag", [None, 0, 9, -1, 1, 3, 6, 8])
def test_a_size_mismatch_is_explained_for_any_stored_tag(tag):
    """A foreign table may hold a tag outside 1..8: the refusal still explains itself (no ValueError -> 500)."""
    from connectors.engine import size_mismatch

    text = size_mismatch("img", (100, 90), (48, 64), tag)
    assert "img" in text and "100x90" not in text and "90x100" in text
