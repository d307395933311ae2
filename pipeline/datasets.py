"""Evaluation datasets: RITM layouts of GrabCut / Berkeley / DAVIS, COCO annotation files, image + mask folders.

A dataset is a list of `SampleRef`: a small, picklable description (paths and mask convention) that Ray
workers turn into a `Sample` (RGB uint8 image + int8 ground truth with 1 object, 0 background, -1 ignore)
with `load()`. Conventions follow RITM's loaders (spec §1.1, `../shared/data/README.md`):

* images: every file of the image folder, sorted by name; the mask has the same stem (text before the first '.');
* GrabCut / Berkeley masks: channel 0 of the mask read as BGR; 128 -> ignore, 1 and > 128 -> object, else
  background (what RITM's `GrabCutDataset` + `DSample` give: see `ritm_grabcut_gt`);
* DAVIS masks: maximum over the BGR channels; > 0 -> object; no ignore;
* generic images/ + masks/ folders (MASK_BINARY): masks read as stored, by training's own reader
  (`interformer.training.data.read_mask`: palette indices, 16-bit values, maximum over colour channels), so a
  folder has one ground truth for training and evaluation; non-zero -> object, `ignore_value` -> ignore.

Images are decoded by the encoder's decoder (`pipeline.images.decode_image`), so in-worker encoding sees the
pixels stored features were made from, and every image and mask is refused (DatasetError) when its header
declares more than `max_pixels` pixels (the encoder's limit), before its pixels are decoded.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from PIL import Image

from interformer.coco_rle import RLEError, checked_counts
from interformer.numbers import is_finite_number
from interformer.training.data import DataError, read_mask

from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, image_size, max_file_bytes

MASK_RITM_GRABCUT = "ritm_grabcut"  # channel 0; 128 ignore, 1 and > 128 object
MASK_RITM_DAVIS = "ritm_davis"  # max over BGR channels > 0 object
MASK_BINARY = "binary"  # as stored (training's read_mask), > 0 object, optional ignore value
MASK_COCO = "coco"  # polygon / RLE segmentation from a COCO annotation
MASK_FORMATS = (MASK_RITM_GRABCUT, MASK_RITM_DAVIS, MASK_BINARY, MASK_COCO)


class DatasetError(ValueError):
    """A dataset folder or annotation file cannot be read as asked."""


@dataclass(frozen=True)
class SampleRef:
    """Where one evaluation sample (image + one object mask) comes from.

    dataset: dataset name; sample_id: unique within the dataset; image_id: the image's key in a feature
    table: the file name relative to the image folder (COCO: `file_name`), as `pipeline.sources` names an
    image when that folder is encoded; several samples may share an image. `mask_format` is one of MASK_FORMATS;
    `segmentation` holds the COCO polygon/RLE (JSON text) with `size` = (H, W) for MASK_COCO. `source` (JSON
    text) says where the dataset was read from and with which options; a run records it (`dataset_sources`).
    """

    dataset: str
    sample_id: str
    image_id: str
    image_path: str
    mask_format: str
    mask_path: str | None = None
    ignore_value: int | None = None
    segmentation: str | None = field(default=None, repr=False)
    size: tuple[int, int] | None = None
    source: str = field(default="", repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.sample_id)

    def load(self, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> "Sample":
        """Read the image and build the ground-truth mask; a file over `max_pixels` is a DatasetError."""
        try:
            return self._load(max_pixels)
        except DatasetError as e:
            raise DatasetError(f"{self.dataset}/{self.sample_id}: {e}") from None

    def _load(self, max_pixels: int | None) -> "Sample":
        image = read_rgb(self.image_path, max_pixels)
        if self.size is not None and tuple(self.size) != image.shape[:2]:
            raise DatasetError(f"the annotation gives the image size {tuple(self.size)}"
                               f" but {_shown(self.image_path)} is {image.shape[:2]}")
        gt = self._load_gt(max_pixels)
        if gt.shape != image.shape[:2]:
            raise DatasetError(f"mask size {gt.shape} differs from image size {image.shape[:2]}")
        return Sample(self, image, gt)

    def _load_gt(self, max_pixels: int | None) -> np.ndarray:
        if self.mask_format == MASK_COCO:
            return coco_mask(json.loads(self.segmentation), self.size)
        if self.mask_path is None:
            raise DatasetError("no mask path")
        if self.mask_format == MASK_BINARY:
            return stored_mask_gt(_read_checked(self.mask_path, "mask", max_pixels), self.ignore_value,
                                  _shown(self.mask_path))
        if self.mask_format in (MASK_RITM_GRABCUT, MASK_RITM_DAVIS):
            raw = _decode_bgr(_read_checked(self.mask_path, "mask", max_pixels), self.mask_path)
            return ritm_grabcut_gt(raw) if self.mask_format == MASK_RITM_GRABCUT else ritm_davis_gt(raw)
        raise DatasetError(f"unknown mask format {self.mask_format!r}; expected one of {MASK_FORMATS}")


@dataclass
class Sample:
    """A loaded sample: RGB uint8 image (H, W, 3) and int8 ground truth (H, W) with 1 / 0 / -1 (ignore)."""

    ref: SampleRef
    image: np.ndarray
    gt: np.ndarray

    @property
    def dataset(self) -> str:
        return self.ref.dataset

    @property
    def sample_id(self) -> str:
        return self.ref.sample_id

    @property
    def image_id(self) -> str:
        return self.ref.image_id


def read_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3) with the encoder's decoder (`pipeline.images.decode_image`:
    16-bit grey rounded to 8 bits, alpha dropped, EXIF orientation ignored), so that evaluating with in-worker
    encoding and with stored features sees the same pixels. Over `max_pixels` is a DatasetError."""
    data = _read_checked(path, "image", max_pixels)
    try:
        return decode_image(data, max_pixels)
    except ImageDecodeError as e:
        raise DatasetError(f"cannot read image file {_shown(path)}: {e}") from None


