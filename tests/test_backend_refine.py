"""The backend refines the mask on screen (connectors/onscreen.py): which mask wins, and that a region's
session starts from it, keeps it while clicks are added, and answers what the API's `initial_mask`
session answers. Real model, real feature table, the in-process engine behind the FastAPI app."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from backend_support import (LABEL_CONFIG, encode_into_store, grabcut_images, keypoint, make_checkpoint,
                             model_fingerprint, pixel, reference_mask, write_png)
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.engine import EngineConfig, InProcessSegmenter
from connectors.onscreen import INTERACTIVE_ID_PREFIX, StartCandidates, onscreen_candidates, start_region
from connectors.region_meta import MAX_START_CLICKS, click_meta, model_key, parse_click_meta
from connectors.protocol import ContextItem, ProtocolError, Task, parse_label_config, prompt_from_items
from connectors.rle import mask_to_rle, rle_to_mask
from connectors.server import ServerSettings, create_app
from interformer.clicks import Click
from pipeline.polygons import mask_to_polygons

SIZE = (64, 96)
CONFIG = parse_label_config(LABEL_CONFIG)


def blob(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros(SIZE, dtype=bool)
    m[top:bottom, left:right] = True
    return m


def region(mask: np.ndarray, label: str = "object", rid: str = "r1", **extra) -> dict:
    return {"id": rid, "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_height": SIZE[0],
            "original_width": SIZE[1], "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
            **extra}


def polygon_region(points, label: str = "object", rid: str = "p1") -> dict:
    return {"id": rid, "type": "polygonlabels", "from_name": "poly", "to_name": "image", "original_height": SIZE[0],
            "original_width": SIZE[1], "value": {"points": points, "polygonlabels": [label], "closed": True}}


def prompt(x: float, y: float):
    return prompt_from_items([ContextItem.model_validate(keypoint(x, y, SIZE))], CONFIG)


LEFT, RIGHT = blob(10, 5, 50, 40), blob(10, 50, 50, 90)
ON_LEFT, ON_RIGHT = (20.0, 50.0), (75.0, 50.0)  # percent (x, y): inside LEFT / inside RIGHT


def chosen(task: Task, xy=ON_LEFT) -> tuple[str | None, np.ndarray | None]:
    p = prompt(*xy)
    cands = onscreen_candidates(task, p)
    found = start_region(cands, p.clicks)
    return (cands.source if cands else None), (None if found is None else found.mask)


def test_saved_annotation_or_draft_wins_over_predictions_newest_first():
    pred = {"id": 1, "created_at": "2026-11-26T10:00:00Z", "result": [region(LEFT)]}
    older = {"id": 2, "updated_at": "2026-11-26T10:05:00Z", "result": [region(RIGHT), region(LEFT, rid="x")]}
    newer = {"id": 3, "updated_at": "2026-11-26T10:09:00Z", "result": [region(LEFT | RIGHT)]}
    source, mask = chosen(Task(id=1, data={}, predictions=[pred]))
    assert source == "prediction:1" and np.array_equal(mask, LEFT)
    source, mask = chosen(Task(id=1, data={}, predictions=[pred], annotations=[older]))
    assert source == "annotation:2" and np.array_equal(mask, LEFT)  # the region under the click
    source, mask = chosen(Task(id=1, data={}, predictions=[pred], annotations=[older], drafts=[newer]))
    assert source == "draft:3" and np.array_equal(mask, LEFT | RIGHT)
    cancelled = {**newer, "was_cancelled": True}
    assert chosen(Task(id=1, data={}, annotations=[older, cancelled]))[0] == "annotation:2"


def test_polygon_regions_are_start_masks_too():
    (points,) = mask_to_polygons(LEFT).label_studio_points()
    source, mask = chosen(Task(id=1, data={}, predictions=[{"id": 8, "result": [polygon_region(points)]}]))
    assert source == "prediction:8" and np.array_equal(mask, LEFT)
    huge = polygon_region([[-1e12, -1e12], [1e12, -1e12], [1e12, 1e12], [-1e12, 1e12]])  # clipped to the image
    assert chosen(Task(id=1, data={}, drafts=[{"id": 9, "result": [huge]}]))[1].all()


def test_saved_work_without_the_object_does_not_resurrect_the_prediction():
    pred = {"id": 1, "result": [region(LEFT)]}
    ann = {"id": 2, "updated_at": "2026-11-26T10:05:00Z", "result": [region(RIGHT)]}
    source, mask = chosen(Task(id=1, data={}, predictions=[pred], annotations=[ann]))
    assert source == "annotation:2" and mask is None  # a blank start: the annotator removed that object


def test_regions_of_other_labels_tags_sizes_ours_and_corrupt_ones_are_ignored():
    bad_rle = region(LEFT)
    bad_rle["value"]["rle"] = [300, -1]
    wrong_size = region(LEFT)
    wrong_size["original_width"] = 95
    others = [region(LEFT, label="dog"), {**region(LEFT), "to_name": "other"}, wrong_size, bad_rle,
              region(LEFT, rid=INTERACTIVE_ID_PREFIX + "abc"), {**region(LEFT), "type": "polygonlabels"},
              polygon_region([[10, 10], [20, 10]]), polygon_region([[10, 10], [20, "x"], [5, 5]])]
    assert onscreen_candidates(Task(id=1, data={}, drafts=[{"id": 4, "result": others}]), prompt(*ON_LEFT)) is None
    truncated = StartCandidates("prediction:9", (("rle", np.asarray(mask_to_rle(LEFT)[:8], dtype=np.uint8), None),), SIZE)
    assert start_region(truncated, prompt(*ON_LEFT).clicks) is None
    assert start_region(None, prompt(*ON_LEFT).clicks) is None
    negative_only = (Click(30, 20, False),)
    cands = onscreen_candidates(Task(id=1, data={}, predictions=[{"id": 1, "result": [region(LEFT)]}]),
                                prompt(*ON_LEFT))
    assert start_region(cands, negative_only) is None


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    ckpt = make_checkpoint(tmp / "small.pth")
    (name, img), = grabcut_images(1, SIZE)
    encode_into_store(ckpt, tmp / "db", "features", [("img-0", str(write_png(img, tmp / f"{name}.png")), img)])
    cfg = EngineConfig(db=str(tmp / "db"), table="features", checkpoint=str(ckpt), variant="small", threads=2)
    with TestClient(create_app(ServerSettings(model_version="mv"), InProcessSegmenter(cfg, False))) as client:
        yield {"tmp": tmp, "ckpt": ckpt, "client": client}


def ask(env, items: list[dict], predictions=(), drafts=()) -> tuple[np.ndarray, dict, str]:
    task = {"id": 7, "data": {"image_id": "img-0"}, "annotations": [], "drafts": list(drafts),
            "predictions": list(predictions)}
    r = env["client"].post("/predict", json={"tasks": [task], "label_config": LABEL_CONFIG, "project": "1.1",
                                             "params": {"context": {"result": items}}})
    assert r.status_code == 200, r.text
    (reg,) = r.json()["results"][0]["result"]
    return rle_to_mask(reg["value"]["rle"], *SIZE), reg, r.headers["server-timing"]


def expected(env, clicks, initial=None, initial_clicks=None) -> np.ndarray:
    return reference_mask(env["ckpt"], env["tmp"] / "db", "features", "img-0", clicks, initial_mask=initial,
                          initial_clicks=initial_clicks)


PRE = [Click(30, 20, True), Click(5, 5, False), Click(40, 30, True)]  # a pre-annotation's clicks (inside LEFT)


def as_lists(clicks) -> list[list[int]]:
    return [[c.row, c.col, int(c.positive)] for c in clicks]


def inside_keypoint(mask: np.ndarray, item_id: str) -> tuple[dict, Click]:
    """A keypoint at a pixel in the middle of `mask`'s foreground, and the click it becomes."""
    inside = np.argwhere(mask)
    row, col = inside[len(inside) // 2]
    x, y = (col + 0.5) * 100.0 / SIZE[1], (row + 0.5) * 100.0 / SIZE[0]
    return keypoint(x, y, SIZE, item_id=item_id), pixel(x, y, SIZE)


def test_a_prediction_that_carries_its_clicks_continues_that_session(env):
    """What jobs/preannotate.py pushes (the mask and, in meta, the clicks that made it) is refined by
    replaying those clicks first: the answers equal one session that made PRE and then the annotator's
    clicks, not the session from the mask alone."""
    pre_mask = expected(env, PRE)
    meta = click_meta(as_lists(PRE), model_fingerprint(env["ckpt"]))
    pred = {"id": 21, "result": [region(pre_mask, meta=meta)]}
    item, click = inside_keypoint(pre_mask, "c1")
    mask, reg, _ = ask(env, [item], predictions=[pred])
    np.testing.assert_array_equal(mask, expected(env, PRE + [click]))
    assert not np.array_equal(mask, expected(env, [click], pre_mask))
    assert "meta" not in reg  # the backend's answers carry no clicks of their own
    second = [item, keypoint(90, 90, SIZE, positive=False, item_id="c2")]
    mask, _, _ = ask(env, second, predictions=[pred])
    np.testing.assert_array_equal(mask, expected(env, PRE + [click, pixel(90, 90, SIZE, positive=False)]))


def test_refine_from_mask_ignores_the_clicks(env):
    """`--refine-from mask`: the same pre-annotated region starts from its mask, no replay."""
    pre_mask = expected(env, PRE)
    pred = {"id": 24, "result": [region(pre_mask, meta=click_meta(as_lists(PRE), model_fingerprint(env["ckpt"])))]}
    item, click = inside_keypoint(pre_mask, "m1")
    cfg = EngineConfig(db=str(env["tmp"] / "db"), table="features", checkpoint=str(env["ckpt"]), variant="small",
                       threads=2, refine_from="mask")
    with TestClient(create_app(ServerSettings(model_version="mv"), InProcessSegmenter(cfg, False))) as client:
        mask, _, _ = ask({**env, "client": client}, [item], predictions=[pred])
    np.testing.assert_array_equal(mask, expected(env, [click], pre_mask))
    with pytest.raises(ValueError, match="refine_from"):
        EngineConfig(db="db", table="t", checkpoint=None, refine_from="scratch")


def test_clicks_of_another_model_or_that_no_longer_give_the_mask_fall_back_to_the_mask(env):
    pre_mask = expected(env, PRE)
    item, click = inside_keypoint(pre_mask, "d1")
    other_model = {"id": 22, "result": [region(pre_mask, meta=click_meta(as_lists(PRE), "another model"))]}
    mask, _, _ = ask(env, [item], predictions=[other_model])
    np.testing.assert_array_equal(mask, expected(env, [click], pre_mask))
    # the region was edited after pre-annotation (here: replaced by another shape): its clicks are stale
    edited = np.zeros_like(pre_mask)
    edited[row_slice(pre_mask)] = True
    stale = {"id": 23, "result": [region(edited, meta=click_meta(as_lists(PRE), model_fingerprint(env["ckpt"])))]}
    item, click = inside_keypoint(edited, "d2")
    mask, _, _ = ask(env, [item], predictions=[stale])
    np.testing.assert_array_equal(mask, expected(env, [click], edited))


def row_slice(mask: np.ndarray) -> slice:
    """A band of rows through the middle of the mask's foreground (an edit far from the replayed mask)."""
    rows = np.flatnonzero(mask.any(axis=1))
    mid = (rows[0] + rows[-1]) // 2
    return slice(max(0, mid - 3), mid + 3)


def test_a_click_on_a_predicted_object_refines_that_mask_and_keeps_it_for_the_session(env):
    pred = {"id": 11, "created_at": "2026-11-26T10:00:00Z", "result": [region(LEFT)]}
    first = [keypoint(*ON_LEFT, SIZE, item_id="a1")]
    clicks = [pixel(*ON_LEFT, SIZE)]
    mask, reg, timing = ask(env, first, predictions=[pred])
    refined = expected(env, clicks, LEFT)
    np.testing.assert_array_equal(mask, refined)
    assert not np.array_equal(refined, expected(env, clicks))  # a fresh session answers otherwise
    assert reg["id"].startswith(INTERACTIVE_ID_PREFIX) and "start_mask" in timing
    # The annotator's draft now holds our answer; the next click still refines the prediction's session,
    # decodes nothing, and the draft's region (ours) is never taken as a start mask.
    second = first + [keypoint(60, 20, SIZE, positive=False, item_id="a2")]
    clicks.append(pixel(60, 20, SIZE, positive=False))
    draft = {"id": 5, "updated_at": "2026-11-26T10:01:00Z", "result": [reg]}
    mask, _, timing = ask(env, second, predictions=[pred], drafts=[draft])
    np.testing.assert_array_equal(mask, expected(env, clicks, LEFT))
    assert "start_mask" not in timing


def test_a_click_off_every_mask_starts_blank(env):
    pred = {"id": 12, "result": [region(LEFT)]}
    mask, _, _ = ask(env, [keypoint(*ON_RIGHT, SIZE, item_id="b1")], predictions=[pred])
    np.testing.assert_array_equal(mask, expected(env, [pixel(*ON_RIGHT, SIZE)]))


POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="object" smart="true"/><Label value="thing" smart="true"/>
  </KeyPointLabels>
  <PolygonLabels name="poly" toName="image"><Label value="object"/></PolygonLabels>
  <BrushLabels name="tag" toName="image"><Label value="thing"/></BrushLabels>
</View>"""


def test_polygon_labels_answer_with_polygons_brush_labels_with_brush(env):
    config = parse_label_config(POLYGON_CONFIG)
    assert config.polygons["image"].name == "poly" and config.brushes["image"].name == "tag"
    assert prompt_from_items([ContextItem.model_validate(keypoint(*ON_LEFT, SIZE))], config).output_type == "polygonlabels"
    items = [keypoint(*ON_RIGHT, SIZE, item_id="p1")]
    task = {"id": 9, "data": {"image_id": "img-0"}, "annotations": [], "drafts": [], "predictions": []}
    r = env["client"].post("/predict", json={"tasks": [task], "label_config": POLYGON_CONFIG, "project": "2.1",
                                             "params": {"context": {"result": items}}})
    assert r.status_code == 200, r.text
    regions = r.json()["results"][0]["result"]
    want = mask_to_polygons(expected(env, [pixel(*ON_RIGHT, SIZE)]))
    assert [g["value"]["points"] for g in regions] == want.label_studio_points() and regions
    assert all(g["type"] == "polygonlabels" and g["from_name"] == "poly" and g["value"]["polygonlabels"] == ["object"]
               and g["id"].startswith(INTERACTIVE_ID_PREFIX) for g in regions)
    thing = [keypoint(*ON_RIGHT, SIZE, label="thing", item_id="t1")]
    r = env["client"].post("/predict", json={"tasks": [task], "label_config": POLYGON_CONFIG, "project": "2.1",
                                             "params": {"context": {"result": thing}}})
    (brush,) = r.json()["results"][0]["result"]
    assert brush["type"] == "brushlabels" and brush["from_name"] == "tag"
    bad = [keypoint(*ON_RIGHT, SIZE, label="dog", item_id="d1")]
    r = env["client"].post("/predict", json={"tasks": [task], "label_config": POLYGON_CONFIG, "project": "2.1",
                                             "params": {"context": {"result": bad}}})
    assert r.status_code == 422 and "'dog'" in r.json()["error"]
    only_polygons = POLYGON_CONFIG.replace('<BrushLabels name="tag" toName="image"><Label value="thing"/></BrushLabels>', "")
    assert parse_label_config(only_polygons).brushes == {}
    with pytest.raises(ProtocolError, match="PolygonLabels toName='elsewhere'"):
        parse_label_config(only_polygons.replace('toName="image"><Label value="object"/>',
                                                 'toName="elsewhere"><Label value="object"/>'))


_json = st.recursive(st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=5),
                     lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                       max_size=4), max_leaves=20)
_value = st.fixed_dictionaries({}, optional={"format": st.sampled_from(["rle", "x"]), "rle": _json,
                                             "points": _json, "brushlabels": st.just(["object"]) | _json,
                                             "polygonlabels": st.just(["object"]) | _json})
_click = st.lists(st.integers(-2, 100) | st.booleans() | st.floats(allow_nan=True) | _json, min_size=0, max_size=4)
_meta = st.fixed_dictionaries({"interformer": st.fixed_dictionaries({}, optional={
    "model": st.just(model_key("fp")) | st.text(max_size=17) | _json,
    "clicks": st.lists(_click | _json, max_size=MAX_START_CLICKS + 2) | _json}) | _json})
_region = st.fixed_dictionaries({"type": st.sampled_from(["brushlabels", "polygonlabels", "keypointlabels"]) | _json},
                                optional={"id": _json, "to_name": st.just("image") | _json, "value": _value | _json,
                                          "meta": _meta | _json,
                                          "original_height": st.just(SIZE[0]) | _json,
                                          "original_width": st.just(SIZE[1]) | _json})
_item = st.fixed_dictionaries({}, optional={"id": _json, "result": st.lists(_region, max_size=3) | _json,
                                            "updated_at": _json, "created_at": _json, "was_cancelled": _json})


@settings(max_examples=200, deadline=None)
@given(st.lists(_item, max_size=2), st.lists(_item, max_size=2), st.lists(_item, max_size=2))
def test_hostile_task_contents_never_break_a_click(annotations, drafts, predictions):
    task = Task(id=1, data={}, annotations=annotations, drafts=drafts, predictions=predictions)
    p = prompt(*ON_LEFT)
    found = start_region(onscreen_candidates(task, p), p.clicks)
    assert found is None or (found.mask.shape == SIZE and found.mask.dtype == bool)
    if found is not None and found.clicks is not None:
        assert found.clicks.model == model_key("fp") and 0 < len(found.clicks.clicks) <= MAX_START_CLICKS
        assert all(0 <= c.row < SIZE[0] and 0 <= c.col < SIZE[1] for c in found.clicks.clicks)


_any_id = (st.integers() | st.text(max_size=300) | st.text(min_size=1, max_size=3).map(lambda t: t * 10_000)
           | st.lists(st.integers(), max_size=2000) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=50)
           | st.floats(allow_nan=True) | st.none() | st.booleans())


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["annotation", "draft", "prediction"]), item_id=_any_id, other=_any_id)
def test_a_start_source_is_short_whatever_id_the_client_chose(kind, item_id, other):
    """The source names the saved item a session starts from; it is kept with every session and logged, so an id
    of megabytes (or a list, an object) must not be kept or logged whole; two different ids stay two sources."""
    task = Task(id=1, data={}, **{f"{kind}s": [{"id": item_id, "result": [region(LEFT)]}]})
    source, mask = chosen(task)
    assert mask is not None and source.startswith(f"{kind}:") and len(source) <= len(kind) + 1 + 64
    if isinstance(item_id, str) and len(item_id) <= 64 or isinstance(item_id, int) and not isinstance(item_id, bool) \
            and abs(item_id) < 10**18:
        assert source == f"{kind}:{item_id}"
    if repr(other) != repr(item_id) and type(other) is type(item_id):
        other_source, _ = chosen(Task(id=1, data={}, **{f"{kind}s": [{"id": other, "result": [region(LEFT)]}]}))
        assert other_source != source


_REGION_IDS = itertools.count()  # a new region per example: a stored session would answer from its own start


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 100), st.integers(-3, 100), st.integers(-1, 2)), max_size=MAX_START_CLICKS + 3))
def test_any_clicks_in_a_regions_meta_answer_or_fall_back_never_fail(env, raw):
    """Clicks of this very model, in or out of the image, too many, odd flags: the click is always answered,
    from the replayed clicks when they are valid and reproduce the region, else from its mask."""
    meta = {"interformer": {"model": model_key(model_fingerprint(env["ckpt"])), "clicks": [list(c) for c in raw]}}
    pred = {"id": 30, "result": [region(LEFT, meta=meta)]}
    mask, _, _ = ask(env, [keypoint(*ON_LEFT, SIZE, item_id=f"h{next(_REGION_IDS)}")], predictions=[pred])
    valid = parse_click_meta(meta, SIZE)
    assert valid is None or list(valid.clicks) == [Click(r, c, bool(p)) for r, c, p in raw]
    click = pixel(*ON_LEFT, SIZE)
    assert (np.array_equal(mask, expected(env, [click], LEFT))
            or (valid is not None and np.array_equal(mask, expected(env, [click], initial_clicks=list(valid.clicks)))))


def test_click_meta_round_trips_and_refuses_what_it_would_not_write():
    clicks = as_lists(PRE)
    meta = click_meta(clicks, "fp")
    assert parse_click_meta(meta, SIZE).clicks == tuple(PRE) and parse_click_meta(meta, SIZE).model == model_key("fp")
    assert click_meta([], "fp") is None and click_meta([[1, 1, 1]] * (MAX_START_CLICKS + 1), "fp") is None
    assert parse_click_meta(meta, (40, 96)) is None  # a click on row 40 of a 40-row image
    for bad in ({"interformer": {**meta["interformer"], "model": "fp"}},
                {"interformer": {**meta["interformer"], "clicks": [[1.0, 2, 1]]}},
                {"interformer": {**meta["interformer"], "clicks": [[True, 2, 1]]}},
                {"interformer": {**meta["interformer"], "clicks": [[1, 2, 2]]}},
                {"interformer": {**meta["interformer"], "clicks": []}}, {"text": ["a note"]}, None, []):
        assert parse_click_meta(bad, SIZE) is None


def test_an_rle_claiming_another_size_is_refused_before_decoding():
    rle = mask_to_rle(LEFT)
    with pytest.raises(ValueError, match="pixels"):
        rle_to_mask([255, 255, 255, 252] + rle[4:], *SIZE)  # ~1e9 pixels claimed: never allocated
    with pytest.raises(ValueError, match="header"):
        rle_to_mask([1, 2], *SIZE)
    assert np.array_equal(rle_to_mask(rle, *SIZE), LEFT)
