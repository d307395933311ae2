"""Reading evaluation datasets safely: any file name, the stored pixel grid, malformed COCO files and
sample ids that two files would share are all either read correctly or refused with a DatasetError."""
from __future__ import annotations

import copy
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.datasets import DatasetError, coco, detect_folder, resolve
from pipeline.evaluation_run import DatasetSelection, collect_samples

H, W = 24, 36


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _mask() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[4:12, 6:20] = 1
    return m


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _folder(root: Path, names: dict[bytes, bytes], sub: str) -> None:
    """Write files by raw byte names (any name the file system takes, UTF-8 or not)."""
    folder = os.fsencode(root / sub)
    os.makedirs(folder, exist_ok=True)
    for name, data in names.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


_stems = st.binary(min_size=1, max_size=10).filter(lambda b: b"/" not in b and b"\0" not in b and b"." not in b)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stem=_stems)
def test_any_file_name_the_folder_lists_is_read(tmp_path_factory, stem):
    """File names are bytes on disk: one that is not UTF-8 (b'bad\\xffname') reaches Python as surrogate
    escapes, which OpenCV's imread crashed on (segfault). Every name is read, with the right pixels."""
    root = tmp_path_factory.mktemp("names") / "ds"
    image = _image()
    _folder(root, {stem + b".png": _png(image[:, :, ::-1])}, "images")
    _folder(root, {stem + b".png": _png(_mask())}, "masks")
    (ref,) = detect_folder(root)
    sample = ref.load()
    assert os.fsencode(ref.sample_id) == stem
    np.testing.assert_array_equal(sample.image, image)
    np.testing.assert_array_equal(sample.gt, _mask().astype(np.int8))


