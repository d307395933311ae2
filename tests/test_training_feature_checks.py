"""Training on stored features checks the table before any work: the features must be this model's (another
preprocessing of the same encoder at most), and every training image must have them."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
import torch

from interformer.checkpoint import load_model
from interformer.config import PreprocessConfig
from interformer.predictor import Predictor
from interformer.training.config import TrainConfig
from interformer.training.data import DataSpec
from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows
from pipeline.training_run import FeatureTableError, checked_before_start


@pytest.fixture(scope="module")
def table(shared_dir, tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """Three DAVIS images and masks; the feature table holds the first two, encoded by the seed-42 model."""
    root = tmp_path_factory.mktemp("features")
    (root / "img").mkdir()
    (root / "gt").mkdir()
    names = sorted(p.stem for p in (shared_dir / "data/DAVIS/img").iterdir())[:3]
    for name in names:
        shutil.copy(shared_dir / f"data/DAVIS/img/{name}.jpg", root / "img")
        shutil.copy(shared_dir / f"data/DAVIS/gt/{name}.png", root / "gt")
    torch.manual_seed(42)
    encoder = Predictor(load_model(None, variant="small"), device="cpu")
    fingerprint = encoder.model.fingerprint(PreprocessConfig())
    items = [EncodedImage(f"{n}.jpg", str(root / "img" / f"{n}.jpg"), "-",
                          encoder.encode(cv2.cvtColor(cv2.imread(str(root / "img" / f"{n}.jpg")), cv2.COLOR_BGR2RGB)))
             for n in names[:2]]
    FeatureStore(str(root / "db")).add(feature_rows(items, fingerprint, dtype="float16"))
    other = fingerprint.replace("max_side=", "max_side=9")  # the same encoder, other preprocessing
    FeatureStore(str(root / "db")).add(feature_rows(items, other, dtype="float16"))
    return root / "img", root / "gt", root / "db", fingerprint


def config(table, tmp_path, **kw) -> TrainConfig:
    img, gt, db, _ = table
    base = dict(out_dir=str(tmp_path / "run"), data=(DataSpec.parse(f"folder:{img},masks={gt}"),), variant="small",
                frozen_backbone=True, features=str(db), seed=42)
    base.update(kw)
    return TrainConfig(**base)


def test_a_table_missing_training_images_is_refused_with_the_count(table, tmp_path):
    with pytest.raises(FeatureTableError, match=r"for 1 of the 3 training images"):
        checked_before_start(config(table, tmp_path))
    img, gt, _, _ = table
    two = tmp_path / "two"
    shutil.copytree(img, two / "img")
    shutil.copytree(gt, two / "gt")
    (sorted((two / "img").iterdir())[-1]).unlink()
    checked_before_start(config(table, tmp_path, data=(DataSpec.parse(f"folder:{two / 'img'},masks={two / 'gt'}"),)))


def test_the_fingerprint_override_may_change_only_the_preprocessing(table, tmp_path):
    _, _, _, fingerprint = table
    with pytest.raises(FeatureTableError, match="may differ from .* only in max_side/div"):  # a seed-7 model
        checked_before_start(config(table, tmp_path, seed=7, features_fingerprint=fingerprint))
    with pytest.raises(FeatureTableError, match="names features of encoder 'light:"):
        checked_before_start(config(table, tmp_path, features_fingerprint="light:" + fingerprint.split(":", 1)[1]))
    other = fingerprint.replace("max_side=", "max_side=9")
    with pytest.raises(FeatureTableError, match="for 1 of the 3"):  # accepted; only coverage is left
        checked_before_start(config(table, tmp_path, features_fingerprint=other))


def test_checking_the_table_never_writes_to_it(table, tmp_path):
    """A mistyped --features path is an error, not a new empty table; an existing table is only read (its
    Lance version does not move, even with the checks run twice)."""
    _, _, db, _ = table
    missing = tmp_path / "no-such-db"
    with pytest.raises(FeatureTableError, match="no feature table at"):
        checked_before_start(config(table, tmp_path, features=str(missing)))
    assert not missing.exists()
    store = FeatureStore(str(db))
    before = (store.dataset().version, lance_version(store.errors_uri))
    for _ in range(2):
        with pytest.raises(FeatureTableError, match="for 1 of the 3"):
            checked_before_start(config(table, tmp_path))
    assert (store.dataset().version, lance_version(store.errors_uri)) == before


def lance_version(uri: str) -> int:
    import lance

    return lance.dataset(uri).version
