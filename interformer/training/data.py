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
from typing import Any, BinaryIO, Iterable, Protocol, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np
from PIL import Image

from ..coco_rle import RLEError, checked_counts
from ..config import PreprocessConfig
from ..preprocess import max_file_bytes
from ..polygons import PolygonError, checked_polygons, rasterize
from .augment import IGNORE_SEGMENT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DATA_KINDS = ("coco", "lvis", "panoptic", "labelstudio", "folder")
# Training reads images and masks under the encoder's pixel limit (a decompression-bomb guard): a file that
# declares more is refused at the start-up check instead of taking a worker's memory.
MAX_PIXELS = PreprocessConfig().max_pixels


class DataError(ValueError):
    """A training data source cannot be read as described (missing file, bad format, no usable sample)."""


class TrainSource(Protocol):
    """A list of training images with their segments."""

    def __len__(self) -> int: ...

    def key(self, index: int) -> str:
        """A stable name of sample `index` (image file name or id), for messages and feature look-ups."""
        ...

    def check(self, index: int) -> None:
        """Raise DataError when sample `index` cannot be used: its files are missing or its annotations do not
        parse. Cheap (file headers and annotation structure, no pixel decoding), so a job checks every sample
        before it starts."""
        ...

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 H x W x 3 image, int32 H x W segment map); `rng` orders overlapping annotations."""
        ...


def read_rgb(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to RGB uint8 (grey and alpha images are converted). EXIF orientation is ignored:
    annotations refer to the stored pixel grid. A file whose header declares more than `max_pixels` pixels, or
    that holds more bytes than such an image can take, is a DataError before any pixel is decoded."""
    _image_size(Path(path), max_pixels)
    cap = max_file_bytes(max_pixels)
    try:
        with open(path, "rb") as f:
            raw = f.read() if cap is None else f.read(cap + 1)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    if cap is not None and len(raw) > cap:
        raise DataError(f"image {path} holds more than {cap} bytes, more than an image of at most {max_pixels} "
                        "pixels can take")
    data = np.frombuffer(raw, dtype=np.uint8)
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(data, flags) if data.size else None
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


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None


def _field(record: object, name: str, where: str, kind: str = "int") -> Any:
    """record[name] checked to be an int (`kind` "int"), a positive int ("size") or a non-empty string ("str")."""
    value = record.get(name) if isinstance(record, dict) else None
    ok = {"int": _is_int(value), "size": _is_int(value) and value > 0,
          "str": isinstance(value, str) and bool(value)}[kind]
    if not ok:
        wanted = {"int": "an integer", "size": "a positive integer", "str": "a non-empty string"}[kind]
        raise DataError(f"{where}: {name!r} must be {wanted}, got {value!r}")
    return int(value) if kind != "str" else value


