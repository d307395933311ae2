"""Training data sources: each yields (RGB uint8 image, int32 segment map) pairs for the augmentation pipeline.

Segment maps hold 0 for background, 1..N for candidate objects and IGNORE_SEGMENT (-1) for pixels to ignore.
Sources (spec §6 for the official ones):

* COCO panoptic (JSON + PNG folder): every segment is a candidate (things and stuff, crowd included); void = 0.
* COCO instances / LVIS (JSON via pycocotools): annotations are painted in a shuffled order and one is dropped
  when it has no area or overlaps the accepted ones by more than `max_overlap` of its own area or of any
  earlier mask's area (`TransformLVISAnnotations(max_overlap_ratio=0.5)`). LVIS images are found through
  `file_name` or the basename of `coco_url`.
* Label Studio JSON export: brush (RLE) and polygon regions of each task's latest non-cancelled annotation,
  painted with the same overlap rule.
* An image folder + mask folder paired by file stem: `binary` masks (any non-zero value is the object) or
  `instances` masks (each value 1..254 is an object, 255 is ignore; palette PNGs are read as indices).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np
from PIL import Image

from .augment import IGNORE_SEGMENT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DATA_KINDS = ("coco", "lvis", "panoptic", "labelstudio", "folder")


class DataError(ValueError):
    """A training data source cannot be read as described (missing file, bad format, no usable sample)."""


class TrainSource(Protocol):
    """A list of training images with their segments."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str:
        """A stable name of sample `index` (image file name or id), for messages and feature look-ups."""
        ...

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 H x W x 3 image, int32 H x W segment map); `rng` orders overlapping annotations."""
        ...


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (grey and alpha images are converted). EXIF orientation is ignored:
    annotations refer to the stored pixel grid."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(data, flags) if data is not None and data.size else None
    if img is None:
        raise DataError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def paint_with_overlap_rule(shape: tuple[int, int], masks: Iterable[np.ndarray], max_overlap: float = 0.5) -> np.ndarray:
    """Paint boolean masks, in the given order, into an int32 segment map (ids 1, 2, ...), skipping empty masks
    and masks that overlap the accepted ones by more than `max_overlap` of their own area or of an accepted
    mask's area."""
    seg = np.zeros(shape, dtype=np.int32)
    areas: dict[int, int] = {}
    next_id = 1
    for mask in masks:
        mask = mask.astype(bool)
        area = int(mask.sum())
        if area == 0:
            continue
        counts = np.bincount(seg[mask], minlength=next_id)
        ratio = counts[1:].sum() / area
        for sid, a in areas.items():
            ratio = max(ratio, counts[sid] / a)
        if ratio > max_overlap:
            continue
        areas[next_id] = area
        seg[mask] = next_id
        next_id += 1
    return seg


def _shuffled(items: Sequence[Any], rng: np.random.Generator) -> list[Any]:
    return [items[i] for i in rng.permutation(len(items))]


