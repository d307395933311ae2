"""Shared set-up for the ML backend tests: a small checkpoint, real images, a real feature table.

The checkpoint is a seeded random-init "small" InterFormer whose class bias is shifted so that its
masks are neither empty nor full (a plain random init answers all-background, which would make
"the backend returns the model's mask" hold trivially).
"""
from __future__ import annotations

import functools
import hashlib
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from interformer.checkpoint import load_model, save_checkpoint
from interformer.clicks import Click
from interformer.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GRABCUT = SHARED / "data" / "GrabCut" / "data_GT"

LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="object" background="#FF0000"/>
    <Label value="background_thing" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="object" smart="true" background="#FF0000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="object" smart="true" background="#FF0000" showInline="true"/>
  </RectangleLabels>
</View>"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(path: Path, variant: str = "small", seed: int = 0) -> Path:
    """Seeded random-init weights with the foreground bias centred on a real image's first-click margin."""
    torch.manual_seed(seed)
    model = load_model(None, variant=variant, device="cpu")
    probe = Predictor(load_model(None, variant=variant), device="cpu")
    probe.model.load_state_dict(model.state_dict())
    image = grabcut_images(1, size=(64, 96))[0][1]
    session = probe.session(probe.encode(image))
    margin = session.add_click(32, 48, True).margin
    with torch.no_grad():
        model.decode_head.conv_seg.bias[1] -= float(np.median(margin))
    save_checkpoint(model, path)
    return path


def grabcut_images(n: int, size: tuple[int, int] = (64, 96)) -> list[tuple[str, np.ndarray]]:
    """The first `n` GrabCut images (sorted by name), resized to `size` (H, W): (name, RGB uint8)."""
    files = sorted(GRABCUT.glob("*.jpg"))[:n]
    if len(files) < n:
        raise FileNotFoundError(f"expected {n} GrabCut images under {GRABCUT}")
    h, w = size
    return [(f.stem, np.asarray(Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR))) for f in files]


def write_png(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def encode_into_store(checkpoint: Path, db: Path, table: str, items: list[tuple[str, str, np.ndarray]]) -> str:
    """Encode (image_id, uri, image) items with the checkpoint and store them; returns the fingerprint."""
    from pipeline.feature_store import EncodedImage, FeatureStore, feature_rows

    predictor = Predictor(load_model(checkpoint), device="cpu")
    encoded = [EncodedImage(i, uri, hashlib.sha256(img.tobytes()).hexdigest(), predictor.encode(img))
               for i, uri, img in items]
    FeatureStore(str(db), table).add(feature_rows(encoded, predictor.fingerprint))
    return predictor.fingerprint


@functools.lru_cache(maxsize=4)
def _predictor(checkpoint: str | None, variant: str | None) -> Predictor:
    """The model as jobs/encode.py and the backend build it (one per checkpoint per test process)."""
    from pipeline.encoding import EncoderSpec, build_predictor

    return build_predictor(EncoderSpec(checkpoint=checkpoint, variant=variant), device="cpu")


def reference_mask(checkpoint: Path | None, db: Path, table: str, image_id: str, clicks: list[Click], box=None,
                   variant: str | None = None, initial_mask: np.ndarray | None = None,
                   initial_clicks: list[Click] | None = None) -> np.ndarray:
    """The model's mask for `clicks` (from `initial_mask`, or after `initial_clicks`, when given), computed in
    this process from the image's stored features."""
    from pipeline.feature_store import FeatureReader

    predictor = _predictor(str(checkpoint) if checkpoint else None, variant)
    feats = FeatureReader(str(db), predictor.fingerprint, table=table).get(image_id)
    session = predictor.session(feats, box=box, initial_mask=initial_mask, initial_clicks=initial_clicks)
    mask = session.replay(clicks).mask.copy()
    if box is not None:
        left, up, right, bottom = box
        bounded = np.zeros_like(mask)
        bounded[up:bottom, left:right] = mask[up:bottom, left:right]
        mask = bounded
    return mask


def model_fingerprint(checkpoint: Path | None, variant: str | None = None) -> str:
    """The feature fingerprint of the model the backend serves from `checkpoint`."""
    return _predictor(str(checkpoint) if checkpoint else None, variant).fingerprint


def keypoint(x_pct: float, y_pct: float, size: tuple[int, int], positive: bool = True, label: str = "object",
             item_id: str = "k1") -> dict:
    """A Label Studio `keypointlabels` context item (percent coordinates)."""
    h, w = size
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x_pct, "y": y_pct, "width": 0.6, "keypointlabels": [label]},
            "is_positive": positive, "id": item_id, "from_name": "kp", "to_name": "image",
            "type": "keypointlabels", "origin": "manual"}


def rectangle(x: float, y: float, w_pct: float, h_pct: float, size: tuple[int, int], label: str = "object",
              item_id: str = "b1") -> dict:
    """A Label Studio `rectanglelabels` context item (percent coordinates)."""
    h, w = size
    return {"original_width": w, "original_height": h, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w_pct, "height": h_pct, "rotation": 0, "rectanglelabels": [label]},
            "id": item_id, "from_name": "box", "to_name": "image", "type": "rectanglelabels", "origin": "manual"}


def pixel(x_pct: float, y_pct: float, size: tuple[int, int], positive: bool = True) -> Click:
    """The click a keypoint at (x%, y%) becomes."""
    h, w = size
    return Click(min(int(y_pct * h / 100.0), h - 1), min(int(x_pct * w / 100.0), w - 1), positive)
