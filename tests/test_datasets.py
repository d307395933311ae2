"""Dataset readers on the real benchmarks in ../shared/data, a COCO file and a generic folder."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.datasets import (
    DatasetError,
    berkeley,
    coco,
    davis,
    detect_folder,
    grabcut,
    image_mask_folder,
    resolve,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.parametrize("name, reader, count", [("GrabCut", grabcut, 50), ("Berkeley", berkeley, 100), ("DAVIS", davis, 345)])
def test_benchmark_sample_counts_and_order(name, reader, count):
    refs = reader(DATA / name)
    assert len(refs) == count
    assert [Path(r.image_path).name for r in refs] == sorted(Path(r.image_path).name for r in refs)
    assert len({r.sample_id for r in refs}) == count
    assert resolve(name.lower(), DATA) == refs


def test_grabcut_masks_have_the_ignore_band_and_rgb_images():
    refs = grabcut(DATA / "GrabCut")
    ref = next(r for r in refs if r.sample_id == "124080")
    s = ref.load()
    raw = cv2.imread(ref.mask_path)[:, :, 0]
    assert s.gt.dtype == np.int8 and set(np.unique(s.gt)) <= {-1, 0, 1}
    assert np.array_equal(s.gt == -1, raw == 128) and np.array_equal(s.gt == 1, raw > 128)
    assert (s.gt == -1).any(), "GrabCut masks carry a 128 ignore band"
    bgr = cv2.imread(ref.image_path)
    assert s.image.dtype == np.uint8 and np.array_equal(s.image, bgr[:, :, ::-1])
    assert s.image_id == Path(ref.image_path).name


def test_berkeley_and_davis_conventions():
    b = next(r for r in berkeley(DATA / "Berkeley") if r.sample_id == "189011b").load()
    assert set(np.unique(b.gt)) == {0, 1} and b.image.shape[:2] == b.gt.shape
    d_ref = davis(DATA / "DAVIS")[0]
    d = d_ref.load()
    raw = cv2.imread(d_ref.mask_path).max(axis=2)
    assert np.array_equal(d.gt == 1, raw > 0) and not (d.gt == -1).any()
    assert d.image.shape == (480, 854, 3)


def test_detect_folder_recognises_the_ritm_layouts():
    assert detect_folder(DATA / "GrabCut")[0].mask_format == "ritm_grabcut"
    assert detect_folder(DATA / "DAVIS")[0].mask_format == "ritm_davis"
    assert detect_folder(DATA / "Berkeley")[0].mask_format == "ritm_grabcut"


def _write_image(path: Path, h: int = 40, w: int = 60) -> None:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_generic_folder_with_ignore_value(tmp_path):
    (tmp_path / "mine" / "images").mkdir(parents=True)
    (tmp_path / "mine" / "masks").mkdir()
    _write_image(tmp_path / "mine" / "images" / "b.png")
    _write_image(tmp_path / "mine" / "images" / "a.jpg")
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 10:30] = 1
    mask[25:30, :] = 255
    cv2.imwrite(str(tmp_path / "mine" / "masks" / "a.png"), mask)
    cv2.imwrite(str(tmp_path / "mine" / "masks" / "b.png"), mask)
    refs = detect_folder(tmp_path / "mine", ignore_value=255)
    assert [r.sample_id for r in refs] == ["a", "b"] and refs[0].dataset == "mine"
    gt = refs[0].load().gt
    assert (gt == 1).sum() == 200 and (gt == -1).sum() == 5 * 60
    plain = image_mask_folder(tmp_path / "mine" / "images", tmp_path / "mine" / "masks")[0].load().gt
    assert (plain == 1).sum() == 200 + 300 and not (plain == -1).any()


def test_missing_masks_and_unknown_layouts_are_reported(tmp_path):
    (tmp_path / "x" / "images").mkdir(parents=True)
    (tmp_path / "x" / "masks").mkdir()
    _write_image(tmp_path / "x" / "images" / "a.png")
    with pytest.raises(DatasetError, match="no mask"):
        detect_folder(tmp_path / "x")
    with pytest.raises(DatasetError, match="unknown layout"):
        detect_folder(tmp_path)
    with pytest.raises(DatasetError, match="neither"):
        resolve("NoSuchSet", tmp_path)


def _coco_file(tmp_path: Path) -> Path:
    (tmp_path / "imgs").mkdir()
    _write_image(tmp_path / "imgs" / "one.png")
    anns = [
        {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 200.0,
         "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]], "bbox": [10, 5, 20, 10]},
        {"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4.0,
         "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]], "bbox": [0, 0, 2, 2]},
        {"id": 9, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 120.0,
         "segmentation": {"size": [40, 60], "counts": [0 * 40 + 600, 120, 1680]}, "bbox": [0, 0, 60, 40]},
    ]
    doc = {"images": [{"id": 1, "file_name": "one.png", "height": 40, "width": 60}], "annotations": anns,
           "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_one_sample_per_instance_with_area_and_crowd_filters(tmp_path):
    ann = _coco_file(tmp_path)
    refs = coco(ann, tmp_path / "imgs")
    assert [r.sample_id for r in refs] == ["3", "7"]  # crowd dropped, sorted by id
    assert [r.sample_id for r in coco(ann, tmp_path / "imgs", min_area=10)] == ["7"]
    with_crowd = coco(ann, tmp_path / "imgs", include_crowd=True)
    assert [r.sample_id for r in with_crowd] == ["3", "7", "9"]
    s = refs[1].load()
    assert s.image_id == "one.png" and s.gt.shape == (40, 60)
    assert s.gt[10, 20] == 1 and s.gt[30, 50] == 0 and 150 < (s.gt == 1).sum() < 260
    crowd = with_crowd[2].load().gt  # uncompressed RLE, column-major: columns 15..17 fully set
    assert (crowd == 1).sum() == 120 and crowd[:, 15:18].all()
    with pytest.raises(DatasetError, match="coco-images"):
        resolve(str(ann), tmp_path)
