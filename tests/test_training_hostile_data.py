"""Hostile training data: every source kind gives a sample or a DataError naming the file and item, never another
exception, a crash, an int32 wrap-around or an image paired with another image's labels.

The property mutates valid source files (COCO / LVIS, panoptic, Label Studio) one JSON value at a time with
hostile values (huge and non-finite coordinates, strings for numbers, flat point lists, wrong RLE sizes...).
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter import brush
from pycocotools import mask as mask_utils

from interformer.training.augment import AugmentConfig
from interformer.training.data import DataError, DataSpec, MaskFolderSource, check_source
from interformer.training.stream import SampleStream

H, W = 24, 32
HUGE_POLYGON = [1e12, 1e12, -1e12, 5, 3, 1e15]
HOSTILE = [
    None, True, -1, 0, 2 ** 31, 2 ** 40, 1e12, -1e12, 1e300, math.nan, math.inf, -math.inf, "100px", "x", "", [], {},
    [1, 2], [[1e12, 1e12], [-1e12, 5], [3, 1e15]], [[HUGE_POLYGON]], [HUGE_POLYGON], [[1, math.nan, 5, 5, 9, 1]],
    [10, 10, 20, 10, 20, 20], [[10, 10, 20]], {"size": [H, W], "counts": "zzzzzzzz"},
    {"size": [H, W], "counts": [H * W * 1000]}, {"size": [H + 1, W], "counts": [(H + 1) * W]},
    {"size": [H, W], "counts": [-5, H * W + 5]}, {"size": "24x32", "counts": []}, [0, 0, 0, 1], [[255] * 8],
    [{"x": 1}], "/data/local-files/?d=nowhere.png", "a.png",
]


def write_image(path: Path, h: int = H, w: int = W) -> None:
    yy, xx = np.mgrid[0:h, 0:w]
    cv2.imwrite(str(path), np.stack([4 * yy, 3 * xx, 2 * (xx + yy)], axis=2).astype(np.uint8))


def square(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def coco_doc() -> dict:
    rle = mask_utils.encode(np.asfortranarray((np.arange(H * W).reshape(H, W) % 7 == 0).astype(np.uint8)))
    return {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W},
                       {"id": 2, "file_name": "b.png", "height": H, "width": W}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [square(2, 2, 12, 12)], "area": 100,
                 "iscrowd": 0},
                {"id": 11, "image_id": 2, "category_id": 1, "segmentation": [square(5, 3, 30, 20)], "area": 425,
                 "iscrowd": 0},
                {"id": 12, "image_id": 2, "category_id": 1, "iscrowd": 1, "area": 50,
                 "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
                {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 50,
                 "segmentation": {"size": [H, W], "counts": [100, 50, H * W - 150]}}]}


def panoptic_doc() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "annotations": [{"image_id": 1, "file_name": "pa.png", "segments_info": [{"id": 7}, {"id": 256}]},
                            {"image_id": 2, "file_name": "pb.png", "segments_info": [{"id": 7}]}]}


def labelstudio_doc() -> list:
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 4:20] = 255
    region = {"id": "r1", "type": "brushlabels", "original_width": W, "original_height": H,
              "value": {"format": "rle", "rle": brush.mask2rle(mask), "brushlabels": ["x"]}}
    poly = {"id": "r2", "type": "polygonlabels", "original_width": W, "original_height": H,
            "value": {"points": [[50, 50], [90, 50], [90, 90], [50, 90]], "polygonlabels": ["x"]}}
    return [{"id": 1, "data": {"image": "/data/local-files/?d=a.png"},
             "annotations": [{"updated_at": "2024", "result": [region, poly]}]},
            {"id": 2, "data": {"image": "b.png"}, "annotations": [{"result": [copy.deepcopy(poly)]}]}]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    for name in ("a.png", "b.png"):
        write_image(root / name)
    png = np.zeros((H, W, 3), np.uint8)
    png[0:6, :, 0] = 7
    png[10:20, 10:20, 1] = 1
    cv2.imwrite(str(root / "pa.png"), png[:, :, ::-1])
    cv2.imwrite(str(root / "pb.png"), png[:, :, ::-1])
    return root


DOCS = {"coco": coco_doc, "panoptic": panoptic_doc, "labelstudio": labelstudio_doc}


def spec_for(kind: str, ann: Path, root: Path) -> DataSpec:
    masks = f",masks={root}" if kind == "panoptic" else ""
    return DataSpec.parse(f"{kind}:{ann},images={root}{masks}")


def paths(node, prefix=()):
    """Every (key path) into a JSON document, containers included."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from paths(v, prefix + (k,))


