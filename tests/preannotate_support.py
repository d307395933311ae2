"""Test data for bulk pre-annotation: a COCO prompt file built from real benchmark masks.

Images and ground-truth masks come from ../shared/data (GrabCut and Berkeley, RITM layout), shrunk so
that the small model runs fast. Each object is prompted by a coarse version of its ground truth: a
dilated mask (RLE), an eroded and simplified polygon, a box, or a point deep inside it; every image
also gets a second object, a box around the same region. Bad objects are added on purpose: an unknown
image id, an unknown category, a degenerate box, a polygon and a box outside the image, and an image
whose file does not exist. The last image is meant to be left out of the feature table (`unencoded`),
and one object is labelled "cat", a label the Label Studio test config does not have.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.datasets import berkeley, grabcut
from pipeline.prompts import encode_mask

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SIZE = (72, 96)  # (H, W) of the shrunk images

CATEGORIES = [{"id": 1, "name": "object"}, {"id": 2, "name": "background_thing"}, {"id": 3, "name": "cat"}]


@dataclass
class PromptFixture:
    """A COCO prompt file, its images and the ground truth of each good object."""

    coco_path: Path
    image_root: Path
    images: dict[str, np.ndarray]  # image id (file_name) -> RGB
    gt: dict[int, np.ndarray] = field(default_factory=dict)  # annotation id -> bool mask
    kinds: dict[int, str] = field(default_factory=dict)  # annotation id -> expected prompt kind
    bad: dict[int, str] = field(default_factory=dict)  # annotation id -> expected reason code
    missing_file: str = ""  # image id whose file is absent
    unencoded: str = ""  # image id whose file exists; tests keep it out of the feature table
    image_of: dict[int, str] = field(default_factory=dict)  # annotation id -> image id
    cat: int = 0  # annotation id of the object labelled "cat"


def shrink(image: np.ndarray, gt: np.ndarray, size: tuple[int, int] = SIZE) -> tuple[np.ndarray, np.ndarray]:
    h, w = size
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    mask = cv2.resize((gt == 1).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return small, mask


def simplified_polygon(mask: np.ndarray, epsilon: float = 2.0) -> list[list[float]]:
    """The outer contours of a mask, simplified (Douglas-Peucker), as COCO polygons."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        approx = cv2.approxPolyDP(c, epsilon, True).reshape(-1, 2)
        if len(approx) >= 3:
            polys.append([float(v) for xy in approx for v in xy])
    return polys


def inner_point(mask: np.ndarray) -> list[float]:
    """[x, y] of the pixel deepest inside the mask."""
    dist = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return [float(c), float(r)]


def mask_bbox(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]


def build_prompt_file(folder: Path, n_grabcut: int = 3, n_berkeley: int = 2) -> PromptFixture:
    """Write images and a COCO prompt file under `folder`; the four kinds of coarse prompt take turns."""
    samples = grabcut(SHARED / "data" / "GrabCut")[:n_grabcut] + berkeley(SHARED / "data" / "Berkeley")[:n_berkeley]
    image_root = folder / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    fx = PromptFixture(folder / "prompts.json", image_root, {})
    images, annotations = [], []
    kernel = np.ones((5, 5), np.uint8)
    for i, ref in enumerate(samples):
        sample = ref.load()
        image, gt = shrink(sample.image, sample.gt)
        file_name = f"{ref.dataset}/{ref.sample_id}.png"
        (image_root / ref.dataset).mkdir(exist_ok=True)
        Image.fromarray(image).save(image_root / file_name)
        fx.images[file_name] = image
        image_id = 100 + i
        images.append({"id": image_id, "file_name": file_name, "height": SIZE[0], "width": SIZE[1]})
        ann = {"id": 1000 + i, "image_id": image_id, "category_id": 1, "iscrowd": 0, "bbox": mask_bbox(gt)}
        kind = ("mask-dilated", "mask-polygon", "box", "points")[i % 4]
        if kind == "mask-dilated":
            ann["segmentation"] = encode_mask(cv2.dilate(gt.astype(np.uint8), kernel).astype(bool))
        elif kind == "mask-polygon":
            ann["segmentation"] = simplified_polygon(cv2.erode(gt.astype(np.uint8), kernel).astype(bool))
        elif kind == "points":
            ann["points"] = [inner_point(gt)]
            ann["point_labels"] = [1]
        second = {"id": 2000 + i, "image_id": image_id, "category_id": 2, "iscrowd": 0, "bbox": mask_bbox(gt)}
        annotations += [ann, second]
        for a in (ann, second):
            fx.gt[a["id"]] = gt
            fx.image_of[a["id"]] = file_name
        fx.kinds[ann["id"]] = {"mask-dilated": "mask", "mask-polygon": "mask"}.get(kind, kind)
        fx.kinds[second["id"]] = "box"
        fx.unencoded = file_name
    cat = {"id": 3000, "image_id": images[0]["id"], "category_id": 3, "bbox": mask_bbox(fx.gt[1000])}
    annotations.append(cat)
    fx.gt[cat["id"]], fx.kinds[cat["id"]], fx.image_of[cat["id"]], fx.cat = fx.gt[1000], "box", images[0]["file_name"], 3000
    h, w = SIZE
    first = images[0]["id"]
    bad = [
        ({"id": 9001, "image_id": 999, "category_id": 1, "bbox": [1, 1, 5, 5]}, "missing_image_entry"),
        ({"id": 9002, "image_id": first, "category_id": 77, "bbox": [1, 1, 5, 5]}, "unknown_category"),
        ({"id": 9003, "image_id": first, "category_id": 1, "bbox": [10, 10, 0, 8]}, "degenerate_box"),
        ({"id": 9004, "image_id": first, "category_id": 1,
          "segmentation": [[w + 10, h + 10, w + 30, h + 10, w + 30, h + 40]]}, "polygon_outside"),
        ({"id": 9005, "image_id": first, "category_id": 2, "bbox": [w + 5, 0, 10, 10]}, "box_outside"),
    ]
    for ann, reason in bad:
        annotations.append(ann)
        fx.bad[ann["id"]] = reason
    fx.missing_file = "GrabCut/does_not_exist.png"
    images.append({"id": 555, "file_name": fx.missing_file, "height": h, "width": w})
    annotations.append({"id": 9006, "image_id": 555, "category_id": 1, "bbox": [2, 2, 20, 20]})
    fx.bad[9006] = "no_features"
    fx.image_of[9006] = fx.missing_file
    doc = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    fx.coco_path.write_text(json.dumps(doc))
    return fx


def load_preannotate_job(module_name: str):
    """jobs/preannotate.py as a module of its own name (each test file loads its own copy)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(module_name, ROOT / "jobs" / "preannotate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def prepare_store(tmp: Path, n_grabcut: int = 3, n_berkeley: int = 2) -> dict:
    """A prompt file, a small random-init checkpoint and a feature table of every image but the `unencoded` one."""
    from backend_support import encode_into_store, make_checkpoint

    fx = build_prompt_file(tmp, n_grabcut, n_berkeley)
    ckpt = make_checkpoint(tmp / "small.pth")
    encode_into_store(ckpt, tmp / "db", "features",
                      [(i, str(fx.image_root / i), img) for i, img in fx.images.items() if i != fx.unencoded])
    return {"tmp": tmp, "fx": fx, "ckpt": ckpt}