class CocoInstancesSource:
    """COCO instances or LVIS JSON (polygons or RLE) through pycocotools."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, max_overlap: float = 0.5,
                 include_crowd: bool = True) -> None:
        from pycocotools.coco import COCO

        ann_file, self.image_root = Path(ann_file), Path(image_root)
        if not ann_file.is_file():
            raise DataError(f"annotation file not found: {ann_file}")
        if not self.image_root.is_dir():
            raise DataError(f"image folder not found: {self.image_root}")
        self.coco = COCO(str(ann_file))
        self.max_overlap = max_overlap
        self.image_ids = []
        for img_id in sorted(self.coco.getImgIds()):
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id], iscrowd=None if include_crowd else False))
            if any(a.get("area", 1) > 0 for a in anns):
                self.image_ids.append(img_id)
        self.include_crowd = include_crowd
        if not self.image_ids:
            raise DataError(f"{ann_file} has no image with annotations")

    def __len__(self) -> int:
        return len(self.image_ids)

    def _file_name(self, info: dict) -> str:
        if info.get("file_name"):
            return str(info["file_name"])
        if info.get("coco_url"):
            return Path(urlparse(info["coco_url"]).path).name
        raise DataError(f"image {info.get('id')} has neither file_name nor coco_url")

    def key(self, index: int) -> str:
        return self._file_name(self.coco.imgs[self.image_ids[index]])

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        info = self.coco.imgs[self.image_ids[index]]
        img = read_rgb(self.image_root / self._file_name(info))
        h, w = int(info["height"]), int(info["width"])
        if img.shape[:2] != (h, w):
            raise DataError(f"{self.key(index)}: image is {img.shape[1]}x{img.shape[0]}, annotation says {w}x{h}")
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[info["id"]], iscrowd=None if self.include_crowd else False))
        masks = (self.coco.annToMask(a) for a in _shuffled(anns, rng))
        return img, paint_with_overlap_rule((h, w), masks, self.max_overlap)


class CocoPanopticSource:
    """COCO panoptic JSON + PNG folder: segment id = R + 256 G + 256^2 B; void (0) is background."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, mask_root: str | Path) -> None:
        ann_file, self.image_root, self.mask_root = Path(ann_file), Path(image_root), Path(mask_root)
        for p in (self.image_root, self.mask_root):
            if not p.is_dir():
                raise DataError(f"folder not found: {p}")
        try:
            data = json.loads(ann_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read panoptic annotation file {ann_file}: {e}") from None
        images = {im["id"]: im for im in data.get("images", [])}
        self.items = []
        for ann in data.get("annotations", []):
            if not ann.get("segments_info"):
                continue
            info = images.get(ann["image_id"], {})
            image_name = info.get("file_name") or Path(ann["file_name"]).with_suffix(".jpg").name
            self.items.append((image_name, ann["file_name"], [s["id"] for s in ann["segments_info"]]))
        if not self.items:
            raise DataError(f"{ann_file} has no annotation with segments")

    def __len__(self) -> int:
        return len(self.items)

    def key(self, index: int) -> str:
        return self.items[index][0]

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image_name, png_name, segment_ids = self.items[index]
        img = read_rgb(self.image_root / image_name)
        png = read_rgb(self.mask_root / png_name).astype(np.int64)
        ids = png[:, :, 0] + 256 * png[:, :, 1] + 65536 * png[:, :, 2]
        if ids.shape != img.shape[:2]:
            raise DataError(f"{image_name}: panoptic PNG {ids.shape} differs from the image {img.shape[:2]}")
        seg = np.zeros(ids.shape, dtype=np.int32)
        for i, sid in enumerate(segment_ids, 1):
            seg[ids == sid] = i
        return img, seg


def resolve_labelstudio_image(url: str, image_root: Path) -> Path:
    """Local file of a Label Studio task image: `/data/local-files/?d=rel/path` (relative to the local-files
    document root), `/data/upload/<project>/<file>` (relative to the media root), a plain path, or, for
    anything else, the basename looked up in `image_root`. Nothing is downloaded."""
    parsed = urlparse(url)
    candidates: list[Path] = []
    if parsed.path.endswith("/data/local-files/") or parsed.path.endswith("/data/local-files"):
        rel = parse_qs(parsed.query).get("d", [""])[0]
        candidates.append(image_root / unquote(rel))
    m = re.search(r"/data/(upload/.*)$", parsed.path)
    if m:
        candidates.append(image_root / unquote(m.group(1)))
    if not parsed.scheme or parsed.scheme == "file":
        p = Path(unquote(parsed.path))
        candidates.append(p if p.is_absolute() else image_root / p)
    candidates.append(image_root / Path(unquote(parsed.path)).name)
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"image {url!r} not found locally (looked at: {', '.join(str(c) for c in candidates)})")


