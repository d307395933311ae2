"""Training augmentation: shapes, label values, ignore handling, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from interformer.config import PIXEL_MEAN, PIXEL_STD
from interformer.training.augment import (IGNORE_LABEL, IGNORE_SEGMENT, AugmentConfig, NoObjectError, augment,
                                          pad_to, photometric_distortion, random_crop, random_resize, sample_object)


def scene(h: int = 90, w: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    seg = np.zeros((h, w), dtype=np.int32)
    seg[10:50, 10:60] = 1
    seg[40:80, 70:110] = 2
    seg[0:5, :] = IGNORE_SEGMENT
    return img, seg


@pytest.mark.parametrize("seed", range(12))
def test_augment_shapes_and_label_values(seed):
    img, seg = scene()
    x, y = augment(img, seg, AugmentConfig(crop_size=64), np.random.default_rng(seed))
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert y.shape == (64, 64) and y.dtype == np.uint8
    assert set(np.unique(y)) <= {0, 1, IGNORE_LABEL}
    assert (y == 1).any()


def test_identity_geometry_keeps_one_object_and_the_ignore_region():
    img, seg = scene(64, 64)
    seg[40:60, 30:60] = 2
    cfg = AugmentConfig(crop_size=64, ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    objects = set()
    for s in range(20):
        x, y = augment(img, seg, cfg, np.random.default_rng(s))
        assert np.array_equal(y == IGNORE_LABEL, seg == IGNORE_SEGMENT)
        chosen = [k for k in (1, 2) if np.array_equal(y == 1, seg == k)]
        assert len(chosen) == 1
        objects.add(chosen[0])
        expected = (img.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
        assert np.allclose(x.transpose(1, 2, 0), expected, atol=1e-5)
    assert objects == {1, 2}


def test_small_images_are_padded_black_with_background_labels():
    img = np.full((20, 30, 3), 200, dtype=np.uint8)
    seg = np.ones((20, 30), dtype=np.int32)
    cfg = AugmentConfig(crop_size=64, ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    x, y = augment(img, seg, cfg, np.random.default_rng(0))
    assert (y[:20, :30] == 1).all() and (y[20:] == 0).all() and (y[:, 30:] == 0).all()
    black = -np.array(PIXEL_MEAN, np.float32) / np.array(PIXEL_STD, np.float32)
    assert np.allclose(x[:, 40, 40], black)


def test_resize_flip_pad_crop_pieces():
    img, seg = scene(10, 20)
    big_img, big_seg = random_resize(img, seg, (2.0, 2.0), np.random.default_rng(0))
    assert big_img.shape == (20, 40, 3) and big_seg.shape == (20, 40)
    assert set(np.unique(big_seg)) <= set(np.unique(seg))  # nearest: no new segment values
    p_img, p_seg = pad_to(img, seg, 32)
    assert p_img.shape == (32, 32, 3) and (p_seg[10:] == 0).all()
    c_img, c_seg = random_crop(*pad_to(*scene(), 64), 64, np.random.default_rng(1))
    assert c_img.shape == (64, 64, 3) and c_seg.shape == (64, 64)


def test_crop_avoids_single_segment_windows():
    seg = np.zeros((200, 200), dtype=np.int32)
    seg[:, 100:] = 1
    img = np.zeros((200, 200, 3), dtype=np.uint8)

    def balanced_share(ratio: float) -> float:
        ok = 0
        for s in range(100):
            _, c = random_crop(img, seg, 64, np.random.default_rng(s), cat_max_ratio=ratio, tries=10)
            values, counts = np.unique(c, return_counts=True)
            ok += len(values) == 2 and counts.max() / counts.sum() < 0.75
        return ok / 100

    # one window in four is balanced; ten tries make that about 94 %
    assert balanced_share(1.0) < 0.4
    assert balanced_share(0.75) > 0.8


def test_photometric_distortion_is_deterministic_and_bounded():
    img, _ = scene()
    a = photometric_distortion(img, AugmentConfig(), np.random.default_rng(3))
    b = photometric_distortion(img, AugmentConfig(), np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    changed = [not np.array_equal(photometric_distortion(img, AugmentConfig(), np.random.default_rng(s)), img)
               for s in range(10)]
    assert sum(changed) >= 8


def test_no_object_raises():
    seg = np.full((8, 8), IGNORE_SEGMENT, dtype=np.int32)
    seg[0, 0] = 0
    with pytest.raises(NoObjectError):
        sample_object(seg, np.random.default_rng(0))


def test_mismatched_sizes_are_rejected():
    with pytest.raises(ValueError, match="differ"):
        augment(np.zeros((10, 10, 3), np.uint8), np.zeros((9, 10), np.int32), AugmentConfig(crop_size=32),
                np.random.default_rng(0))