def _read_checked(path: str | Path, what: str, max_pixels: int | None) -> bytes:
    """A file's bytes, read by Python (any file name the folder listing gave works, which OpenCV's imread
    does not), at most what an image under `max_pixels` can take, whose header (read before any pixel is
    decoded) is an image of at most `max_pixels` pixels."""
    cap = max_file_bytes(max_pixels)
    try:
        with open(path, "rb") as f:
            data = f.read() if cap is None else f.read(cap + 1)
    except OSError as e:
        raise DatasetError(f"cannot read {what} file {_shown(path)}: {e.strerror or e}") from None
    if cap is not None and len(data) > cap:
        raise DatasetError(f"{what} file {_shown(path)} is over {cap} bytes, more than an image of at most "
                           f"{max_pixels} pixels can take")
    try:
        h, w = image_size(data)
    except ImageDecodeError as e:
        raise DatasetError(f"cannot read {what} file {_shown(path)}: {e}") from None
    if max_pixels is not None and h * w > max_pixels:
        raise DatasetError(f"{what} file {_shown(path)} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
                           "pixels (the encoder's --max-pixels)")
    return data


def _decode_bgr(data: bytes, path: str | Path) -> np.ndarray:
    """Decode a RITM-layout mask as BGR with OpenCV, as RITM's loaders do (their conventions depend on it).
    EXIF orientation is ignored, as by the encoder, the backend and training: masks refer to the stored pixels."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DatasetError(f"cannot read mask file {_shown(path)} (not an image)")
    return img


def stored_mask_values(data: bytes) -> np.ndarray:
    """A mask file's values as stored, read as training's `read_mask` reads them: palette PNGs give their
    indices, grey and 16-bit images their values, any other mode the maximum over its RGB channels."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im if im.mode in ("P", "L", "I", "I;16") else im.convert("RGB"))
    return arr.max(axis=2) if arr.ndim == 3 else arr


def stored_mask_gt(data: bytes, ignore_value: int | None = None, shown: str = "mask") -> np.ndarray:
    """Ground truth of a generic mask file: object and background exactly as training's `read_mask(binary)`
    gives them (one reader, one ground truth), and pixels whose stored value is `ignore_value` -> -1."""
    try:
        obj = read_mask(io.BytesIO(data), "binary", max_pixels=None)  # the caller checked its own limit
        gt = obj.astype(np.int8)
        if ignore_value is not None:
            gt[stored_mask_values(data) == ignore_value] = -1
    except (DataError, OSError, ValueError) as e:
        raise DatasetError(f"cannot read mask file {shown}: {str(e).split(': ', 1)[-1]}") from None
    return gt


