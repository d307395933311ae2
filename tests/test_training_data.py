"""Training data sources (COCO / LVIS / panoptic / Label Studio / folders) and the deterministic sample stream."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter import brush

from interformer.training.augment import IGNORE_SEGMENT, AugmentConfig
from interformer.training.data import (CocoInstancesSource, CocoPanopticSource, ConcatSource, DataError, DataSpec,
                                       LabelStudioSource, MaskFolderSource, paint_with_overlap_rule,
                                       resolve_labelstudio_image)
from interformer.training.stream import SampleStream


def write_image(path, h=40, w=60):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([4 * yy, 3 * xx, 2 * (xx + yy)], axis=2).astype(np.uint8)  # smooth: survives JPEG
    cv2.imwrite(str(path), img[:, :, ::-1])
    return img


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_overlap_rule_drops_near_duplicates():
    a = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True
    dup = a.copy()
    small_inside = np.zeros((10, 10), bool)
    small_inside[0:2, 0:2] = True  # 100 % of its own area overlaps a
    other = np.zeros((10, 10), bool)
    other[5:9, 5:9] = True
    seg = paint_with_overlap_rule((10, 10), [a, dup, small_inside, np.zeros((10, 10), bool), other])
    assert sorted(np.unique(seg).tolist()) == [0, 1, 2]
    assert (seg[a] == 1).all() and (seg[other] == 2).all()


def test_coco_instances_and_lvis_style(tmp_path):
    img = write_image(tmp_path / "000000000001.jpg")
    ann = {
        "images": [{"id": 1, "height": 40, "width": 60, "coco_url": "http://x/train2017/000000000001.jpg"}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square(5, 5, 25, 25), "area": 400,
             "bbox": [5, 5, 20, 20], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": square(30, 10, 55, 35), "area": 625,
             "bbox": [30, 10, 25, 25], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "segmentation": square(6, 6, 24, 24), "area": 324,
             "bbox": [6, 6, 18, 18], "iscrowd": 0},
        ],
    }
    (tmp_path / "lvis.json").write_text(json.dumps(ann))
    src = DataSpec.parse(f"lvis:{tmp_path / 'lvis.json'},images={tmp_path}").open()
    assert isinstance(src, CocoInstancesSource) and len(src) == 1 and src.key(0) == "000000000001.jpg"
    loaded, seg = src.load(0, np.random.default_rng(0))
    assert np.array_equal(loaded, img) or np.abs(loaded.astype(int) - img).mean() < 3  # JPEG
    # the near-duplicate (id 3) never survives next to id 1, whatever the order
    for s in range(6):
        _, seg = src.load(0, np.random.default_rng(s))
        assert len(np.unique(seg)) == 3
        assert 15 * 15 < (seg == seg[15, 15]).sum() <= 21 * 21 and seg[15, 15] > 0


def test_panoptic(tmp_path):
    write_image(tmp_path / "a.jpg")
    png = np.zeros((40, 60, 3), np.uint8)
    png[0:10, :, 0] = 7  # id 7 = R
    png[20:30, 10:20, 1] = 1  # id 256 = G * 256
    cv2.imwrite(str(tmp_path / "a.png"), png[:, :, ::-1])
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}],
           "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 7}, {"id": 256}]}]}
    (tmp_path / "pan.json").write_text(json.dumps(ann))
    src = CocoPanopticSource(tmp_path / "pan.json", tmp_path, tmp_path)
    _, seg = src.load(0, np.random.default_rng(0))
    assert (seg[0:10] == 1).all() and (seg[20:30, 10:20] == 2).all() and seg[35, 50] == 0


def test_label_studio_export(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_image(tmp_path / "imgs" / "cat.png")
    mask = np.zeros((40, 60), np.uint8)
    mask[5:15, 5:25] = 255
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=imgs/cat.png", "image_id": "cat.png"},
         "annotations": [
             {"was_cancelled": False, "updated_at": "2024-01-01", "result": [
                 {"type": "brushlabels", "original_width": 60, "original_height": 40,
                  "value": {"format": "rle", "rle": brush.mask2rle(mask), "brushlabels": ["cat"]}},
                 {"type": "polygonlabels", "original_width": 60, "original_height": 40,
                  "value": {"points": [[50, 50], [90, 50], [90, 90], [50, 90]], "polygonlabels": ["cat"]}},
             ]},
             {"was_cancelled": False, "updated_at": "2023-01-01", "result": []},
         ]},
        {"id": 2, "data": {"image": "/data/local-files/?d=imgs/none.png"}, "annotations": []},
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    src = LabelStudioSource(tmp_path / "export.json", tmp_path)
    assert len(src) == 1 and src.key(0) == "cat.png"
    _, seg = src.load(0, np.random.default_rng(0))
    assert np.unique(seg).tolist() == [0, 1, 2]
    brush_id = seg[10, 10]
    assert (seg == brush_id).sum() == 200
    poly_id = seg[30, 45]
    assert poly_id not in (0, brush_id) and seg[38, 58] == 0


def test_label_studio_size_mismatch_is_reported(tmp_path):
    write_image(tmp_path / "cat.png")
    tasks = [{"data": {"image": "cat.png"}, "annotations": [{"result": [
        {"type": "polygonlabels", "original_width": 100, "original_height": 40,
         "value": {"points": [[10, 10], [50, 10], [50, 50]]}}]}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    with pytest.raises(DataError, match="100x40"):
        LabelStudioSource(tmp_path / "export.json", tmp_path).load(0, np.random.default_rng(0))


def test_resolve_labelstudio_image(tmp_path):
    (tmp_path / "upload" / "3").mkdir(parents=True)
    f = tmp_path / "upload" / "3" / "abc-x.jpg"
    f.write_bytes(b"")
    assert resolve_labelstudio_image("/data/upload/3/abc-x.jpg", tmp_path) == f
    assert resolve_labelstudio_image("http://host:8080/elsewhere/abc-x.jpg", tmp_path / "upload" / "3") == f
    with pytest.raises(DataError, match="not found locally"):
        resolve_labelstudio_image("https://example.com/missing.jpg", tmp_path)


def test_folder_source_on_davis(shared_dir):
    src = MaskFolderSource(shared_dir / "data/DAVIS/img", shared_dir / "data/DAVIS/gt", "binary")
    assert len(src) == 345
    img, seg = src.load(0, np.random.default_rng(0))
    assert img.shape[:2] == seg.shape and set(np.unique(seg)) == {0, 1}


def test_instances_masks_with_ignore(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    write_image(tmp_path / "i" / "x.jpg")
    m = np.zeros((40, 60), np.uint8)
    m[0:10] = 3
    m[10:20] = 255
    cv2.imwrite(str(tmp_path / "m" / "x.png"), m)
    _, seg = MaskFolderSource(tmp_path / "i", tmp_path / "m", "instances").load(0, np.random.default_rng(0))
    assert (seg[0:10] == 3).all() and (seg[10:20] == IGNORE_SEGMENT).all() and (seg[20:] == 0).all()


def test_data_spec_parsing():
    s = DataSpec.parse("folder:imgs,masks=gt,format=instances")
    assert (s.kind, s.path, s.masks, s.format) == ("folder", "imgs", "gt", "instances")
    assert DataSpec.parse(str(s)) == s
    with pytest.raises(ValueError, match="must start with"):
        DataSpec.parse("voc:x")
    with pytest.raises(ValueError, match="needs masks="):
        DataSpec.parse("panoptic:a.json,images=d")
    with pytest.raises(ValueError, match="unknown option"):
        DataSpec.parse("coco:a.json,images=d,colour=red")


def test_sample_stream_is_deterministic_and_sharded(shared_dir):
    src = MaskFolderSource(shared_dir / "data/DAVIS/img", shared_dir / "data/DAVIS/gt")
    cfg = AugmentConfig(crop_size=64)
    a = SampleStream(src, cfg, seed=5)
    b = SampleStream(src, cfg, seed=5)
    x1, y1 = a[3]
    x2, y2 = b[3]
    assert x1.shape == (3, 64, 64) and y1.shape == (64, 64)
    assert np.array_equal(x1.numpy(), x2.numpy()) and np.array_equal(y1.numpy(), y2.numpy())
    r0 = SampleStream(src, cfg, seed=5, rank=0, world_size=2)
    r1 = SampleStream(src, cfg, seed=5, rank=1, world_size=2)
    first_epoch = [r0.source_index(n) for n in range(172)] + [r1.source_index(n) for n in range(172)]
    assert len(set(first_epoch)) == 344  # disjoint shards covering the epoch


def test_concat_source(shared_dir):
    davis = MaskFolderSource(shared_dir / "data/DAVIS/img", shared_dir / "data/DAVIS/gt")
    both = ConcatSource([davis, davis])
    assert len(both) == 690 and both.key(345) == davis.key(0)
    with pytest.raises(IndexError):
        both.key(690)