def _region_mask(item: dict, height: int, width: int) -> np.ndarray | None:
    """Boolean mask of one Label Studio result item (brush RLE or polygon), None for other types."""
    value = item.get("value", {})
    kind = item.get("type")
    if kind in ("brushlabels", "brush") and value.get("format", "rle") == "rle" and "rle" in value:
        from label_studio_sdk.converter import brush

        flat = brush.decode_rle(value["rle"])
        if flat.size != height * width * 4:
            raise DataError(f"brush RLE holds {flat.size // 4} pixels, expected {height}x{width}")
        return flat.reshape(height, width, 4)[:, :, 3] > 127
    if kind in ("polygonlabels", "polygon") and value.get("points"):
        pts = np.asarray(value["points"], dtype=np.float64) * np.array([width, height]) / 100.0
        mask = np.zeros((height, width), dtype=np.uint8)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
        return mask.astype(bool)
    return None


class LabelStudioSource:
    """Label Studio JSON export (list of tasks); one sample per task with at least one brush/polygon region."""

    def __init__(self, export_file: str | Path, image_root: str | Path, image_key: str | None = None,
                 max_overlap: float = 0.5) -> None:
        export_file, self.image_root = Path(export_file), Path(image_root)
        try:
            tasks = json.loads(export_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read Label Studio export {export_file}: {e}") from None
        if not isinstance(tasks, list):
            raise DataError(f"{export_file}: expected the JSON export (a list of tasks), got {type(tasks).__name__}")
        self.max_overlap = max_overlap
        self.items: list[tuple[str, str, list[dict]]] = []
        for task in tasks:
            data = task.get("data", {})
            url = data.get(image_key) if image_key else next(
                (v for v in data.values() if isinstance(v, str) and Path(urlparse(v).path).suffix.lower() in IMAGE_SUFFIXES
                 or isinstance(v, str) and "/data/" in v), None)
            anns = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
            if url is None or not anns:
                continue
            latest = max(anns, key=lambda a: (str(a.get("updated_at", "")), str(a.get("created_at", ""))))
            regions = [r for r in latest.get("result", []) if r.get("type") in
                       ("brushlabels", "brush", "polygonlabels", "polygon")]
            if regions:
                key = str(data.get("image_id", task.get("id", url)))
                self.items.append((key, str(url), regions))
        if not self.items:
            raise DataError(f"{export_file}: no task with a brush or polygon annotation")

    def __len__(self) -> int:
        return len(self.items)

    def key(self, index: int) -> str:
        return self.items[index][0]

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _, url, regions = self.items[index]
        img = read_rgb(resolve_labelstudio_image(url, self.image_root))
        h, w = img.shape[:2]
        for r in regions:
            ow, oh = r.get("original_width"), r.get("original_height")
            if ow is not None and oh is not None and (int(oh), int(ow)) != (h, w):
                raise DataError(f"{url}: annotation made on a {ow}x{oh} image, the file is {w}x{h}")
        masks = (m for m in (_region_mask(r, h, w) for r in _shuffled(regions, rng)) if m is not None)
        return img, paint_with_overlap_rule((h, w), masks, self.max_overlap)


def read_mask(path: Path, mask_format: str) -> np.ndarray:
    """Segment map of a mask file: `binary` (non-zero in any channel = object 1) or `instances` (values 1..254
    are objects, 255 ignore; palette PNGs give their indices)."""
    with Image.open(path) as im:
        arr = np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("RGB"))
    if arr.ndim == 3:
        arr = arr.max(axis=2) if mask_format == "binary" else arr[:, :, 0]
    if mask_format == "binary":
        return (arr > 0).astype(np.int32)
    if mask_format == "instances":
        seg = arr.astype(np.int32)
        seg[arr == 255] = IGNORE_SEGMENT
        return seg
    raise DataError(f"unknown mask format {mask_format!r}; use 'binary' or 'instances'")