def _shown(path: str | Path) -> str:
    """A path for messages: bytes that are not UTF-8 appear as escapes instead of breaking the print."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def ritm_grabcut_gt(mask_bgr: np.ndarray) -> np.ndarray:
    """GrabCut / Berkeley convention, exactly RITM's ground truth: channel 0; 128 -> -1 (ignore), 1 and > 128
    -> 1, everything else (0, 2..127) -> 0.

    RITM's `GrabCutDataset` sets 128 to -1 and > 128 to 1 but leaves 1..127 as stored, and `DSample` then
    takes the value 1 as the object: a stored 1 is object, a stored 2..127 background."""
    ch = mask_bgr[:, :, 0] if mask_bgr.ndim == 3 else mask_bgr
    gt = np.zeros(ch.shape, dtype=np.int8)
    gt[(ch > 128) | (ch == 1)] = 1
    gt[ch == 128] = -1
    return gt


def ritm_davis_gt(mask_bgr: np.ndarray) -> np.ndarray:
    """DAVIS / COCO_MVal convention: maximum over the colour channels > 0 -> 1, no ignore."""
    ch = mask_bgr.max(axis=2) if mask_bgr.ndim == 3 else mask_bgr
    return (ch > 0).astype(np.int8)


def coco_mask(segmentation: Any, size: tuple[int, int]) -> np.ndarray:
    """Decode a COCO polygon list, uncompressed RLE or compressed RLE into a 0/1 int8 mask of `size` (H, W).

    The segmentation is checked first (`check_segmentation`): pycocotools writes past its buffers on RLE
    counts that do not add up to H * W."""
    from pycocotools import mask as mask_utils

    from .polygons import rasterize

    h, w = int(size[0]), int(size[1])
    seg = check_segmentation(segmentation, (h, w))
    if isinstance(seg, list):
        return rasterize(seg, (h, w)).astype(np.int8)
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": seg["counts"]}, h, w)
    return (mask_utils.decode(rle) > 0).astype(np.int8)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_segmentation(segmentation: Any, size: tuple[int, int]) -> list[list[float]] | dict[str, Any]:
    """A COCO segmentation in a form safe to decode: polygons (each >= 3 finite (x, y) vertices) or an RLE
    of this `size` whose counts (list, or COCO's compressed string, which is expanded) add up to H * W.
    Raises DatasetError saying what is wrong."""
    h, w = size
    if isinstance(segmentation, list):
        for k, poly in enumerate(segmentation):
            if not isinstance(poly, list) or not all(is_finite_number(v) for v in poly):
                raise DatasetError(f"polygon {k} is not a list of finite numbers")
            if len(poly) % 2 or len(poly) < 6:
                raise DatasetError(f"polygon {k} has {len(poly)} coordinates; a polygon needs an even number, "
                                   "at least 6 (3 vertices)")
        return [[float(v) for v in poly] for poly in segmentation]
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise DatasetError(f"segmentation is neither a polygon list nor an RLE dict with 'counts' "
                           f"(got {type(segmentation).__name__})")
    rle_size = segmentation.get("size")
    if not isinstance(rle_size, list) or rle_size != [h, w]:
        raise DatasetError(f"RLE size {rle_size!r} differs from the image size [{h}, {w}]")
    try:
        counts = checked_counts(segmentation["counts"], h, w)
    except RLEError as e:
        raise DatasetError(str(e)) from None
    return {"size": [h, w], "counts": counts}


def _stem(path: Path) -> str:
    """RITM's stem: the file name up to the first '.'."""
    return path.name.split(".")[0]


def _by_stem(files: list[Path], folder: Path, what: str) -> dict[str, Path]:
    """Files by RITM stem; two files with one stem (cat.1.png, cat.2.png) would be one sample id, so they are
    an error naming both."""
    found: dict[str, Path] = {}
    for f in files:
        other = found.setdefault(_stem(f), f)
        if other != f:
            raise DatasetError(f"{what} files {_shown(other.name)} and {_shown(f.name)} in {_shown(folder)} share the "
                               f"name {_shown(_stem(f))!r} (the text before the first '.'), which names a sample: "
                               "rename one of them")
    return found


def paired_files(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: every file of `image_dir` sorted by name, its mask the same-stem file in `mask_dir`."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(f"folder {_shown(d)} does not exist")
    images = sorted(p for p in image_dir.glob("*.*") if p.is_file())
    if not images:
        raise DatasetError(f"no image files in {_shown(image_dir)}")
    _by_stem(images, image_dir, "image")
    masks = _by_stem(sorted(p for p in mask_dir.glob("*.*") if p.is_file()), mask_dir, "mask")
    missing = [_shown(p.name) for p in images if _stem(p) not in masks]
    if missing:
        raise DatasetError(f"{len(missing)} images in {_shown(image_dir)} have no mask in {_shown(mask_dir)}: "
                           f"{missing[:5]}")
    return [(p, masks[_stem(p)]) for p in images]


def _source(reader: str, **where: Any) -> str:
    """What a dataset's samples were read from and how (JSON text): a run records it, so that a rerun
    cannot reuse results of another dataset that has the same name."""
    return json.dumps({"reader": reader, **where}, sort_keys=True)


def _folder_refs(name: str, image_dir: Path, mask_dir: Path, mask_format: str, ignore_value: int | None = None,
                 reader: str = "folder") -> list[SampleRef]:
    source = _source(reader, images=str(Path(image_dir).resolve()), masks=str(Path(mask_dir).resolve()),
                     mask_format=mask_format, ignore_value=ignore_value)
    return [
        SampleRef(name, _stem(img), img.name, str(img), mask_format, str(msk), ignore_value, source=source)
        for img, msk in paired_files(image_dir, mask_dir)
    ]


def grabcut(root: str | Path, name: str = "GrabCut") -> list[SampleRef]:
    """GrabCut in RITM's layout: `data_GT/` images, `boundary_GT/` masks (50 samples)."""
    root = Path(root)
    return _folder_refs(name, root / "data_GT", root / "boundary_GT", MASK_RITM_GRABCUT, reader="grabcut")


def berkeley(root: str | Path, name: str = "Berkeley") -> list[SampleRef]:
    """Berkeley in RITM's layout: `images/`, `masks/` (100 samples), GrabCut's mask convention."""
    root = Path(root)
    return _folder_refs(name, root / "images", root / "masks", MASK_RITM_GRABCUT, reader="berkeley")


def davis(root: str | Path, name: str = "DAVIS") -> list[SampleRef]:
    """DAVIS-345 in RITM's layout: `img/`, `gt/` (345 samples)."""
    root = Path(root)
    return _folder_refs(name, root / "img", root / "gt", MASK_RITM_DAVIS, reader="davis")


def image_mask_folder(
    image_dir: str | Path, mask_dir: str | Path, name: str | None = None, ignore_value: int | None = None
) -> list[SampleRef]:
    """Any folder pair of images and same-stem masks: non-zero is object, `ignore_value` (if given) is ignored."""
    image_dir = Path(image_dir)
    return _folder_refs(name or image_dir.parent.name or image_dir.name, image_dir, Path(mask_dir), MASK_BINARY, ignore_value)


def coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    name: str | None = None,
    min_area: float = 0.0,
    include_crowd: bool = False,
) -> list[SampleRef]:
    """One sample per instance of a COCO annotation file, images sorted by id, instances by id.

    Instances with area below `min_area` (pixels, COCO's `area` field; none given counts as 0) are dropped,
    and so are crowd regions unless `include_crowd`. Instances without a segmentation are skipped. The whole
    file is checked first (`read_coco`): a malformed entry is a DatasetError naming it, not a failed sample.
    """
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetError(f"COCO image folder {_shown(image_dir)} does not exist")
    images, anns = read_coco(annotation_file)
    name = name or annotation_file.stem
    source = _source("coco", annotations=str(annotation_file.resolve()), images=str(image_dir.resolve()),
                     min_area=min_area, include_crowd=include_crowd)
    refs = []
    for ann in anns:
        info = images[ann["image_id"]]
        if not ann.get("segmentation") or ann.get("area", 0.0) < min_area:
            continue
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        refs.append(
            SampleRef(
                dataset=name,
                sample_id=str(ann["id"]),
                image_id=info["file_name"],
                image_path=str(image_dir / info["file_name"]),
                mask_format=MASK_COCO,
                segmentation=json.dumps(ann["segmentation"]),
                size=(info["height"], info["width"]),
                source=source,
            )
        )
    return refs


def read_coco(path: Path) -> tuple[dict[Any, dict[str, Any]], list[dict[str, Any]]]:
    """(images by id, annotations sorted by image then id) of a COCO annotation file, every entry checked:
    image ids unique, `file_name` a non-empty string, `height` / `width` positive integers; annotation ids
    unique, `image_id` an image of the file, `area` a number, `iscrowd` 0 or 1, `segmentation` decodable."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"COCO annotation file {_shown(path)} does not exist") from None
    except OSError as e:
        raise DatasetError(f"cannot read COCO annotation file {_shown(path)}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:
        raise DatasetError(f"COCO annotation file {_shown(path)} is not valid JSON ({e})") from None
    where = f"COCO annotation file {_shown(path)}"
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("annotations", []), list):
        raise DatasetError(f"{where}: expected an object with an 'images' list and an 'annotations' list")
    images = {}
    for k, img in enumerate(doc["images"]):
        info = _check_image(img, f"{where}: images[{k}]")
        if info["id"] in images:
            raise DatasetError(f"{where}: images[{k}] repeats image id {info['id']!r}")
        images[info["id"]] = info
    anns: dict[str, dict[str, Any]] = {}
    for k, ann in enumerate(doc.get("annotations", [])):
        checked = _check_annotation(ann, images, f"{where}: annotations[{k}]")
        if str(checked["id"]) in anns:
            raise DatasetError(f"{where}: annotations[{k}] repeats annotation id {checked['id']!r} "
                               "(an annotation id names a sample)")
        anns[str(checked["id"])] = checked
    order = {img_id: i for i, img_id in enumerate(sorted(images, key=_id_order))}
    return images, sorted(anns.values(), key=lambda a: (order[a["image_id"]], _id_order(a["id"])))


def _id_order(v: Any) -> tuple[bool, Any]:
    return (isinstance(v, str), v)


def _check_id(entry: Any, key: str, where: str) -> Any:
    v = entry.get(key)
    if not (_is_int(v) or (isinstance(v, str) and v)):
        raise DatasetError(f"{where}: {key!r} must be an integer or a non-empty string, got {v!r}")
    return v


def _check_image(img: Any, where: str) -> dict[str, Any]:
    if not isinstance(img, dict):
        raise DatasetError(f"{where} is not an object")
    img_id = _check_id(img, "id", where)
    where = f"{where} (id {img_id!r})"
    if not isinstance(img.get("file_name"), str) or not img["file_name"]:
        raise DatasetError(f"{where}: 'file_name' must be a non-empty string")
    for key in ("height", "width"):
        if not _is_int(img.get(key)) or img[key] < 1:
            raise DatasetError(f"{where}: {key!r} must be a positive integer, got {img.get(key)!r}")
    return {"id": img_id, "file_name": img["file_name"], "height": img["height"], "width": img["width"]}


def _check_annotation(ann: Any, images: dict[Any, dict[str, Any]], where: str) -> dict[str, Any]:
    if not isinstance(ann, dict):
        raise DatasetError(f"{where} is not an object")
    ann_id = _check_id(ann, "id", where)
    where = f"{where} (id {ann_id!r})"
    info = images.get(ann.get("image_id")) if _is_int(ann.get("image_id")) or isinstance(ann.get("image_id"), str) \
        else None
    if info is None:
        raise DatasetError(f"{where}: 'image_id' {ann.get('image_id')!r} is not the id of an image in the file")
    if "area" in ann and not (is_finite_number(ann["area"]) and ann["area"] >= 0):
        raise DatasetError(f"{where}: 'area' must be a number of pixels >= 0, got {ann['area']!r}")
    if ann.get("iscrowd", 0) not in (0, 1):
        raise DatasetError(f"{where}: 'iscrowd' must be 0 or 1, got {ann['iscrowd']!r}")
    seg = ann.get("segmentation")
    if seg:
        try:
            check_segmentation(seg, (info["height"], info["width"]))
        except DatasetError as e:
            raise DatasetError(f"{where}: segmentation: {e}") from None
    return {**ann, "id": ann_id, "image_id": info["id"]}


BENCHMARKS: dict[str, Callable[..., list[SampleRef]]] = {"grabcut": grabcut, "berkeley": berkeley, "davis": davis}


def detect_folder(path: str | Path, ignore_value: int | None = None) -> list[SampleRef]:
    """Read a dataset folder by its layout: GrabCut (data_GT/boundary_GT), DAVIS (img/gt), Berkeley by name
    (images/masks, GrabCut convention), any other images/masks folder as generic binary masks."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {_shown(path)} does not exist")
    name = path.resolve().name
    if (path / "data_GT").is_dir() and (path / "boundary_GT").is_dir():
        return grabcut(path, name)
    if (path / "img").is_dir() and (path / "gt").is_dir():
        return davis(path, name)
    if (path / "images").is_dir() and (path / "masks").is_dir():
        if name.lower() == "berkeley":
            return berkeley(path, name)
        return image_mask_folder(path / "images", path / "masks", name, ignore_value)
    raise DatasetError(
        f"{path}: unknown layout; expected data_GT/ + boundary_GT/ (GrabCut), img/ + gt/ (DAVIS) or images/ + masks/"
    )