def _jpeg_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_ignored_like_the_encoder_and_training(tmp_path, orientation):
    """Masks refer to the stored pixel grid (as pipeline/images.py and training read images): an EXIF
    rotation must neither turn the image against its mask nor make the sizes differ."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = (230, 40, 40)  # left half red, right half dark: any rotation or flip shows
    data = _jpeg_with_orientation(rgb, orientation)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation
    _folder(tmp_path / "ds", {b"cup.jpg": data}, "images")
    _folder(tmp_path / "ds", {b"cup.png": _png(_mask())}, "masks")
    sample = detect_folder(tmp_path / "ds")[0].load()
    assert sample.image.shape == (H, W, 3) and sample.gt.shape == (H, W)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # PIL does not apply EXIF by itself
    assert np.abs(sample.image.astype(int) - stored.astype(int)).mean() < 3


@pytest.mark.parametrize("files, folder", [
    ({"images": ["cat.1.png", "cat.2.png"], "masks": ["cat.png"]}, "images"),
    ({"images": ["cat.png"], "masks": ["cat.png", "cat.jpg"]}, "masks"),
])
def test_two_files_with_one_sample_id_are_named(tmp_path, files, folder):
    """RITM's sample id is the text before the first '.': two files with one id are refused, both named,
    instead of one sample hiding the other (or a 'two datasets share a name' message)."""
    for sub, names in files.items():
        _folder(tmp_path / "ds", {n.encode(): _png(_mask()) for n in names}, sub)
    with pytest.raises(DatasetError, match=f"{folder[:-1]} files .* and .* share the name 'cat'"):
        detect_folder(tmp_path / "ds")


def _tiny_folder(root: Path) -> Path:
    _folder(root, {b"a.png": _png(_image())}, "images")
    _folder(root, {b"a.png": _png(_mask())}, "masks")
    return root


def test_datasets_with_one_name_are_named_by_location(tmp_path):
    a, b = _tiny_folder(tmp_path / "A" / "ds"), _tiny_folder(tmp_path / "B" / "ds")
    with pytest.raises(DatasetError, match="both named 'ds'"):
        collect_samples(DatasetSelection([str(a), str(b)]))
    with pytest.raises(DatasetError, match="give each dataset once"):
        collect_samples(DatasetSelection([str(a), str(a)]))


# ---- COCO annotation files ------------------------------------------------------------------------------

def _valid_coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "one.png", "height": H, "width": W},
                   {"id": 2, "file_name": "two.png", "height": H, "width": W}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 80.0,
             "segmentation": [[6, 4, 20, 4, 20, 12, 6, 12]]},
            {"id": 8, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 30.0,
             "segmentation": {"size": [H, W], "counts": [100, 30, H * W - 130]}},
            {"id": 9, "image_id": 2, "category_id": 1, "iscrowd": 0, "area": 40.0,
             "segmentation": {"size": [H, W], "counts": "o15c00d;1[D0000000U8"}},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }


@pytest.fixture(scope="module")
def coco_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("coco") / "imgs"
    folder.mkdir()
    (folder / "one.png").write_bytes(_png(_image(1)))
    (folder / "two.png").write_bytes(_png(_image(2)))
    return folder


def test_the_valid_coco_file_reads_every_kind_of_segmentation(tmp_path, coco_images):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_valid_coco()))
    refs = coco(path, coco_images, include_crowd=True)
    assert [r.sample_id for r in refs] == ["7", "8", "9"]
    masks = [r.load().gt for r in refs]
    assert (masks[0] == 1).sum() == 14 * 8 and (masks[1] == 1).sum() == 30 and (masks[2] == 1).sum() == 40
    from pycocotools import mask as mask_utils  # the compressed string decodes as pycocotools decodes it

    expected = mask_utils.decode({"size": [H, W], "counts": b"o15c00d;1[D0000000U8"})
    np.testing.assert_array_equal(masks[2], expected.astype(np.int8))


_BAD_VALUES = [None, True, -1, 0, 1, 2.5, 10_000, 1e12, -1e300, float("nan"), float("inf"), "", "x", [], [1, 2], [[1, 2]],
               [[0, 0, 1e12, 0, 1e12, 1e12]],
               {}, {"counts": "x"}, {"size": [H, W], "counts": [5]}, {"size": [H, W], "counts": "0"}]


def _paths(node, prefix=()):
    """Every (container, key) path of a JSON tree, the root's children first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _mutate(doc: dict, data) -> object:
    """One of: replace a value anywhere, delete a key or item, duplicate a list item, replace the document."""
    kind = data.draw(st.sampled_from(["replace", "delete", "duplicate", "document"]))
    if kind == "document":
        return data.draw(st.sampled_from([[1, 2], "text", None, 3, {}, {"images": {}}]))
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(list(_paths(doc))))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if kind == "replace":
        parent[key] = data.draw(st.sampled_from(_BAD_VALUES))
    elif kind == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    return doc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), min_area=st.sampled_from([0.0, 50.0]), crowd=st.booleans())
def test_a_damaged_coco_file_is_read_or_refused_by_entry_never_crashes(tmp_path_factory, coco_images, data,
                                                                       min_area, crowd):
    """Whatever one edit does to a valid file, reading it gives samples that load, or a DatasetError: never
    a JSONDecodeError / KeyError / TypeError traceback, a sample that fails in a worker, or a crash."""
    doc = _mutate(_valid_coco(), data)
    path = tmp_path_factory.mktemp("mut") / "ann.json"
    path.write_text(json.dumps(doc))
    try:
        refs = coco(path, coco_images, min_area=min_area, include_crowd=crowd)
    except DatasetError as e:
        assert "ann.json" in str(e)
        return
    assert len({r.sample_id for r in refs}) == len(refs)
    for r in refs:
        try:
            sample = r.load()
        except DatasetError as e:
            assert "image size" in str(e) or "cannot read" in str(e), e  # the file disagrees with the image
            continue
        assert sample.gt.shape == sample.image.shape[:2] and set(np.unique(sample.gt)) <= {0, 1}


def test_a_broken_json_file_names_the_file(tmp_path, coco_images):
    for text in ("{not json", "[" * 100_000, "\udcff"):
        path = tmp_path / "bad.json"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(DatasetError, match="bad.json"):
            resolve(str(path), coco_images=coco_images)