def mutated(doc, path, value):
    doc = copy.deepcopy(doc)
    if not path:
        return None if value is DELETE else value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = None if value is DELETE else copy.deepcopy(value)
    return doc


DELETE = object()


def read_every_sample(spec: DataSpec) -> None:
    """Open, check and load every sample: each step gives a result or a DataError."""
    source = spec.open()
    check_source(source)
    for i in range(len(source)):
        img, seg = source.load(i, np.random.default_rng(i))
        assert img.shape[:2] == seg.shape and seg.dtype == np.int32


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(DOCS)), pick=st.integers(0, 10 ** 6),
       value=st.sampled_from(HOSTILE + [DELETE]), seed=st.integers(0, 3))
def test_a_mutated_source_gives_samples_or_a_data_error(files, tmp_path_factory, kind, pick, value, seed):
    doc = DOCS[kind]()
    all_paths = list(paths(doc))
    doc = mutated(doc, all_paths[pick % len(all_paths)], value)
    ann = tmp_path_factory.mktemp("ann") / "ann.json"
    ann.write_text(json.dumps(doc))
    t0 = time.monotonic()
    try:
        read_every_sample(spec_for(kind, ann, files))
    except DataError as e:
        assert str(e) and "Traceback" not in str(e)
    assert time.monotonic() - t0 < 5, "a hostile value must not make reading slow"


@pytest.mark.parametrize("kind", ["coco", "labelstudio"])
def test_huge_polygon_coordinates_are_clipped_quickly(files, tmp_path, kind):
    """1e12..1e15 coordinates: rasterised in bounded time (clipped to the frame), not a segfault or 24 s."""
    if kind == "coco":
        doc = coco_doc()
        doc["annotations"] = [dict(doc["annotations"][0], segmentation=[HUGE_POLYGON])]
    else:
        doc = labelstudio_doc()[:1]
        doc[0]["annotations"][0]["result"] = [{"type": "polygonlabels", "original_width": W, "original_height": H,
                                               "value": {"points": [[1e12, 1e12], [-1e12, 5], [3, 1e15]]}}]
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    t0 = time.monotonic()
    source = spec_for(kind, tmp_path / "ann.json", files).open()
    check_source(source)
    _, seg = source.load(0, np.random.default_rng(0))
    assert time.monotonic() - t0 < 2
    assert seg.shape == (H, W)


@pytest.mark.parametrize("kind, bad", [
    ("coco", [[1, math.nan, 5, 5, 9, 1]]), ("coco", [[1, 1, math.inf, 5, 9, 1]]),
    ("labelstudio", [[1, math.nan], [5, 5], [9, 1]]), ("labelstudio", [[1, 1], [math.inf, 5], [9, 1]]),
])
def test_non_finite_coordinates_are_a_data_error_naming_file_and_annotation(files, tmp_path, kind, bad):
    if kind == "coco":
        doc = coco_doc()
        doc["annotations"][0]["segmentation"] = bad
        where = "annotation 10"
    else:
        doc = labelstudio_doc()
        doc[0]["annotations"][0]["result"][1]["value"]["points"] = bad
        where = "task 1, result item 1"
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    source = spec_for(kind, tmp_path / "ann.json", files).open()
    with pytest.raises(DataError, match=f"ann.json.*{where}.*finite"):
        check_source(source)
    with pytest.raises(DataError, match=where):
        for s in range(4):
            source.load(0, np.random.default_rng(s))


@pytest.mark.parametrize("kind", ["coco", "panoptic"])
def test_duplicate_image_ids_are_refused_naming_both_files(files, tmp_path, kind):
    doc = DOCS[kind]()
    doc["images"][1]["id"] = 1
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"image id 1 is listed twice \('a.png' and 'b.png'\)"):
        spec_for(kind, tmp_path / "ann.json", files).open()


