"""What bulk pre-annotation is asked to segment: objects with a label and a prompt, grouped by image.

A prompt is one of
  box     a bounding box -> one positive click at its centre and the box grown by 20 % as the zoom-in
          region and mask bound, exactly as the Label Studio backend treats a rectangle
          (`pipeline.box_prompt`);
  mask    a coarse mask or polygon -> clicks from the RITM click simulator against it, until a target
          IoU or a click budget (see pipeline.preannotation);
  points  given clicks (row, col, positive) in original-image pixels.

`coco_prompts` reads a COCO annotation file: per annotation `bbox`, `segmentation` (polygons or RLE)
and points (COCO `keypoints` triplets with v > 0 as positive clicks, or `points` [[x, y], ...] with
optional `point_labels` 1/0). Every annotation that cannot be used becomes a `Problem` with a reason
code; the rest goes on. Coarse masks travel as COCO compressed RLE, the form pycocotools produces.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from interformer.clicks import Click, Roi

from .box_prompt import BoxPromptError, box_to_click

PROMPT_KINDS = ("box", "mask", "points")
USE_CHOICES = ("auto", *PROMPT_KINDS)

# Reason codes of objects that cannot be (or were not) segmented.
MISSING_IMAGE_ENTRY = "missing_image_entry"  # annotation names an image id the file does not list
BAD_IMAGE_ENTRY = "bad_image_entry"  # image entry without a usable size
UNKNOWN_CATEGORY = "unknown_category"  # category id not in `categories`
NO_PROMPT = "no_prompt"  # nothing usable for the requested prompt kind
DEGENERATE_BOX = "degenerate_box"  # width or height <= 0, or not finite numbers
BOX_OUTSIDE = "box_outside"  # the box does not overlap the image
DEGENERATE_POLYGON = "degenerate_polygon"  # fewer than 3 vertices, or not numbers
POLYGON_OUTSIDE = "polygon_outside"  # every vertex lies outside the image
EMPTY_MASK = "empty_mask"  # the coarse mask covers no pixel of the image
BAD_SEGMENTATION = "bad_segmentation"  # an RLE of another size, or an unknown segmentation type
BAD_POINTS = "bad_points"  # malformed, outside the image, or no positive point
LABEL_NOT_IN_CONFIG = "label_not_in_config"  # the Label Studio project cannot hold this label
NO_FEATURES = "no_features"  # the image has no stored features (and was not encoded)
IMAGE_UNREADABLE = "image_unreadable"  # encoding on the fly failed to read/decode the image
SIZE_MISMATCH = "size_mismatch"  # the prompt file sizes the image differently from its features
INTERNAL_ERROR = "internal_error"  # an unexpected error in a worker (with its traceback)

# Failures that a later run may not repeat (features encoded meanwhile, a worker crash): not final.
RETRYABLE = frozenset({NO_FEATURES, IMAGE_UNREADABLE, INTERNAL_ERROR})


class PromptFileError(ValueError):
    """The prompt file as a whole cannot be read (not JSON, not COCO)."""


class PromptError(ValueError):
    """One object's prompt cannot be used; `reason` is a code above, `detail` says what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ObjectPrompt:
    """One object to segment.

    key: stable identity across runs ("coco:<annotation id>", "ls:<task>:<region>").
    size: (H, W) of the image as the prompt source knows it.
    clicks: the given points, or for a box its centre click (then further refinement points).
    box: (left, up, right, bottom) region of a box prompt, exclusive ends.
    coarse: COCO compressed RLE of a coarse mask (for kind "mask", and for the IoU report otherwise).
    """

    key: str
    image_id: str
    label: str
    kind: str
    size: tuple[int, int]
    clicks: tuple[Click, ...] = ()
    box: Roi | None = None
    coarse: dict | None = None
    category_id: int | None = None
    notes: tuple[str, ...] = ()

    def digest(self) -> str:
        """Hash of everything that decides the mask (a changed prompt is segmented again)."""
        payload = [self.key, self.label, self.kind, list(self.size), [list(c) for c in self.clicks],
                   list(self.box) if self.box else None, self.coarse["counts"] if self.coarse else None]
        return hashlib.sha1(json.dumps(payload).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageJob:
    """All objects of one image, and where to find the image if it must be encoded on the fly.

    uri: path/URI of the image file (COCO: image root + file_name; Label Studio: the task's image URL,
    then `via_label_studio`: fetched through pipeline.image_access's rules).
    source_image_id: the COCO image id; task_id: the Label Studio task (when known).
    """

    image_id: str
    size: tuple[int, int]
    objects: tuple[ObjectPrompt, ...]
    uri: str | None = None
    source_image_id: int | None = None
    file_name: str | None = None
    task_id: int | None = None
    via_label_studio: bool = False

    @property
    def key(self) -> str:
        """What identifies this job across runs: the Label Studio task it came from, else the image id."""
        return f"task:{self.task_id}" if self.via_label_studio and self.task_id is not None else self.image_id

    def digest(self) -> str:
        return hashlib.sha1("|".join(o.digest() for o in self.objects).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    """An object that was not segmented and why (`reason` is one of the codes above)."""

    key: str
    image_id: str | None
    label: str | None
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptSet:
    """Everything read from a prompt source: the image jobs, the problems and the category names."""

    images: list[ImageJob] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    categories: dict[int, str] = field(default_factory=dict)  # id -> name (COCO sources)
    image_entries: dict[str, dict] = field(default_factory=dict)  # image id -> COCO image entry

    @property
    def num_objects(self) -> int:
        return sum(len(j.objects) for j in self.images)


# --------------------------------------------------------------------------------------------------
# Geometry helpers (pure)


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )


def clip_box(bbox: Sequence[float], size: tuple[int, int]) -> tuple[tuple[float, float, float, float], bool]:
    """A COCO [x, y, w, h] box clipped to the image -> ((x, y, w, h), clipped?).

    Raises PromptError for boxes without area or outside the image.
    """
    h, w = size
    if not _finite_numbers(bbox) or len(bbox) != 4:
        raise PromptError(DEGENERATE_BOX, f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    x, y, bw, bh = (float(v) for v in bbox)
    if bw <= 0 or bh <= 0:
        raise PromptError(DEGENERATE_BOX, f"bbox {list(bbox)} has no area (w={bw:g}, h={bh:g})")
    left, top, right, bottom = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if right <= left or bottom <= top:
        raise PromptError(BOX_OUTSIDE, f"bbox {list(bbox)} lies outside the {w}x{h} (WxH) image")
    clipped = (left, top, right, bottom) != (x, y, x + bw, y + bh)
    return (left, top, right - left, bottom - top), clipped


def box_prompt(bbox: Sequence[float], size: tuple[int, int]) -> tuple[Click, Roi]:
    """A pixel box [x, y, w, h] inside the image -> the backend's centre click and region."""
    h, w = size
    x, y, bw, bh = bbox
    value = {"x": 100.0 * x / w, "y": 100.0 * y / h, "width": 100.0 * bw / w, "height": 100.0 * bh / h}
    try:
        return box_to_click(value, size)
    except BoxPromptError as e:
        raise PromptError(DEGENERATE_BOX, str(e)) from None


def polygons_to_rle(polygons: Any, size: tuple[int, int]) -> tuple[dict, bool]:
    """COCO polygons -> (compressed RLE of their union, some vertex outside the image?).

    Raises PromptError for malformed polygons and polygons entirely outside the image.
    """
    h, w = size
    if not isinstance(polygons, list) or not polygons:
        raise PromptError(DEGENERATE_POLYGON, "segmentation polygon list is empty")
    kept, any_outside, any_inside = [], False, False
    for poly in polygons:
        if not _finite_numbers(poly) or len(poly) < 6 or len(poly) % 2:
            raise PromptError(DEGENERATE_POLYGON, f"a polygon needs at least 3 (x, y) vertices, got {str(poly)[:80]}")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
        any_outside |= bool((~inside).any())
        any_inside |= bool(inside.any()) or _crosses_image(xy, size)
        kept.append([float(v) for v in poly])
    if not any_inside:
        raise PromptError(POLYGON_OUTSIDE, f"every polygon vertex lies outside the {w}x{h} (WxH) image")
    rle = mask_utils.merge(mask_utils.frPyObjects(kept, h, w))
    return _rle_json(rle), any_outside


def _crosses_image(xy: np.ndarray, size: tuple[int, int]) -> bool:
    """True when the polygon's bounding box overlaps the image (a big polygon around it has no vertex inside)."""
    h, w = size
    return bool(xy[:, 0].max() > 0 and xy[:, 0].min() < w and xy[:, 1].max() > 0 and xy[:, 1].min() < h)


def segmentation_to_rle(segmentation: Any, size: tuple[int, int]) -> tuple[dict, bool]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> (compressed RLE, clipped?)."""
    h, w = size
    if isinstance(segmentation, list):
        return polygons_to_rle(segmentation, size)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [h, w]:
            raise PromptError(BAD_SEGMENTATION, f"RLE size {segmentation['size']} differs from the image size {[h, w]}")
        if isinstance(segmentation["counts"], list):
            return _rle_json(mask_utils.frPyObjects(segmentation, h, w)), False
        return {"size": [h, w], "counts": str(segmentation["counts"])}, False
    raise PromptError(BAD_SEGMENTATION, f"unsupported segmentation of type {type(segmentation).__name__}")


def _rle_json(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_area(rle: dict) -> int:
    return int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def decode_rle(rle: dict) -> np.ndarray:
    """COCO compressed RLE (JSON form) -> bool (H, W) mask."""
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def encode_mask(mask: np.ndarray) -> dict:
    """bool (H, W) mask -> COCO compressed RLE in JSON form (counts as a string)."""
    return _rle_json(mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8))))


def points_to_clicks(points: Any, labels: Any, size: tuple[int, int]) -> tuple[Click, ...]:
    """[[x, y], ...] pixel points (+ optional 1/0 labels) -> clicks; PromptError(BAD_POINTS) when unusable."""
    h, w = size
    if not isinstance(points, list) or not points:
        raise PromptError(BAD_POINTS, "points must be a non-empty list of [x, y]")
    if labels is None:
        labels = [1] * len(points)
    if not isinstance(labels, list) or len(labels) != len(points) or any(v not in (0, 1) for v in labels):
        raise PromptError(BAD_POINTS, "point_labels must list 1 (positive) or 0 (negative) for every point")
    clicks = []
    for p, positive in zip(points, labels):
        if not _finite_numbers(p) or len(p) != 2:
            raise PromptError(BAD_POINTS, f"a point must be [x, y] numbers, got {p!r}")
        x, y = p
        if not (0 <= x < w and 0 <= y < h):
            raise PromptError(BAD_POINTS, f"point ({x:g}, {y:g}) lies outside the {w}x{h} (WxH) image")
        clicks.append(Click(int(y), int(x), bool(positive)))
    if not any(c.positive for c in clicks):
        raise PromptError(BAD_POINTS, "no positive point: a mask needs at least one point on the object")
    return tuple(clicks)


def coco_keypoints(keypoints: Any) -> list[list[float]] | None:
    """COCO `keypoints` [x, y, v, ...] -> the [x, y] of labelled points (v > 0); None when none are."""
    if not isinstance(keypoints, list) or len(keypoints) < 3 or len(keypoints) % 3:
        return None
    pts = [[keypoints[i], keypoints[i + 1]] for i in range(0, len(keypoints), 3)
           if isinstance(keypoints[i + 2], (int, float)) and keypoints[i + 2] > 0]
    return pts or None


# --------------------------------------------------------------------------------------------------
# COCO prompt files


def read_coco_file(path: str) -> dict:
    """Load a COCO annotation file (local path or object-store URI)."""
    from .images import ImageDecodeError
    from .sources import read_bytes

    try:
        doc = json.loads(read_bytes(path))
    except ImageDecodeError as e:
        raise PromptFileError(f"cannot read prompt file {path!r}: {e.detail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path!r} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise PromptFileError(f"{path!r} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return doc


def coco_prompts(doc: dict, image_root: str | None = None, id_from: str = "file_name", use: str = "auto") -> PromptSet:
    """Object prompts of a COCO annotation document, one ImageJob per image with usable objects.

    id_from: the feature-table id of an image is its `file_name` (as jobs/encode.py lists a COCO file) or
    its numeric `id`. use: "auto" takes points when given, else the segmentation, else the box; a kind
    forces that prompt (objects without it become NO_PROMPT problems).
    """
    if id_from not in ("file_name", "id"):
        raise ValueError(f"id_from must be 'file_name' or 'id', got {id_from!r}")
    if use not in USE_CHOICES:
        raise ValueError(f"use must be one of {USE_CHOICES}, got {use!r}")
    out = PromptSet()
    for cat in doc.get("categories") or []:
        if isinstance(cat, dict) and "id" in cat:
            out.categories[int(cat["id"])] = str(cat.get("name", cat["id"]))
    entries: dict[Any, dict] = {}
    for entry in doc["images"]:
        if isinstance(entry, dict) and "id" in entry:
            entries[entry["id"]] = entry
    objects: dict[Any, list[ObjectPrompt]] = {}
    for n, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict):
            out.problems.append(Problem(f"coco:#{n}", None, None, NO_PROMPT, "annotation is not a JSON object"))
            continue
        key = f"coco:{ann.get('id', f'#{n}')}"
        entry = entries.get(ann.get("image_id"))
        label = out.categories.get(ann.get("category_id")) if isinstance(ann.get("category_id"), int) else None
        if entry is None:
            out.problems.append(Problem(key, None, label, MISSING_IMAGE_ENTRY,
                                        f"image_id {ann.get('image_id')!r} is not in the file's images"))
            continue
        image_id = _image_id(entry, id_from)
        if label is None:
            out.problems.append(Problem(key, image_id, None, UNKNOWN_CATEGORY,
                                        f"category_id {ann.get('category_id')!r} is not in the file's categories"))
            continue
        size = _entry_size(entry)
        if size is None:
            out.problems.append(Problem(key, image_id, label, BAD_IMAGE_ENTRY,
                                        f"image {entry.get('id')!r} has no positive integer height/width"))
            continue
        try:
            prompt = _annotation_prompt(ann, key, image_id, label, size, use)
        except PromptError as e:
            out.problems.append(Problem(key, image_id, label, e.reason, e.detail))
            continue
        objects.setdefault(entry["id"], []).append(prompt)
    for coco_id, prompts in objects.items():
        entry = entries[coco_id]
        file_name = str(entry.get("file_name", ""))
        uri = join_uri(image_root, file_name) if image_root is not None and file_name else None
        image_id = _image_id(entry, id_from)
        out.images.append(ImageJob(image_id, _entry_size(entry), tuple(prompts), uri,
                                   int(coco_id) if isinstance(coco_id, int) else None, file_name or None))
        out.image_entries[image_id] = entry
    out.images.sort(key=lambda j: j.image_id)
    return out


def _image_id(entry: dict, id_from: str) -> str:
    """The feature-table id, as jobs/encode.py derives it from a COCO file (pipeline.sources.list_coco)."""
    return str(entry["id"]) if id_from == "id" else str(entry.get("file_name", entry["id"]))


def join_uri(root: str, name: str) -> str:
    """`root/name` for an object-store URI, an absolute local path otherwise."""
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return os.path.abspath(os.path.join(root, name))


def _entry_size(entry: dict) -> tuple[int, int] | None:
    h, w = entry.get("height"), entry.get("width")
    if isinstance(h, int) and isinstance(w, int) and not isinstance(h, bool) and h > 0 and w > 0:
        return (h, w)
    return None


def _annotation_prompt(ann: dict, key: str, image_id: str, label: str, size: tuple[int, int], use: str) -> ObjectPrompt:
    points = ann.get("points")
    labels = ann.get("point_labels")
    if points is None:
        points = coco_keypoints(ann.get("keypoints"))
    seg = ann.get("segmentation")
    has_seg = bool(seg)
    bbox = ann.get("bbox")
    kind = use
    if use == "auto":
        kind = "points" if points is not None else "mask" if has_seg else "box" if bbox is not None else None
    if kind is None:
        raise PromptError(NO_PROMPT, "annotation has no points, segmentation or bbox")
    notes: list[str] = []
    coarse = None
    if has_seg:
        try:
            coarse, clipped = segmentation_to_rle(seg, size)
        except PromptError:
            if kind == "mask":
                raise
            coarse, clipped = None, False  # only used for the IoU report: a broken one is dropped
            notes.append("segmentation unusable, no IoU reported")
        else:
            if clipped:
                notes.append("polygon clipped to the image")
            if rle_area(coarse) == 0:
                if kind == "mask":
                    raise PromptError(EMPTY_MASK, "the segmentation covers no pixel of the image")
                coarse = None
    category_id = ann.get("category_id")
    if kind == "mask":
        if not has_seg:
            raise PromptError(NO_PROMPT, "annotation has no segmentation to simulate clicks against")
        return ObjectPrompt(key, image_id, label, "mask", size, coarse=coarse, category_id=category_id,
                            notes=tuple(notes))
    if kind == "points":
        if points is None:
            raise PromptError(NO_PROMPT, "annotation has no points or labelled keypoints")
        clicks = points_to_clicks(points, labels, size)
        return ObjectPrompt(key, image_id, label, "points", size, clicks=clicks, coarse=coarse,
                            category_id=category_id, notes=tuple(notes))
    if bbox is None:
        raise PromptError(NO_PROMPT, "annotation has no bbox")
    box, clipped = clip_box(bbox, size)
    if clipped:
        notes.append("box clipped to the image")
    click, region = box_prompt(box, size)
    return ObjectPrompt(key, image_id, label, "box", size, clicks=(click,), box=region, coarse=coarse,
                        category_id=category_id, notes=tuple(notes))


def problems_for_image(job: ImageJob, reason: str, detail: str) -> list[Problem]:
    """The same problem for every object of an image (missing features, unreadable image...)."""
    return [Problem(o.key, job.image_id, o.label, reason, detail) for o in job.objects]


def filter_labels(jobs: Iterable[ImageJob], allowed: Sequence[str], where: str) -> tuple[list[ImageJob], list[Problem]]:
    """Drop objects whose label is not in `allowed` (e.g. a Label Studio project's BrushLabels)."""
    allowed_set = set(allowed)
    kept, problems = [], []
    for job in jobs:
        ok = tuple(o for o in job.objects if o.label in allowed_set)
        problems.extend(
            Problem(o.key, job.image_id, o.label, LABEL_NOT_IN_CONFIG,
                    f"label {o.label!r} is not one of the {where} labels {sorted(allowed_set)}")
            for o in job.objects if o.label not in allowed_set
        )
        if ok:
            kept.append(replace(job, objects=ok))
    return kept, problems
