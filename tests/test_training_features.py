"""Frozen-backbone training: the ViT stays fixed, and pyramids can come straight from the feature table."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch

from interformer.checkpoint import load_model
from interformer.config import PreprocessConfig
from interformer.predictor import Predictor
from interformer.training.augment import AugmentConfig
from interformer.training.config import TrainConfig
from interformer.training.data import DataSpec
from interformer.training.feature_stream import collate_by_size, crop_window, label_canvas
from interformer.training.trainer import run_worker
from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows

ROOT = Path(__file__).resolve().parents[1]


def load_job():
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_davis(shared_dir: Path, dst: Path, n: int = 3) -> tuple[Path, Path]:
    (dst / "img").mkdir(parents=True)
    (dst / "gt").mkdir()
    for name in sorted(p.stem for p in (shared_dir / "data/DAVIS/img").iterdir())[:n]:
        shutil.copy(shared_dir / f"data/DAVIS/img/{name}.jpg", dst / "img")
        shutil.copy(shared_dir / f"data/DAVIS/gt/{name}.png", dst / "gt")
    return dst / "img", dst / "gt"


def test_frozen_backbone_trains_only_neck_and_heads(shared_dir, tmp_path):
    img_dir, gt_dir = small_davis(shared_dir, tmp_path / "data", 2)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=(DataSpec("folder", str(img_dir), masks=str(gt_dir)),),
                      max_iters=2, batch_size=2, loader_workers=0, checkpoint_interval=2, frozen_backbone=True,
                      augment=AugmentConfig(crop_size=64))
    run_worker(cfg)
    torch.manual_seed(cfg.seed)
    start = load_model(None, variant="small").state_dict()
    trained = load_model(tmp_path / "run/checkpoints/iter_0000002.pth").state_dict()
    for k, v in start.items():
        if k.startswith("backbone."):
            assert torch.equal(v, trained[k]), k
    assert not torch.equal(start["neck.patch_embed"], trained["neck.patch_embed"])
    assert not torch.equal(start["decode_head.conv_seg.weight"], trained["decode_head.conv_seg.weight"])


def test_training_from_the_feature_table(shared_dir, tmp_path):
    img_dir, gt_dir = small_davis(shared_dir, tmp_path / "data", 3)
    torch.manual_seed(42)  # the run's seed: the same random-init encoder
    encoder = Predictor(load_model(None, variant="small"), device="cpu")
    items = []
    for p in sorted(img_dir.iterdir()):
        image = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        items.append(EncodedImage(p.name, str(p), "-", encoder.encode(image)))
    store = FeatureStore(str(tmp_path / "db"))
    store.add(feature_rows(items, encoder.model.fingerprint(PreprocessConfig()), dtype="float16"))

    job = load_job()
    cfg, _ = job.parse_config([
        "--out-dir", str(tmp_path / "run"), "--data", f"folder:{img_dir},masks={gt_dir}", "--frozen-backbone",
        "--features", str(tmp_path / "db"), "--max-iters", "3", "--batch-size", "2", "--crop-size", "128",
        "--checkpoint-interval", "3", "--log-interval", "1", "--loader-workers", "0"])
    summary = job.run_local(cfg)
    assert summary["end_iter"] == 3 and np.isfinite(summary["last"]["loss"])
    trained = load_model(tmp_path / "run/checkpoints/iter_0000003.pth").state_dict()
    torch.manual_seed(42)
    start = load_model(None, variant="small").state_dict()
    assert torch.equal(start["backbone.layers.0.attn.qkv.weight"], trained["backbone.layers.0.attn.qkv.weight"])
    assert not torch.equal(start["neck.patch_embed"], trained["neck.patch_embed"])


def test_feature_crops_and_labels_line_up(shared_dir):
    from interformer.features import ImageFeatures, ImageGeometry

    geo = ImageGeometry((100, 150), (100, 150), (128, 160))
    feats = ImageFeatures(tuple(torch.zeros(1, c, 128 // s, 160 // s) for c, s in
                                zip((32, 64, 128, 256), (4, 8, 16, 32))), geo)
    seg = np.ones((100, 150), np.int32)
    canvas = label_canvas(seg, feats)
    assert canvas.shape == (128, 160) and canvas[100:].sum() == 0 and canvas[:, 150:].sum() == 0
    for s in range(10):
        top, left, h, w = crop_window((128, 160), 64, np.random.default_rng(s))
        assert top % 32 == 0 and left % 32 == 0 and (h, w) == (64, 64) and top + h <= 128 and left + w <= 160
    batch = [([torch.zeros(32, 16, 16), torch.zeros(64, 8, 8), torch.zeros(128, 4, 4), torch.zeros(256, 2, 2)],
              torch.zeros(64, 64, dtype=torch.uint8)),
             ([torch.zeros(32, 8, 16), torch.zeros(64, 4, 8), torch.zeros(128, 2, 4), torch.zeros(256, 1, 2)],
              torch.zeros(32, 64, dtype=torch.uint8))]
    groups = collate_by_size(batch)
    assert [tuple(g[1].shape) for g in groups] == [(1, 64, 64), (1, 32, 64)]


def test_noc_evaluation_hook_writes_eval_csv(shared_dir, tmp_path):
    img_dir, gt_dir = small_davis(shared_dir, tmp_path / "data", 2)
    job = load_job()
    cfg, _ = job.parse_config([
        "--out-dir", str(tmp_path / "run"), "--data", f"folder:{img_dir},masks={gt_dir}", "--max-iters", "1",
        "--batch-size", "2", "--crop-size", "64", "--checkpoint-interval", "1", "--loader-workers", "0",
        "--eval-data", "grabcut", "--eval-data-root", str(shared_dir / "data"), "--eval-interval", "1",
        "--eval-max-samples", "2", "--eval-clicks", "3"])
    summary = job.run_local(cfg)
    result = summary["eval"]
    assert result["samples"] == 2 and result["dataset"] == "grabcut" and result["protocol"] == "interformer"
    assert 1.0 <= result["noc85"] <= 3.0 and 0.0 <= result["miou1"] <= 1.0
    rows = (tmp_path / "run/eval.csv").read_text().splitlines()
    assert rows[0].startswith("iter,dataset") and rows[1].startswith("1,grabcut,interformer,2,")