@pytest.mark.parametrize("side", ["image", "mask"])
def test_stem_collisions_are_refused_naming_both_files(tmp_path, side):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for n in (1, 2):
        write_image(tmp_path / "img" / (f"cat.{n}.jpg" if side == "image" else f"cat{n}.jpg"))
        cv2.imwrite(str(tmp_path / "gt" / (f"cat.{n}.png" if side == "mask" else f"cat{n}.png")),
                    np.full((H, W), 255 * (n - 1), np.uint8))
    folder = "img" if side == "image" else "gt"
    ext = "jpg" if side == "image" else "png"
    with pytest.raises(DataError, match=f"{side} files 'cat.1.{ext}' and 'cat.2.{ext}' in .*{folder} share the name "
                                        "'cat'"):
        MaskFolderSource(tmp_path / "img", tmp_path / "gt")


def test_check_source_reports_every_bad_sample_before_training(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for n in range(4):
        write_image(tmp_path / "img" / f"s{n}.jpg")
        cv2.imwrite(str(tmp_path / "gt" / f"s{n}.png"), np.full((H, W) if n < 2 else (H, W + 1), 255, np.uint8))
    (tmp_path / "img" / "s1.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"(?s)3 of 4 training samples cannot be used.*s1.jpg.*s2.jpg.*s3.jpg"):
        check_source(MaskFolderSource(tmp_path / "img", tmp_path / "gt"))


def test_an_image_without_object_is_skipped_with_a_count(tmp_path, capsys):
    """An empty mask is skipped at once ("has no object"), not retried 50 times and reported as crops."""
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    for n in range(3):
        write_image(tmp_path / "img" / f"s{n}.jpg")
        mask = np.zeros((H, W), np.uint8)
        if n == 1:
            mask[4:20, 4:28] = 255
        cv2.imwrite(str(tmp_path / "gt" / f"s{n}.png"), mask)
    source = MaskFolderSource(tmp_path / "img", tmp_path / "gt")
    stream = SampleStream(source, AugmentConfig(crop_size=32), seed=0)
    samples = [stream[n] for n in range(6)]
    assert all(int(y.max()) == 1 for _, y in samples)
    assert stream.skipped == {0, 2}
    out = capsys.readouterr().out
    assert "'s0.jpg': it has no object" in out and "2 image(s) skipped" in out
    again = SampleStream(source, AugmentConfig(crop_size=32), seed=0)
    assert all(np.array_equal(a[1], again[n][1]) for n, a in enumerate(samples))  # the same replacement draws
    (tmp_path / "gt" / "s1.png").unlink()
    cv2.imwrite(str(tmp_path / "gt" / "s1.png"), np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match="none of the 3 training images has an object"):
        SampleStream(MaskFolderSource(tmp_path / "img", tmp_path / "gt"), AugmentConfig(crop_size=32), seed=0)[0]


@pytest.fixture(scope="module")
def job():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_job_hostile", Path(__file__).resolve().parents[1] / "jobs/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["coco", "labelstudio"])
def test_the_job_refuses_bad_data_before_training_with_exit_2(job, files, tmp_path, capsys, kind):
    """A bad annotation in the last sample is found by the check before training (no checkpoint, no log), and
    reported as a user error: one line per problem, exit status 2, no traceback."""
    doc = DOCS[kind]()
    if kind == "coco":
        doc["images"][1]["height"] = "24"
    else:
        doc[1]["annotations"][0]["result"][0]["original_width"] = "100px"
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    argv = ["--local", "--out-dir", str(tmp_path / "run"), "--data", str(spec_for(kind, tmp_path / "ann.json", files)),
            "--max-iters", "2", "--batch-size", "1", "--crop-size", "32", "--loader-workers", "0"]
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 2 training samples cannot be used") and "Traceback" not in err
    assert ("'height' must be a positive integer, got '24'" if kind == "coco" else "'100px'") in err
    assert not (tmp_path / "run" / "log.csv").exists() and not (tmp_path / "run" / "checkpoints").exists()
