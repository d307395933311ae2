"""Evaluation datasets: RITM layouts of GrabCut / Berkeley / DAVIS, COCO annotation files, image + mask folders.

A dataset is a list of `SampleRef`: a small, picklable description (paths and mask convention) that Ray
workers turn into a `Sample` (RGB uint8 image + int8 ground truth with 1 object, 0 background, -1 ignore)
with `load()`. Conventions follow RITM's loaders (spec §1.1, `../shared/data/README.md`):

* images: every file of the image folder, sorted by name; the mask has the same stem (text before the first '.');
* GrabCut / Berkeley masks: channel 0 of the mask read as BGR; 128 -> ignore, > 128 -> object, else background;
* DAVIS masks: maximum over the BGR channels; > 0 -> object; no ignore.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

MASK_RITM_GRABCUT = "ritm_grabcut"  # channel 0; 128 ignore, > 128 object
MASK_RITM_DAVIS = "ritm_davis"  # max over BGR channels > 0 object
MASK_BINARY = "binary"  # single channel (channel 0), > 0 object, optional ignore value
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
    `segmentation` holds the COCO polygon/RLE (JSON text) with `size` = (H, W) for MASK_COCO.
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

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.sample_id)

    def load(self) -> "Sample":
        """Read the image and build the ground-truth mask."""
        image = read_rgb(self.image_path)
        gt = self._load_gt()
        if gt.shape != image.shape[:2]:
            raise DatasetError(
                f"{self.dataset}/{self.sample_id}: mask size {gt.shape} differs from image size {image.shape[:2]}"
            )
        return Sample(self, image, gt)

    def _load_gt(self) -> np.ndarray:
        if self.mask_format == MASK_COCO:
            return coco_mask(json.loads(self.segmentation), self.size)
        if self.mask_path is None:
            raise DatasetError(f"{self.dataset}/{self.sample_id}: no mask path")
        raw = _read_bgr(self.mask_path, what="mask")
        if self.mask_format == MASK_RITM_GRABCUT:
            return ritm_grabcut_gt(raw)
        if self.mask_format == MASK_RITM_DAVIS:
            return ritm_davis_gt(raw)
        if self.mask_format == MASK_BINARY:
            return binary_gt(raw[:, :, 0], self.ignore_value)
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


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3), as RITM does (OpenCV decode, BGR -> RGB)."""
    return cv2.cvtColor(_read_bgr(path, what="image"), cv2.COLOR_BGR2RGB)


def _read_bgr(path: str | Path, what: str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"cannot read {what} file {path} (missing or not an image)")
    return img


def ritm_grabcut_gt(mask_bgr: np.ndarray) -> np.ndarray:
    """GrabCut / Berkeley convention: channel 0; 128 -> -1 (ignore), > 128 -> 1, everything else 0."""
    ch = mask_bgr[:, :, 0] if mask_bgr.ndim == 3 else mask_bgr
    gt = np.zeros(ch.shape, dtype=np.int8)
    gt[ch > 128] = 1
    gt[ch == 128] = -1
    return gt


def ritm_davis_gt(mask_bgr: np.ndarray) -> np.ndarray:
    """DAVIS / COCO_MVal convention: maximum over the colour channels > 0 -> 1, no ignore."""
    ch = mask_bgr.max(axis=2) if mask_bgr.ndim == 3 else mask_bgr
    return (ch > 0).astype(np.int8)


def binary_gt(mask: np.ndarray, ignore_value: int | None = None) -> np.ndarray:
    """Generic masks: `ignore_value` -> -1, other non-zero values -> 1, zero -> 0."""
    gt = (mask > 0).astype(np.int8)
    if ignore_value is not None:
        gt[mask == ignore_value] = -1
    return gt


def coco_mask(segmentation: Any, size: tuple[int, int]) -> np.ndarray:
    """Decode a COCO polygon list, uncompressed RLE or compressed RLE into a 0/1 int8 mask of `size` (H, W)."""
    from pycocotools import mask as mask_utils

    h, w = int(size[0]), int(size[1])
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, h, w)
    elif isinstance(segmentation, dict):
        rle = dict(segmentation)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DatasetError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    return (mask_utils.decode(rle) > 0).astype(np.int8)


