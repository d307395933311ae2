"""The backend's answer is the model's mask for the request, whatever came before it.

A long-lived engine caches features (LRU), sessions and their start masks; none of that may show in an
answer: a re-encoded image is served with its new features once the reader sees the new table version, and
a click list answers the same after any edit history as on a fresh engine. Real parts throughout: the FastAPI
app in-process with the engine, a real Lance table, the seeded small model.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from backend_support import LABEL_CONFIG, grabcut_images, make_checkpoint
from fastapi.testclient import TestClient

from connectors.engine import EngineConfig, InProcessSegmenter, mask_score
from connectors.rle import rle_to_mask
from connectors.server import ServerSettings, create_app
from interformer.clicks import Click
from pipeline.feature_store import EncodedImage, FeatureReader, FeatureStore, feature_rows

SIZE = (64, 96)
IMAGE = "img-0"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The checkpoint and the predictor jobs/encode.py builds from it."""
    from pipeline.encoding import EncoderSpec, build_predictor

    ckpt = make_checkpoint(tmp_path_factory.mktemp("history") / "small.pth")
    return ckpt, build_predictor(EncoderSpec(checkpoint=str(ckpt), variant="small"), device="cpu")


def _store(db, predictor, items) -> None:
    rows = [EncodedImage(i, f"/x/{i}.png", hashlib.sha256(img.tobytes()).hexdigest(), predictor.encode(img))
            for i, img in items]
    FeatureStore(str(db), "features").add(feature_rows(rows, predictor.fingerprint))


def _serve(db, ckpt, **cfg) -> tuple[InProcessSegmenter, TestClient]:
    segmenter = InProcessSegmenter(EngineConfig(db=str(db), table="features", checkpoint=str(ckpt), variant="small",
                                                threads=1, **cfg), encode_on_demand=False)
    return segmenter, TestClient(create_app(ServerSettings(model_version="mv"), segmenter))


def keypoint_at(row: int, col: int, size, positive: bool = True, item_id: str = "k1") -> dict:
    """A keypoint context item that becomes exactly the click (row, col)."""
    h, w = size
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": (col + 0.5) * 100.0 / w, "y": (row + 0.5) * 100.0 / h, "width": 0.6,
                      "keypointlabels": ["object"]},
            "is_positive": positive, "id": item_id, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}