def dataset_sources(refs: list[SampleRef]) -> dict[str, dict[str, Any]]:
    """Each dataset name of `refs` -> where and how its samples were read (`SampleRef.source`). Raises
    DatasetError when two datasets read from different places (or with different options) share a name."""
    found: dict[str, str] = {}
    for r in refs:
        if found.setdefault(r.dataset, r.source) != r.source:
            raise DatasetError(f"two datasets are named {r.dataset!r} ({_describe(found[r.dataset])} and "
                               f"{_describe(r.source)}); give them distinct folder names")
    return {name: json.loads(src) if src else {} for name, src in found.items()}


def _describe(source: str) -> str:
    info = json.loads(source) if source else {}
    return _shown(info.get("annotations") or info.get("images") or "an unknown place")


def default_data_root() -> Path:
    """Where benchmark names (GrabCut, Berkeley, DAVIS) are looked up unless a data root is given: the team's
    `shared/data` beside the project checkout. The same for every job and from any current folder."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def resolve(
    spec: str,
    data_root: str | Path | None = None,
    coco_images: str | Path | None = None,
    ignore_value: int | None = None,
    min_area: float = 0.0,
    include_crowd: bool = False,
    root_option: str = "--data-root",
) -> list[SampleRef]:
    """Samples for a dataset given by benchmark name (under `data_root`, default `default_data_root()`),
    folder path or COCO .json file. `root_option` names the caller's data-root option in errors."""
    key = spec.lower()
    if key in BENCHMARKS and not Path(spec).exists():
        root = Path(data_root) if data_root is not None else default_data_root()
        folder = root / {"grabcut": "GrabCut", "berkeley": "Berkeley", "davis": "DAVIS"}[key]
        if not folder.is_dir():
            raise DatasetError(f"benchmark {spec} not found: {folder} does not exist (give the folder that holds "
                               f"GrabCut/, Berkeley/ and DAVIS/ with {root_option})")
        return BENCHMARKS[key](folder)
    path = Path(spec)
    if path.suffix.lower() == ".json":
        if coco_images is None:
            raise DatasetError(f"{spec} is a COCO annotation file: give its image folder (--coco-images)")
        return coco(path, coco_images, min_area=min_area, include_crowd=include_crowd)
    if path.is_dir():
        return detect_folder(path, ignore_value)
    raise DatasetError(f"dataset {spec!r} is neither a benchmark name ({', '.join(BENCHMARKS)}), a folder nor a .json file")