def _stem(path: Path) -> str:
    """RITM's stem: the file name up to the first '.'."""
    return path.name.split(".")[0]


def paired_files(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs: every file of `image_dir` sorted by name, its mask the same-stem file in `mask_dir`."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DatasetError(f"folder {d} does not exist")
    images = sorted(p for p in image_dir.glob("*.*") if p.is_file())
    if not images:
        raise DatasetError(f"no image files in {image_dir}")
    masks = {_stem(p): p for p in mask_dir.glob("*.*") if p.is_file()}
    missing = [p.name for p in images if _stem(p) not in masks]
    if missing:
        raise DatasetError(f"{len(missing)} images in {image_dir} have no mask in {mask_dir}: {missing[:5]}")
    return [(p, masks[_stem(p)]) for p in images]


def _folder_refs(name: str, image_dir: Path, mask_dir: Path, mask_format: str, ignore_value: int | None = None) -> list[SampleRef]:
    return [
        SampleRef(name, _stem(img), img.name, str(img), mask_format, str(msk), ignore_value)
        for img, msk in paired_files(image_dir, mask_dir)
    ]


def grabcut(root: str | Path, name: str = "GrabCut") -> list[SampleRef]:
    """GrabCut in RITM's layout: `data_GT/` images, `boundary_GT/` masks (50 samples)."""
    root = Path(root)
    return _folder_refs(name, root / "data_GT", root / "boundary_GT", MASK_RITM_GRABCUT)


def berkeley(root: str | Path, name: str = "Berkeley") -> list[SampleRef]:
    """Berkeley in RITM's layout: `images/`, `masks/` (100 samples), GrabCut's mask convention."""
    root = Path(root)
    return _folder_refs(name, root / "images", root / "masks", MASK_RITM_GRABCUT)


def davis(root: str | Path, name: str = "DAVIS") -> list[SampleRef]:
    """DAVIS-345 in RITM's layout: `img/`, `gt/` (345 samples)."""
    root = Path(root)
    return _folder_refs(name, root / "img", root / "gt", MASK_RITM_DAVIS)


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

    Instances with area below `min_area` (pixels, COCO's `area` field) are dropped, and so are crowd regions
    unless `include_crowd`. Instances without a segmentation are skipped.
    """
    from pycocotools.coco import COCO

    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not annotation_file.is_file():
        raise DatasetError(f"COCO annotation file {annotation_file} does not exist")
    if not image_dir.is_dir():
        raise DatasetError(f"COCO image folder {image_dir} does not exist")
    api = COCO(str(annotation_file))
    name = name or annotation_file.stem
    refs = []
    for img_id in sorted(api.getImgIds()):
        info = api.loadImgs(img_id)[0]
        anns = api.loadAnns(api.getAnnIds(imgIds=[img_id]))
        for ann in sorted(anns, key=lambda a: a["id"]):
            if not ann.get("segmentation") or ann.get("area", 0.0) < min_area:
                continue
            if ann.get("iscrowd", 0) and not include_crowd:
                continue
            refs.append(
                SampleRef(
                    dataset=name,
                    sample_id=str(ann["id"]),
                    image_id=str(info["file_name"]),
                    image_path=str(image_dir / info["file_name"]),
                    mask_format=MASK_COCO,
                    segmentation=json.dumps(ann["segmentation"]),
                    size=(int(info["height"]), int(info["width"])),
                )
            )
    return refs


BENCHMARKS: dict[str, Callable[..., list[SampleRef]]] = {"grabcut": grabcut, "berkeley": berkeley, "davis": davis}


def detect_folder(path: str | Path, ignore_value: int | None = None) -> list[SampleRef]:
    """Read a dataset folder by its layout: GrabCut (data_GT/boundary_GT), DAVIS (img/gt), Berkeley by name
    (images/masks, GrabCut convention), any other images/masks folder as generic binary masks."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist")
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
