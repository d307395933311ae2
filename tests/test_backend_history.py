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

from connectors.engine import EngineConfig, InProcessSegmenter
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
