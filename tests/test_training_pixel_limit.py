"""Training reads images and masks under the encoder's pixel limit: a file whose header declares more pixels is a
DataError at the start-up check (before any worker decodes it), for every source kind, and a file holding more
bytes than an image under the limit can take is refused before it is read whole."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from interformer.training.data import MAX_PIXELS, DataError, DataSpec, check_source, read_mask, read_rgb

BIG_H, BIG_W = 7100, 7100  # 50.4 M pixels, just over the 50 M limit; a blank PNG of it is a few tens of KB
assert BIG_H * BIG_W > MAX_PIXELS


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big")
    blank = np.zeros((BIG_H, BIG_W), np.uint8)
    blank[10:20, 10:20] = 1
    cv2.imwrite(str(root / "big.png"), blank)
    cv2.imwrite(str(root / "pbig.png"), blank)
    return root


def write_specs(root: Path) -> dict[str, str]:
    (root / "masks").mkdir(exist_ok=True)
    (root / "imgs").mkdir(exist_ok=True)
    for sub in ("masks", "imgs"):
        link = root / sub / "big.png"
        if not link.exists():
            link.symlink_to(root / "big.png")
    coco = {"images": [{"id": 1, "file_name": "big.png", "height": BIG_H, "width": BIG_W}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 100,
                             "segmentation": [[10, 10, 20, 10, 20, 20, 10, 20]]}]}
    panoptic = {"images": [{"id": 1, "file_name": "big.png"}],
                "annotations": [{"image_id": 1, "file_name": "pbig.png", "segments_info": [{"id": 1}]}]}
    ls = [{"id": 1, "data": {"image": "big.png"}, "annotations": [{"result": [
        {"id": "r", "type": "polygonlabels", "original_width": BIG_W, "original_height": BIG_H,
         "value": {"points": [[1, 1], [2, 1], [2, 2]], "polygonlabels": ["x"]}}]}]}]
    for name, doc in (("coco.json", coco), ("panoptic.json", panoptic), ("ls.json", ls)):
        (root / name).write_text(json.dumps(doc))
    return {"coco": f"coco:{root / 'coco.json'},images={root}",
            "panoptic": f"panoptic:{root / 'panoptic.json'},images={root},masks={root}",
            "labelstudio": f"labelstudio:{root / 'ls.json'},images={root}",
            "folder": f"folder:{root / 'imgs'},masks={root / 'masks'}"}


@pytest.mark.parametrize("kind", ["coco", "panoptic", "labelstudio", "folder"])
def test_an_image_over_the_pixel_limit_is_refused_before_decoding(big, kind):
    source = DataSpec.parse(write_specs(big)[kind]).open()
    with pytest.raises(DataError, match="over the limit of"):
        check_source(source)
    with pytest.raises(DataError, match="over the limit of"):
        source.load(0, np.random.default_rng(0))


def test_read_mask_and_read_rgb_refuse_over_the_limit(big):
    with pytest.raises(DataError, match="over the limit of"):
        read_mask(big / "big.png", "binary")
    with pytest.raises(DataError, match="over the limit of"):
        read_rgb(big / "big.png")
    assert read_mask(big / "big.png", "binary", max_pixels=None).sum() == 100


def test_a_file_with_more_bytes_than_its_pixels_can_take_is_refused(tmp_path):
    path = tmp_path / "padded.png"
    cv2.imwrite(str(path), np.full((4, 4, 3), 9, np.uint8))
    with open(path, "r+b") as f:  # a valid small PNG followed by 65 MiB (sparse) of trailing bytes
        f.truncate(path.stat().st_size + 65 * 1024 * 1024)
    assert read_rgb(path, max_pixels=None).shape == (4, 4, 3)
    with pytest.raises(DataError, match="more than .* bytes"):
        read_rgb(path, max_pixels=16)