def _image_size(path: Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of an image file from its header (no pixel decoding); DataError when missing, unreadable
    or over `max_pixels` pixels, so a job's start-up check refuses an oversized file before training decodes it."""
    if not path.is_file():
        raise DataError(f"image {path} not found")
    try:
        with Image.open(path) as im:
            h, w = im.height, im.width
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    _check_pixels(h, w, max_pixels, f"image {path}")
    return h, w


def _check_pixels(h: int, w: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise DataError(f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels")


def unique_image_records(images: object, where: str) -> dict[int, dict]:
    """COCO `images` by id; a duplicate id would pair one image with another's annotations, so it is refused."""
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' must be a list, got {type(images).__name__}")
    by_id: dict[int, dict] = {}
    for i, info in enumerate(images):
        if not isinstance(info, dict):
            raise DataError(f"{where}: images[{i}] must be an object, got {type(info).__name__}")
        img_id = _field(info, "id", f"{where}: images[{i}]")
        other = by_id.setdefault(img_id, info)
        if other is not info:
            raise DataError(f"{where}: image id {img_id} is listed twice ({_record_name(other)} and "
                            f"{_record_name(info)}); ids must be unique, or annotations go to the wrong image")
    return by_id


def _record_name(info: dict) -> str:
    name = info.get("file_name") or info.get("coco_url")
    return repr(name) if isinstance(name, str) and name else f"image id {info.get('id')!r}"


def _check_rle(rle: dict, h: int, w: int, where: str) -> dict:
    """A COCO RLE dict for pycocotools (counts as bytes when compressed), after checking it covers h x w."""
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise DataError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
    if tuple(size) != (h, w):
        raise DataError(f"{where}: RLE size {size[1]}x{size[0]} (WxH) differs from the image's {w}x{h}")
    counts = rle.get("counts")
    try:
        runs = checked_counts(counts, h, w)
    except RLEError as e:
        raise DataError(f"{where}: {e}") from None
    return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else runs}


def coco_segmentation_mask(segmentation: object, h: int, w: int, where: str, decode: bool = True
                           ) -> np.ndarray | None:
    """Bool mask of a COCO `segmentation` (polygons or RLE) on an h x w image, through the project's one bounded
    polygon rasteriser; DataError naming `where` for anything malformed. `decode=False` only checks."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        try:
            polygons = checked_polygons(segmentation, (h, w))
            return rasterize(polygons, (h, w)) if decode else None
        except PolygonError as e:
            raise DataError(f"{where}: {e}") from None
    if isinstance(segmentation, dict):
        rle = _check_rle(segmentation, h, w, where)
        if not decode:
            return None
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, h, w)
        return mask_utils.decode(rle) > 0
    raise DataError(f"{where}: 'segmentation' must be a list of polygons or an RLE object, "
                    f"got {type(segmentation).__name__}")


class CocoInstancesSource:
    """COCO instances or LVIS JSON (polygons or RLE), read and checked here; masks through pycocotools."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, max_overlap: float = 0.5,
                 include_crowd: bool = True) -> None:
        self.ann_file, self.image_root = Path(ann_file), Path(image_root)
        if not self.ann_file.is_file():
            raise DataError(f"annotation file not found: {self.ann_file}")
        if not self.image_root.is_dir():
            raise DataError(f"image folder not found: {self.image_root}")
        data = _load_json(self.ann_file, "annotation file")
        if not isinstance(data, dict):
            raise DataError(f"{self.ann_file}: expected a COCO object with 'images' and 'annotations'")
        self.images = unique_image_records(data.get("images", []), str(self.ann_file))
        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise DataError(f"{self.ann_file}: 'annotations' must be a list")
        self.anns: dict[int, list[tuple[str, dict]]] = {}
        for i, ann in enumerate(annotations):
            where = f"{self.ann_file}: annotation {ann.get('id', i) if isinstance(ann, dict) else i}"
            img_id = _field(ann, "image_id", where)
            if img_id not in self.images:
                raise DataError(f"{where}: image_id {img_id} is not in 'images'")
            if not include_crowd and ann.get("iscrowd"):
                continue
            seg = ann.get("segmentation")
            if seg is None or seg == []:
                continue  # no outline: nothing to train on
            self.anns.setdefault(img_id, []).append((where, ann))
        self.max_overlap = max_overlap
        self.image_ids = sorted(self.anns)
        if not self.image_ids:
            raise DataError(f"{self.ann_file} has no image with annotations")

    def __len__(self) -> int:
        return len(self.image_ids)

    def _file_name(self, info: dict) -> str:
        if isinstance(info.get("file_name"), str) and info["file_name"]:
            return info["file_name"]
        if isinstance(info.get("coco_url"), str) and info["coco_url"]:
            return Path(urlparse(info["coco_url"]).path).name
        raise DataError(f"{self.ann_file}: image {info.get('id')} has neither file_name nor coco_url")

    def key(self, index: int) -> str:
        return self._file_name(self.images[self.image_ids[index]])

    def _size(self, info: dict) -> tuple[int, int]:
        where = f"{self.ann_file}: image {info['id']}"
        return _field(info, "height", where, "size"), _field(info, "width", where, "size")

    def check(self, index: int) -> None:
        info = self.images[self.image_ids[index]]
        h, w = self._size(info)
        found = _image_size(self.image_root / self._file_name(info))
        if found != (h, w):
            raise DataError(f"{self.key(index)}: image is {found[1]}x{found[0]}, {self.ann_file} says {w}x{h}")
        for where, ann in self.anns[self.image_ids[index]]:
            coco_segmentation_mask(ann["segmentation"], h, w, where, decode=False)

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        info = self.images[self.image_ids[index]]
        h, w = self._size(info)
        img = read_rgb(self.image_root / self._file_name(info))
        if img.shape[:2] != (h, w):
            raise DataError(f"{self.key(index)}: image is {img.shape[1]}x{img.shape[0]}, annotation says {w}x{h}")
        anns = self.anns[self.image_ids[index]]
        masks = (coco_segmentation_mask(a["segmentation"], h, w, where) for where, a in _shuffled(anns, rng))
        return img, paint_with_overlap_rule((h, w), masks, self.max_overlap)


class CocoPanopticSource:
    """COCO panoptic JSON + PNG folder: segment id = R + 256 G + 256^2 B; void (0) is background."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, mask_root: str | Path) -> None:
        ann_file, self.image_root, self.mask_root = Path(ann_file), Path(image_root), Path(mask_root)
        for p in (self.image_root, self.mask_root):
            if not p.is_dir():
                raise DataError(f"folder not found: {p}")
        data = _load_json(ann_file, "panoptic annotation file")
        if not isinstance(data, dict) or not isinstance(data.get("annotations", []), list):
            raise DataError(f"{ann_file}: expected a COCO panoptic object with 'images' and an 'annotations' list")
        images = unique_image_records(data.get("images", []), str(ann_file))
        self.items = []
        seen: dict[int, str] = {}
        for i, ann in enumerate(data.get("annotations", [])):
            where = f"{ann_file}: annotations[{i}]"
            png = _field(ann, "file_name", where, "str")
            segments = ann.get("segments_info")
            if not isinstance(segments, list):
                raise DataError(f"{where} ({png}): 'segments_info' must be a list")
            ids = [_field(s, "id", f"{where} ({png}): segments_info[{j}]") for j, s in enumerate(segments)]
            if any(sid <= 0 for sid in ids):
                raise DataError(f"{where} ({png}): segment ids must be positive (0 is void), got {ids}")
            if not ids:
                continue
            img_id = _field(ann, "image_id", where)
            if images and img_id not in images:
                raise DataError(f"{where} ({png}): image_id {img_id} is not in 'images'")
            if seen.setdefault(img_id, png) != png:
                raise DataError(f"{ann_file}: image id {img_id} has two panoptic annotations ({seen[img_id]} and {png})")
            info = images.get(img_id, {})
            image_name = info.get("file_name") or Path(png).with_suffix(".jpg").name
            if not isinstance(image_name, str):
                raise DataError(f"{where}: image {img_id} 'file_name' must be a string, got {image_name!r}")
            self.items.append((image_name, png, ids))
        if not self.items:
            raise DataError(f"{ann_file} has no annotation with segments")

    def __len__(self) -> int:
        return len(self.items)

    def key(self, index: int) -> str:
        return self.items[index][0]

    def check(self, index: int) -> None:
        image_name, png_name, _ = self.items[index]
        size, png_size = _image_size(self.image_root / image_name), _image_size(self.mask_root / png_name)
        if size != png_size:
            raise DataError(f"{image_name}: panoptic PNG {png_name} is {png_size[1]}x{png_size[0]}, the image "
                            f"{size[1]}x{size[0]}")

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


REGION_TYPES = ("brushlabels", "brush", "polygonlabels", "polygon")


def _brush_mask(rle: object, height: int, width: int, where: str) -> np.ndarray:
    """Label Studio brush RLE -> bool mask, its pixel count checked from the header before anything is decoded."""
    from label_studio_sdk.converter import brush

    if not (isinstance(rle, list) and rle and all(_is_int(v) and 0 <= v <= 255 for v in rle)):
        raise DataError(f"{where}: brush 'rle' must be a non-empty list of bytes (0..255)")
    header = int("".join(f"{int(v):08b}" for v in rle[:4]).ljust(32, "0"), 2)
    if header != height * width * 4:
        raise DataError(f"{where}: brush RLE holds {header // 4} pixels, expected {height}x{width}")
    try:
        flat = brush.decode_rle(rle)
    except (ValueError, IndexError) as e:
        raise DataError(f"{where}: brush RLE is malformed ({e})") from None
    if flat.size != height * width * 4:
        raise DataError(f"{where}: brush RLE holds {flat.size // 4} pixels, expected {height}x{width}")
    return flat.reshape(height, width, 4)[:, :, 3] > 127


def _polygon_percent(points: object, where: str) -> np.ndarray:
    """Label Studio polygon `points` ([[x, y], ...] in percent) as a (k, 2) float array, checked."""
    if not (isinstance(points, list) and len(points) >= 3 and all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p) for p in points)):
        raise DataError(f"{where}: polygon 'points' must be a list of at least 3 [x, y] pairs of numbers, "
                        f"got {str(points)[:80]}")
    pts = np.asarray(points, dtype=np.float64)
    if not np.isfinite(pts).all():
        raise DataError(f"{where}: polygon 'points' must be finite numbers, got {str(points)[:80]}")
    return pts


def _region_mask(item: dict, height: int, width: int, where: str = "region", decode: bool = True
                 ) -> np.ndarray | None:
    """Bool mask of one Label Studio result item (brush RLE or polygon); None for other types or when only
    checking (`decode=False`). DataError naming `where` for anything malformed."""
    value = item.get("value")
    if not isinstance(value, dict):
        raise DataError(f"{where}: 'value' must be an object, got {type(value).__name__}")
    kind = item.get("type")
    if kind in ("brushlabels", "brush"):
        if value.get("format", "rle") != "rle" or "rle" not in value:
            return None
        mask = _brush_mask(value["rle"], height, width, where)
        return mask if decode else None
    if kind in ("polygonlabels", "polygon"):
        if not value.get("points"):
            return None
        pts = _polygon_percent(value["points"], where) * np.array([width, height]) / 100.0
        try:
            polygons = checked_polygons([pts.reshape(-1).tolist()], (height, width))
            return rasterize(polygons, (height, width)) if decode else None
        except PolygonError as e:
            raise DataError(f"{where}: {e}") from None
    return None


class LabelStudioSource:
    """Label Studio JSON export (list of tasks); one sample per task with at least one brush/polygon region."""

    def __init__(self, export_file: str | Path, image_root: str | Path, image_key: str | None = None,
                 max_overlap: float = 0.5) -> None:
        self.export_file, self.image_root = Path(export_file), Path(image_root)
        tasks = _load_json(self.export_file, "Label Studio export")
        if not isinstance(tasks, list):
            raise DataError(f"{export_file}: expected the JSON export (a list of tasks), got {type(tasks).__name__}")
        self.max_overlap = max_overlap
        self.items: list[tuple[str, str, list[tuple[str, dict]]]] = []
        for t, task in enumerate(tasks):
            where = f"{export_file}: task {task.get('id', t) if isinstance(task, dict) else t}"
            item = self._task_item(task, where, image_key)
            if item is not None:
                self.items.append(item)
        if not self.items:
            raise DataError(f"{export_file}: no task with a brush or polygon annotation")

    @staticmethod
    def _task_item(task: object, where: str, image_key: str | None) -> tuple[str, str, list[tuple[str, dict]]] | None:
        """(key, image url, [(where, region)]) of one task, None when it has no image or no region."""
        if not isinstance(task, dict):
            raise DataError(f"{where}: a task must be an object, got {type(task).__name__}")
        data, anns = task.get("data", {}), task.get("annotations", [])
        if not isinstance(data, dict) or not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise DataError(f"{where}: 'data' must be an object and 'annotations' a list of objects")
        url = data.get(image_key) if image_key else next(
            (v for v in data.values() if isinstance(v, str) and Path(urlparse(v).path).suffix.lower() in IMAGE_SUFFIXES
             or isinstance(v, str) and "/data/" in v), None)
        anns = [a for a in anns if not a.get("was_cancelled")]
        if url is None or not anns:
            return None
        if not isinstance(url, str):
            raise DataError(f"{where}: data[{image_key!r}] must be an image URL, got {url!r}")
        latest = max(anns, key=lambda a: (str(a.get("updated_at", "")), str(a.get("created_at", ""))))
        result = latest.get("result", [])
        if not isinstance(result, list):
            raise DataError(f"{where}: annotation 'result' must be a list")
        regions = []
        for j, r in enumerate(result):
            if not isinstance(r, dict):
                raise DataError(f"{where}, result item {j}: must be an object, got {type(r).__name__} {str(r)[:40]!r}")
            if r.get("type") in REGION_TYPES:
                regions.append((f"{where}, result item {j} ({r.get('id', 'no id')})", r))
        if not regions:
            return None
        return str(data.get("image_id", task.get("id", url))), url, regions

    def __len__(self) -> int:
        return len(self.items)

    def key(self, index: int) -> str:
        return self.items[index][0]

    def _checked_size(self, index: int, h: int, w: int) -> None:
        _, url, regions = self.items[index]
        for where, r in regions:
            ow, oh = r.get("original_width"), r.get("original_height")
            if ow is None or oh is None:
                continue
            if not (_is_int(ow) and _is_int(oh)):
                raise DataError(f"{where}: original_width/original_height must be integers, got {ow!r}, {oh!r}")
            if (int(oh), int(ow)) != (h, w):
                raise DataError(f"{url}: annotation made on a {ow}x{oh} image, the file is {w}x{h}")

    def check(self, index: int) -> None:
        _, url, regions = self.items[index]
        h, w = _image_size(resolve_labelstudio_image(url, self.image_root))
        self._checked_size(index, h, w)
        for where, r in regions:
            _region_mask(r, h, w, where, decode=False)

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _, url, regions = self.items[index]
        img = read_rgb(resolve_labelstudio_image(url, self.image_root))
        h, w = img.shape[:2]
        self._checked_size(index, h, w)
        masks = (m for m in (_region_mask(r, h, w, where) for where, r in _shuffled(regions, rng)) if m is not None)
        return img, paint_with_overlap_rule((h, w), masks, self.max_overlap)


def read_mask(path: Path | BinaryIO, mask_format: str, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Segment map of a mask file: `binary` (non-zero in any channel = object 1) or `instances` (values 1..254
    are objects, 255 ignore; palette PNGs give their indices). Over `max_pixels` pixels is a DataError, from the
    header, before decoding."""
    try:
        with Image.open(path) as im:
            _check_pixels(im.height, im.width, max_pixels, f"mask {path}")
            arr = np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read mask {path}: {e}") from None
    if arr.ndim == 3:
        arr = arr.max(axis=2) if mask_format == "binary" else arr[:, :, 0]
    if mask_format == "binary":
        return (arr > 0).astype(np.int32)
    if mask_format == "instances":
        seg = arr.astype(np.int32)
        seg[arr == 255] = IGNORE_SEGMENT
        return seg
    raise DataError(f"unknown mask format {mask_format!r}; use 'binary' or 'instances'")


def file_stem(path: Path) -> str:
    """The name before the first '.', which pairs an image with its mask."""
    return path.name.split(".")[0]


def by_stem(files: Iterable[Path], folder: Path, what: str) -> dict[str, Path]:
    """Files by stem; two files with one stem (cat.1.jpg, cat.2.jpg) cannot both be paired, so they are refused."""
    found: dict[str, Path] = {}
    for f in files:
        other = found.setdefault(file_stem(f), f)
        if other != f:
            raise DataError(f"{what} files {other.name!r} and {f.name!r} in {folder} share the name "
                            f"{file_stem(f)!r} (the text before the first '.'), which pairs images with masks: "
                            "rename one of them")
    return found


class MaskFolderSource:
    """Images and masks in two folders, paired by file stem (the name before the first '.')."""

    def __init__(self, image_dir: str | Path, mask_dir: str | Path, mask_format: str = "binary") -> None:
        image_dir, mask_dir = Path(image_dir), Path(mask_dir)
        for p in (image_dir, mask_dir):
            if not p.is_dir():
                raise DataError(f"folder not found: {p}")
        if mask_format not in ("binary", "instances"):
            raise DataError(f"unknown mask format {mask_format!r}; use 'binary' or 'instances'")
        images = by_stem(sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), image_dir,
                         "image")
        masks = by_stem(sorted(p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), mask_dir, "mask")
        self.pairs = [(p, masks[stem]) for stem, p in sorted(images.items(), key=lambda kv: kv[1].name)
                      if stem in masks]
        if not self.pairs:
            raise DataError(f"no image in {image_dir} has a mask with the same stem in {mask_dir}")
        self.mask_format = mask_format

    def __len__(self) -> int:
        return len(self.pairs)

    def key(self, index: int) -> str:
        return self.pairs[index][0].name

    def check(self, index: int) -> None:
        img_path, mask_path = self.pairs[index]
        size, mask_size = _image_size(img_path), _image_size(mask_path)
        if size != mask_size:
            raise DataError(f"{img_path.name}: mask {mask_path.name} is {mask_size[1]}x{mask_size[0]}, the image "
                            f"{size[1]}x{size[0]}")

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

    def check(self, index: int) -> None:
        src, i = self._locate(index)
        src.check(i)

    def load(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        src, i = self._locate(index)
        return src.load(i, rng)


def check_source(source: TrainSource, shown: int = 5) -> None:
    """Check every sample of `source` (files present, annotations parse) before training starts, so a bad file is
    reported at once instead of hours into a run: DataError listing how many samples fail and the first few."""
    problems = []
    for i in range(len(source)):
        try:
            source.check(i)
        except DataError as e:
            problems.append(str(e))
    if problems:
        listed = "\n  ".join(problems[:shown]) + (f"\n  ... and {len(problems) - shown} more" if len(problems) > shown
                                                   else "")
        raise DataError(f"{len(problems)} of {len(source)} training samples cannot be used; fix or remove them "
                        f"before training:\n  {listed}")