class MaskFolderSource:
    """Images and masks in two folders, paired by file stem (the name before the first '.')."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, mask_format: str = "binary") -> None:
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        for p in (image_dir, mask_dir):
            if not p.is_dir():
                raise DataError(f"folder not found: {p}")
        if mask_format not in ("binary", "instances"):
            raise DataError(f"unknown mask format {mask_format!r}; use 'binary' or 'instances'")
        masks = {p.name.split(".")[0]: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        self.pairs = [(p, masks[p.name.split(".")[0]]) for p in sorted(image_dir.iterdir())
                      if p.suffix.lower() in IMAGE_SUFFIXES and p.name.split(".")[0] in masks]
        if not self.pairs:
            raise DataError(f"no image in {image_dir} has a mask with the same stem in {mask_dir}")
        self.mask_format = mask_format

    def __len__(self) -> int:
        return len(self.pairs)

    def key(self, index: int) -> str:
        return self.pairs[index][0].name

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        img_path, mask_path = self.pairs[index]
        img, seg = read_rgb(img_path), read_mask(mask_path, self.mask_format)
        if seg.shape != img.shape[:2]:
            raise DataError(f"{img_path.name}: mask {seg.shape} differs from the image {img.shape[:2]}")
        return img, seg


@dataclass(frozen=True)
class DataSpec:
    """One training data source, written on the command line as KIND:PATH[,key=value...].

    coco:ANN.json,images=DIR | lvis:ANN.json,images=DIR | panoptic:ANN.json,images=DIR,masks=PNG_DIR |
    labelstudio:EXPORT.json,images=DIR[,key=DATA_FIELD] | folder:IMAGE_DIR,masks=MASK_DIR[,format=binary|instances]
    """

    kind: str
    path: str
    images: str | None = None
    masks: str | None = None
    format: str = "binary"
    key: str | None = None

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        kind, sep, rest = text.partition(":")
        if not sep or kind not in DATA_KINDS:
            raise ValueError(f"data spec {text!r} must start with one of {', '.join(k + ':' for k in DATA_KINDS)}")
        path, *options = rest.split(",")
        fields: dict[str, str] = {}
        for opt in options:
            name, eq, value = opt.partition("=")
            if not eq or name not in ("images", "masks", "format", "key"):
                raise ValueError(f"data spec {text!r}: unknown option {opt!r} (use images=, masks=, format=, key=)")
            fields[name] = value
        spec = cls(kind=kind, path=path, **fields)
        needs = {"coco": ("images",), "lvis": ("images",), "panoptic": ("images", "masks"),
                 "labelstudio": ("images",), "folder": ("masks",)}[kind]
        missing = [n for n in needs if getattr(spec, n) is None]
        if missing:
            raise ValueError(f"data spec {text!r}: {kind} needs {', '.join(m + '=' for m in missing)}")
        return spec

    def __str__(self) -> str:
        opts = [f"{n}={getattr(self, n)}" for n in ("images", "masks", "key") if getattr(self, n) is not None]
        if self.kind == "folder":
            opts.append(f"format={self.format}")
        return f"{self.kind}:{','.join([self.path, *opts])}"

    def absolute(self) -> "DataSpec":
        """The same spec with its file and folder paths made absolute (workers may run in another folder)."""
        def fix(p: str | None) -> str | None:
            return None if p is None else str(Path(p).expanduser().resolve())

        return replace(self, path=fix(self.path), images=fix(self.images), masks=fix(self.masks))

    def open(self) -> TrainSource:
        """Build the source this spec describes."""
        if self.kind in ("coco", "lvis"):
            return CocoInstancesSource(self.path, self.images)
        if self.kind == "panoptic":
            return CocoPanopticSource(self.path, self.images, self.masks)
        if self.kind == "labelstudio":
            return LabelStudioSource(self.path, self.images, self.key)
        return MaskFolderSource(self.path, self.masks, self.format)


class ConcatSource:
    """Several sources as one list (the official recipe concatenates COCO panoptic and LVIS)."""

    def __init__(self, sources: Sequence[TrainSource]) -> None:
        if not sources:
            raise DataError("no training data source given")
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[TrainSource, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.sources[k], index - int(self.offsets[k])

    def key(self, index: int) -> str:
        src, i = self._locate(index)
        return src.key(i)

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        src, i = self._locate(index)
        return src.load(i, rng)
