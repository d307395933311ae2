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
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from interformer.clicks import Click, Roi
from interformer.coco_rle import RLEError, checked_counts
from interformer.numbers import is_finite_number

from . import box_prompt as _box
from .box_prompt import BoxPromptError, box_to_click
from .polygons import PolygonError, checked_polygons, polygons_rle

PROMPT_KINDS = ("box", "mask", "points")
USE_CHOICES = ("auto", *PROMPT_KINDS)

# Reason codes of objects that cannot be (or were not) segmented.
MISSING_IMAGE_ENTRY = "missing_image_entry"  # annotation names an image id the file does not list
BAD_IMAGE_ENTRY = "bad_image_entry"  # image entry without a usable size, or entries of one image that disagree
DUPLICATE_ID = "duplicate_id"  # two different image entries (or annotations) share one COCO id
UNKNOWN_CATEGORY = "unknown_category"  # category id not in `categories`
NO_PROMPT = "no_prompt"  # nothing usable for the requested prompt kind
DEGENERATE_BOX = _box.DEGENERATE_BOX  # width or height <= 0, or not finite numbers
BOX_OUTSIDE = _box.BOX_OUTSIDE  # the box does not overlap the image
ROTATED_BOX = _box.ROTATED_BOX  # a rotated rectangle (Label Studio); only axis-aligned boxes are prompts
DEGENERATE_POLYGON = "degenerate_polygon"  # fewer than 3 vertices, not numbers, or too complex to rasterise
POLYGON_OUTSIDE = "polygon_outside"  # every vertex lies outside the image
EMPTY_MASK = "empty_mask"  # the coarse mask covers no pixel of the image
BAD_SEGMENTATION = "bad_segmentation"  # an RLE of another size or whose counts do not cover the image; unknown type
BAD_POINTS = "bad_points"  # malformed, outside the image, or no positive point
LABEL_NOT_IN_CONFIG = "label_not_in_config"  # the Label Studio project cannot hold this label
NO_FEATURES = "no_features"  # the image has no stored features (and was not encoded)
IMAGE_UNREADABLE = "image_unreadable"  # encoding on the fly failed to read/decode the image
SIZE_MISMATCH = "size_mismatch"  # the prompt file sizes the image differently from its features
INTERNAL_ERROR = "internal_error"  # an unexpected error in a worker (with its traceback)
WORKER_DIED = "worker_died"  # every worker that took the image died (out of memory, a crash in native code)

# Failures that a later run may not repeat (features encoded meanwhile, a worker crash, an image re-encoded
# since its size disagreed, e.g. now that its EXIF orientation is recorded): not final.
RETRYABLE = frozenset({NO_FEATURES, IMAGE_UNREADABLE, INTERNAL_ERROR, SIZE_MISMATCH, WORKER_DIED})

# Images larger than this cannot be held by pycocotools' RLE (32-bit pixel positions), nor decoded sanely.
MAX_IMAGE_PIXELS = 1 << 31


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
    source_image_id: the COCO image id (int, or a string id) of the entry the object was annotated on (entries
    that name one image share one ImageJob, and each object keeps its own id for the output).
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
    source_image_id: int | str | None = None

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
    source_image_id: the COCO image id (of the first entry, when several entries name the image; each object
    keeps its own); task_id: the Label Studio task (when known).
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
    image_entries: dict[str, list[dict]] = field(default_factory=dict)  # image id -> its COCO entries, file order

    @property
    def num_objects(self) -> int:
        return sum(len(j.objects) for j in self.images)