def ask(client, image_id: str, items: list, task_id: int = 7, predictions=()) -> tuple[np.ndarray, dict]:
    """The returned mask (empty when the answer has no region) and the answer's region."""
    body = {"tasks": [{"id": task_id, "data": {"image_id": image_id, "image": f"/x/{image_id}.png"},
                       "annotations": [], "predictions": list(predictions)}],
            "project": "3.1795474399", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": items}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]["result"]
    h, w = items[0]["original_height"], items[0]["original_width"]
    if not result:
        return np.zeros((h, w), bool), {}
    return rle_to_mask(result[0]["value"]["rle"], h, w).astype(bool), result[0]


def reference(predictor, db, image_id: str, clicks: list[Click]) -> np.ndarray:
    feats = FeatureReader(str(db), predictor.fingerprint, table="features").get(image_id)
    return predictor.session(feats).replay(clicks).mask


@pytest.mark.parametrize("new_size", [SIZE, (50, 70)], ids=["same-size", "new-size"])
def test_a_reencoded_image_is_served_with_its_new_features(model, tmp_path, new_size):
    """jobs/encode.py --reencode-changed removes an image's row and stores the new picture's under the same id:
    once the reader sees that version, cached features and sessions of the old row are not used again."""
    ckpt, predictor = model
    db = tmp_path / "db"
    old_image, new_image = grabcut_images(3, SIZE)[0][1], grabcut_images(3, new_size)[2][1]
    _store(db, predictor, [(IMAGE, old_image), ("img-other", grabcut_images(2, SIZE)[1][1])])
    segmenter, client = _serve(db, ckpt)
    clicks = [Click(30, 40, True), Click(10, 60, False)]
    items = [keypoint_at(c.row, c.col, SIZE, c.positive, f"k{i}") for i, c in enumerate(clicks)]
    old_mask, _ = ask(client, IMAGE, items)
    assert (old_mask == reference(predictor, db, IMAGE, clicks)).all()
    ask(client, "img-other", items)  # an unchanged image, cached too

    store = FeatureStore(str(db), "features")
    assert store.remove([IMAGE], predictor.fingerprint) == 1
    _store(db, predictor, [(IMAGE, new_image)])
    segmenter.engine.reader.refresh()  # what the reader's periodic check does: no sleep needed

    new_clicks = clicks if new_size == SIZE else [Click(20, 30, True), Click(5, 50, False)]
    new_items = [keypoint_at(c.row, c.col, new_size, c.positive, f"k{i}") for i, c in enumerate(new_clicks)]
    expected = reference(predictor, db, IMAGE, new_clicks)
    if new_size == SIZE:
        assert (expected != old_mask).any()  # the two pictures answer differently
    served, _ = ask(client, IMAGE, new_items)  # the same region and clicks: its old session must not answer
    assert (served == expected).all()
    fresh_region = [dict(it, id=f"n{i}") for i, it in enumerate(new_items)]
    assert (ask(client, IMAGE, fresh_region)[0] == expected).all()
    assert IMAGE in segmenter.engine.features and "img-other" in segmenter.engine.features  # the rest stays cached


def test_a_removed_image_is_no_longer_served_from_the_cache(model, tmp_path):
    """While an image is being encoded again (its row removed), readers find no features for it: a 404, not
    the old features from an engine's cache."""
    ckpt, predictor = model
    db = tmp_path / "db"
    _store(db, predictor, [(IMAGE, grabcut_images(1, SIZE)[0][1])])
    segmenter, client = _serve(db, ckpt)
    items = [keypoint_at(30, 40, SIZE)]
    ask(client, IMAGE, items)
    FeatureStore(str(db), "features").remove([IMAGE], predictor.fingerprint)
    segmenter.engine.reader.refresh()
    body = {"tasks": [{"id": 7, "data": {"image_id": IMAGE}, "annotations": [], "predictions": []}],
            "project": "3.1795474399", "label_config": LABEL_CONFIG,
            "params": {"login": None, "password": None, "context": {"result": items}}}
    response = client.post("/predict", json=body)
    assert response.status_code == 404, response.text


# --------------------------------------------------------------------------------------------------
# The mask never depends on the path taken: random edit sequences on a long-lived engine vs a fresh one


def _blob(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    mask[top:bottom, left:right] = True
    return mask


PRE_REGIONS = [_blob(10, 5, 54, 45), _blob(5, 50, 40, 90)]  # two pre-annotated objects, side by side


def _prediction(masks: list[np.ndarray]) -> dict:
    from connectors.rle import mask_to_rle

    return {"id": 11, "model_version": "bulk", "created_at": "2026-01-01T00:00:00Z",
            "result": [{"id": f"p{i}", "type": "brushlabels", "from_name": "tag", "to_name": "image",
                        "original_width": SIZE[1], "original_height": SIZE[0], "image_rotation": 0,
                        "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": ["object"]}}
                       for i, m in enumerate(masks)]}


@pytest.fixture(scope="module")
def two_engines(model, tmp_path_factory):
    """A long-lived engine and a 'fresh' one (its sessions are forgotten before every request) on one table."""
    ckpt, predictor = model
    db = tmp_path_factory.mktemp("paths") / "db"
    _store(db, predictor, [(IMAGE, grabcut_images(1, SIZE)[0][1])])
    return _serve(db, ckpt), _serve(db, ckpt)


def _apply(clicks: list[Click], edit: tuple) -> list[Click]:
    """One annotator edit of the click list (a no-op where it does not apply)."""
    kind, i, j, point = edit
    out = list(clicks)
    if kind == "add" or not out:
        out.append(Click(point[0], point[1], point[2]))
    elif kind == "undo":
        out.pop()
    elif kind == "move":
        out[i % len(out)] = Click(point[0], point[1], out[i % len(out)].positive)
    elif kind == "flip":
        c = out[i % len(out)]
        out[i % len(out)] = Click(c.row, c.col, not c.positive)
    elif kind == "reorder":
        a, b = i % len(out), j % len(out)
        out[a], out[b] = out[b], out[a]
    return out[:5] or out


def _items(clicks: list[Click]) -> list[dict]:
    """The region's keypoints; the first keeps the region's id whatever click it holds (one region edited)."""
    return [keypoint_at(c.row, c.col, SIZE, c.positive, f"k{i}") for i, c in enumerate(clicks)]


def _edits():
    from hypothesis import strategies as st

    # spots inside each region on screen, near their edges and outside both, then anywhere
    spots = st.sampled_from([(30, 20), (50, 40), (20, 70), (8, 88), (60, 60), (2, 2), (45, 92), (30, 47)])
    anywhere = st.tuples(st.integers(0, SIZE[0] - 1), st.integers(0, SIZE[1] - 1))
    point = st.tuples(st.one_of(spots, anywhere), st.booleans()).map(lambda p: (*p[0], p[1]))
    edit = st.tuples(st.sampled_from(["add", "add", "undo", "move", "flip", "reorder"]), st.integers(0, 4),
                     st.integers(0, 4), point)
    return st.lists(edit, min_size=2, max_size=6)


def test_the_mask_never_depends_on_the_path_taken(two_engines):
    """Add / undo / move / reorder / flip clicks of one region, with and without masks on screen to start from:
    after every edit the long-lived engine answers exactly as an engine that never saw the region."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    (_, lived), (fresh_segmenter, fresh) = two_engines
    task = iter(range(1000, 10_000))

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(edits=_edits(), starts=st.sampled_from([(), (0,), (0, 1)]))
    def check(edits, starts):
        predictions = [_prediction([PRE_REGIONS[i] for i in starts])] if starts else []
        task_id, clicks = next(task), []
        for edit in edits:
            clicks = _apply(clicks, edit)
            if not any(c.positive for c in clicks):
                continue  # answered without the model (an empty prediction), no session involved
            items = _items(clicks)
            served, region = ask(lived, IMAGE, items, task_id, predictions)
            fresh_segmenter.engine.sessions.drop_image(IMAGE)
            expected, _ = ask(fresh, IMAGE, items, task_id, predictions)
            assert (served == expected).all(), (clicks, starts, int((served != expected).sum()))

    check()


def test_moving_the_first_click_off_a_region_on_screen_starts_blank(two_engines):
    """The auditor's case: the first positive click dragged from inside a pre-annotated region to outside it
    answers from a blank start, not from the region chosen for the earlier click list."""
    (_, lived), (fresh_segmenter, fresh) = two_engines
    predictions = [_prediction([PRE_REGIONS[0]])]
    ask(lived, IMAGE, _items([Click(30, 20, True)]), 77, predictions)
    moved = _items([Click(30, 80, True)])
    served, _ = ask(lived, IMAGE, moved, 77, predictions)
    fresh_segmenter.engine.sessions.drop_image(IMAGE)
    assert (served == ask(fresh, IMAGE, moved, 77, predictions)[0]).all()


def test_a_background_compile_never_mixes_engines_in_a_region(model, tmp_path):
    """--engine-compile background (the server default): torch answers until the size's compiled model is
    ready. A region's clicks, steps and undo after that answer exactly (mask and score) as a region that
    never saw torch: the engine in use is part of the session's variant and each session keeps one engine."""
    from interformer.click_engine import ClickEngineConfig

    ckpt, predictor = model
    db = tmp_path / "db"
    _store(db, predictor, [(IMAGE, grabcut_images(1, SIZE)[0][1])])
    engine_cfg = ClickEngineConfig("openvino-f32", cache_dir=str(tmp_path / "ir"), compile="background")
    segmenter, client = _serve(db, ckpt, click_engine=engine_cfg)
    clicks = [Click(30, 40, True), Click(10, 80, False), Click(50, 20, True)]
    items = [keypoint_at(c.row, c.col, SIZE, c.positive, f"k{i}") for i, c in enumerate(clicks)]
    ask(client, IMAGE, items[:1])  # torch answers; the conversion starts
    assert segmenter.engine.predictor.engine.wait_ready(timeout=300)
    for n in (2, 3, 1):  # step, step, undo to one click
        mask, region = ask(client, IMAGE, items[:n])
        fresh_mask, fresh_region = ask(client, IMAGE, [dict(it, id=f"f{n}-{i}") for i, it in enumerate(items[:n])])
        assert (mask == fresh_mask).all() and region["score"] == fresh_region["score"], n


def test_the_score_is_the_mean_probability_over_the_returned_mask_on_a_rescaled_image(model, tmp_path):
    """--max-side: the network sees the image rescaled. A box prompt's answer is cut to the box; its score is
    the mean foreground probability over that returned mask at the network resolution (0 when it is empty),
    never over the model's whole canvas."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from connectors.protocol import box_to_click
    from interformer.config import PreprocessConfig
    from pipeline.encoding import EncoderSpec, build_predictor

    ckpt, _ = model
    preprocess = PreprocessConfig(max_side=64)  # the 64x96 image runs at 43x64
    predictor = build_predictor(EncoderSpec(checkpoint=str(ckpt), variant="small", preprocess=preprocess), device="cpu")
    db = tmp_path / "db"
    _store(db, predictor, [(IMAGE, grabcut_images(1, SIZE)[0][1])])
    _, client = _serve(db, ckpt, preprocess=preprocess)
    feats = FeatureReader(str(db), predictor.fingerprint, table="features").get(IMAGE)
    assert feats.geometry.resized
    h, w = SIZE

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(x=st.integers(0, 90), y=st.integers(0, 58), bw=st.integers(3, 96), bh=st.integers(3, 64))
    @example(x=67, y=0, bw=4, bh=4)  # a mask on no canvas pixel of positive margin: scored, never 0
    def check(x, y, bw, bh):
        bw, bh = min(bw, w - x), min(bh, h - y)
        box = {"original_width": w, "original_height": h, "image_rotation": 0,
               "value": {"x": x * 100.0 / w, "y": y * 100.0 / h, "width": bw * 100.0 / w, "height": bh * 100.0 / h,
                         "rotation": 0, "rectanglelabels": ["object"]},
               "id": "b1", "from_name": "box", "to_name": "image", "type": "rectanglelabels"}
        returned, region = ask(client, IMAGE, [box])
        click, (left, up, right, bottom) = box_to_click(box["value"], SIZE)
        outside = returned.copy()
        outside[up:bottom, left:right] = False
        assert not outside.any()  # cut to the box
        roi = (left, up, right, bottom)
        margin = predictor.session(feats, box=roi).replay([click]).margin
        want = mask_score(margin, feats.geometry, returned)
        score = region["score"] if region else 0.0
        assert score == pytest.approx(want, abs=1e-9), (x, y, bw, bh, int(returned.sum()))
        assert (score == 0.0) == (not returned.any())  # a mask too small for one canvas pixel scores too

    check()