# --------------------------------------------------------------------------------------------------
# Geometry helpers (pure)


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, (list, tuple)) and all(is_finite_number(v) for v in values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
        raise PromptError(e.reason, str(e)) from None


def polygons_to_rle(polygons: Any, size: tuple[int, int]) -> tuple[dict, bool]:
    """COCO polygons -> (compressed RLE of their union, some vertex outside the image?).

    Rasterised by `pipeline.polygons.polygons_rle` (clipped to a frame around the image, bounded work).
    Raises PromptError for malformed or too complex polygons and polygons entirely outside the image.
    """
    h, w = size
    if not isinstance(polygons, list) or not polygons:
        raise PromptError(DEGENERATE_POLYGON, "segmentation polygon list is empty")
    try:
        checked_polygons(polygons, size)
    except PolygonError as e:
        raise PromptError(DEGENERATE_POLYGON, str(e)) from None
    any_outside, any_inside = False, False
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
        any_outside |= bool((~inside).any())
        any_inside |= bool(inside.any()) or _crosses_image(xy, size)
    if not any_inside:
        raise PromptError(POLYGON_OUTSIDE, f"every polygon vertex lies outside the {w}x{h} (WxH) image")
    return _rle_json(polygons_rle(polygons, size)), any_outside


def _crosses_image(xy: np.ndarray, size: tuple[int, int]) -> bool:
    """True when the polygon's bounding box overlaps the image (a big polygon around it has no vertex inside)."""
    h, w = size
    return bool(xy[:, 0].max() > 0 and xy[:, 0].min() < w and xy[:, 1].max() > 0 and xy[:, 1].min() < h)


def segmentation_to_rle(segmentation: Any, size: tuple[int, int]) -> tuple[dict, bool]:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> (compressed RLE, clipped?).

    An RLE must be of the image's size and its counts must cover the image exactly (non-negative runs summing to
    H * W): pycocotools would otherwise decode uninitialised memory or fail later. PromptError otherwise."""
    h, w = size
    if isinstance(segmentation, list):
        return polygons_to_rle(segmentation, size)
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        raise PromptError(BAD_SEGMENTATION, f"unsupported segmentation of type {type(segmentation).__name__}: "
                                            "give polygons [[x1, y1, ...], ...] or an RLE {'size', 'counts'}")
    rle_size, counts = segmentation["size"], segmentation["counts"]
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) for v in rle_size)):
        raise PromptError(BAD_SEGMENTATION, f"RLE size must be [height, width] integers, got {str(rle_size)[:80]}")
    if rle_size != [h, w]:
        raise PromptError(BAD_SEGMENTATION, f"RLE size {rle_size} differs from the image size {[h, w]}")
    try:
        runs = checked_counts(counts, h, w)
    except RLEError as e:
        raise PromptError(BAD_SEGMENTATION, str(e)) from None
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts}, False
    return _rle_json(mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)), False


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


def _not_json(constant: str) -> None:
    return None


def read_coco_file(path: str) -> dict:
    """Load a COCO annotation file (local path or object-store URI); PromptFileError when it cannot be used.

    `NaN` and `Infinity`, which Python's json accepts but JSON does not, are read as null: a number slot
    holding one is refused like any missing number, and no output copies them into a file strict readers
    refuse."""
    from .images import ImageDecodeError
    from .sources import read_bytes

    try:
        doc = json.loads(read_bytes(path), parse_constant=_not_json)
    except ImageDecodeError as e:
        raise PromptFileError(f"cannot read prompt file {path!r}: {e.detail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptFileError(f"{path!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise PromptFileError(f"{path!r} is malformed: its JSON is nested too deeply to be a COCO file") from None
    _coco_lists(doc, repr(path))
    return doc


def _coco_lists(doc: Any, where: str) -> tuple[list, list]:
    """The `images` and `annotations` lists of a COCO document, or PromptFileError."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise PromptFileError(f"{where} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return doc["images"], doc["annotations"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coco_categories(categories: Any) -> dict[int, str]:
    """`categories` -> {id: name}; PromptFileError naming the first entry without an integer id and string name,
    or an id given two different names."""
    if categories is None:
        return {}
    if not isinstance(categories, list):
        raise PromptFileError(f"'categories' must be a list of {{'id', 'name'}} objects, got {_short(categories)}")
    out: dict[int, str] = {}
    for n, cat in enumerate(categories):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise PromptFileError(f"categories[{n}] needs an integer 'id': {_short(cat)}")
        name = cat.get("name", str(cat["id"]))
        if not isinstance(name, str) or not name:
            raise PromptFileError(f"categories[{n}] needs a non-empty string 'name': {_short(cat)}")
        if out.get(cat["id"], name) != name:
            raise PromptFileError(f"categories[{n}] gives id {cat['id']} the name {name!r}, an earlier entry "
                                  f"{out[cat['id']]!r}: one id, one name")
        out[cat["id"]] = name
    return out


def _is_coco_id(value: Any) -> bool:
    return _is_int(value) or isinstance(value, str)


@dataclass
class _Entries:
    """The image entries of a COCO file: by COCO id, the ids two different entries claim, and per feature-table
    id the entries naming that image, with why they cannot share one job (when they disagree)."""

    by_id: dict[Any, tuple[int, dict]] = field(default_factory=dict)  # COCO id -> (index, entry)
    clashes: dict[Any, str] = field(default_factory=dict)  # COCO id -> detail
    images: dict[str, list[Any]] = field(default_factory=dict)  # feature id -> COCO ids, in file order
    conflicts: dict[str, str] = field(default_factory=dict)  # feature id -> detail


def _coco_entries(images: list, id_from: str) -> _Entries:
    out = _Entries()
    for n, entry in enumerate(images):
        if not isinstance(entry, dict) or not _is_coco_id(entry.get("id")):
            raise PromptFileError(f"images[{n}] needs an integer or string 'id': {_short(entry)}")
        name = entry.get("file_name")
        if name is not None and (not isinstance(name, str) or not name):
            raise PromptFileError(f"images[{n}] needs a non-empty string 'file_name': {_short(entry)}")
        coco_id = entry["id"]
        if coco_id in out.by_id:
            first, seen = out.by_id[coco_id]
            if seen != entry and coco_id not in out.clashes:
                out.clashes[coco_id] = (f"images[{first}] and images[{n}] are different entries with the same id "
                                        f"{coco_id!r} ({_short(seen)} vs {_short(entry)}): give each image its own id")
            continue
        out.by_id[coco_id] = (n, entry)
        out.images.setdefault(_image_id(entry, id_from), []).append(coco_id)
    for image_id, ids in out.images.items():
        (a, first), others = out.by_id[ids[0]], [out.by_id[i] for i in ids[1:]]
        differ = [(b, e) for b, e in others if _entry_look(e) != _entry_look(first)]
        if differ:
            b, other = differ[0]
            out.conflicts[image_id] = (f"images[{a}] and images[{b}] both name image {image_id!r} but differ in "
                                       f"size or file ({_short(first)} vs {_short(other)})")
    return out


def _entry_look(entry: dict) -> tuple[Any, Any]:
    """What entries naming one image must agree on to share a job: the size and the file."""
    return _entry_size(entry), entry.get("file_name")


def coco_prompts(doc: dict, image_root: str | None = None, id_from: str = "file_name", use: str = "auto") -> PromptSet:
    """Object prompts of a COCO annotation document, one ImageJob per image with usable objects.

    id_from: the feature-table id of an image is its `file_name` (as jobs/encode.py lists a COCO file) or
    its numeric `id`. use: "auto" takes points when given, else the segmentation, else the box; a kind
    forces that prompt (objects without it become NO_PROMPT problems).

    Image entries that name one image (the same feature-table id) give one job, whose objects keep their own
    COCO image ids; so job keys are unique. A COCO id shared by two different image entries, or by two
    different annotations, is a DUPLICATE_ID problem for each object concerned. A file whose categories or
    image entries are not COCO raises PromptFileError naming the entry; a bad annotation is a Problem.
    """
    if id_from not in ("file_name", "id"):
        raise ValueError(f"id_from must be 'file_name' or 'id', got {id_from!r}")
    if use not in USE_CHOICES:
        raise ValueError(f"use must be one of {USE_CHOICES}, got {use!r}")
    images, annotations = _coco_lists(doc, "the prompt document")
    out = PromptSet(categories=_coco_categories(doc.get("categories")))
    entries = _coco_entries(images, id_from)
    objects: dict[str, list[ObjectPrompt]] = {}
    for n, ann, key, clash in _keyed_annotations(annotations):
        if ann is None:
            out.problems.append(Problem(key, None, None, NO_PROMPT, "annotation is not a JSON object"))
            continue
        try:
            image_id, prompt = _coco_object(ann, key, clash, entries, out.categories, id_from, use)
        except _ObjectProblem as e:
            out.problems.append(e.problem)
            continue
        objects.setdefault(image_id, []).append(prompt)
    for image_id, prompts in objects.items():
        coco_id = entries.images[image_id][0]
        entry = entries.by_id[coco_id][1]
        file_name = entry.get("file_name")
        uri = join_uri(image_root, file_name) if image_root is not None and file_name else None
        out.images.append(ImageJob(image_id, _entry_size(entry), tuple(prompts), uri,
                                   coco_id if _is_int(coco_id) else None, file_name))
        out.image_entries[image_id] = [entries.by_id[i][1] for i in entries.images[image_id]]
    out.images.sort(key=lambda j: j.image_id)
    return out


class _ObjectProblem(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


def _keyed_annotations(annotations: list) -> Iterable[tuple[int, dict | None, str, str | None]]:
    """(index, annotation or None when not an object, key, why its key is not its own or None).

    The key is "coco:<id>" (integer or string id), else "coco:#<index>"; different annotations with one key
    all get the reason, identical repeats are one annotation."""
    keyed: list[tuple[int, dict | None, str]] = []
    first: dict[str, tuple[int, Any]] = {}
    clashes: dict[str, str] = {}
    for n, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            keyed.append((n, None, f"coco:#{n}"))
            continue
        key = f"coco:{ann['id']}" if _is_coco_id(ann.get("id")) else f"coco:#{n}"
        if key in first:
            m, seen = first[key]
            if seen == ann:
                continue
            clashes.setdefault(key, f"annotations[{m}] and annotations[{n}] are different annotations with the "
                                    f"same key {key!r}: give each annotation its own id")
        else:
            first[key] = (n, ann)
        keyed.append((n, ann, key))
    return [(n, ann, key, clashes.get(key)) for n, ann, key in keyed]


def _coco_object(ann: dict, key: str, clash: str | None, entries: _Entries, categories: dict[int, str],
                 id_from: str, use: str) -> tuple[str, ObjectPrompt]:
    """(feature id, prompt) of one annotation, or _ObjectProblem saying why it cannot be used."""
    ref, category_id = ann.get("image_id"), ann.get("category_id")
    label = categories.get(category_id) if _is_int(category_id) else None
    if not _is_coco_id(ref) or (ref not in entries.by_id):
        raise _ObjectProblem(Problem(key, None, label, MISSING_IMAGE_ENTRY,
                                     f"image_id {_short(ref)} is not in the file's images"))
    entry = entries.by_id[ref][1]
    image_id = _image_id(entry, id_from)
    if clash is not None:
        raise _ObjectProblem(Problem(key, image_id, label, DUPLICATE_ID, clash))
    if ref in entries.clashes:
        raise _ObjectProblem(Problem(key, image_id, label, DUPLICATE_ID, entries.clashes[ref]))
    if label is None:
        raise _ObjectProblem(Problem(key, image_id, None, UNKNOWN_CATEGORY,
                                     f"category_id {_short(category_id)} is not in the file's categories"))
    if image_id in entries.conflicts:
        raise _ObjectProblem(Problem(key, image_id, label, BAD_IMAGE_ENTRY, entries.conflicts[image_id]))
    size = _entry_size(entry)
    if size is None:
        raise _ObjectProblem(Problem(key, image_id, label, BAD_IMAGE_ENTRY,
                                     f"image {ref!r} has no positive integer height/width (at most "
                                     f"{MAX_IMAGE_PIXELS} pixels)"))
    try:
        prompt = _annotation_prompt(ann, key, image_id, label, size, use)
    except PromptError as e:
        raise _ObjectProblem(Problem(key, image_id, label, e.reason, e.detail)) from None
    return image_id, replace(prompt, source_image_id=ref if _is_int(ref) or isinstance(ref, str) else None)


def _image_id(entry: dict, id_from: str) -> str:
    """The feature-table id, as jobs/encode.py derives it from a COCO file (pipeline.sources.list_coco)."""
    return str(entry["id"]) if id_from == "id" else str(entry.get("file_name") or entry["id"])


def join_uri(root: str, name: str) -> str:
    """`root/name` for an object-store URI, an absolute local path otherwise."""
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return os.path.abspath(os.path.join(root, name))


def _entry_size(entry: dict) -> tuple[int, int] | None:
    """(H, W) of an image entry: positive integers, at most MAX_IMAGE_PIXELS pixels; None otherwise."""
    h, w = entry.get("height"), entry.get("width")
    if _is_int(h) and _is_int(w) and h > 0 and w > 0 and h * w <= MAX_IMAGE_PIXELS:
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
