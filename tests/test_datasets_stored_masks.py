"""Generic images/ + masks/ folders: evaluation reads a mask as stored, exactly as training's `read_mask` does
(palette indices, 16-bit values, maximum over colour channels), so one folder has one ground truth; images are
decoded by the encoder's decoder; and a file over the encoder's pixel limit is refused from its header."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from interformer.training.data import read_mask
from pipeline.datasets import DatasetError, image_mask_folder, read_rgb
from pipeline.images import decode_image

H, W = 6, 7
ENCODINGS = ("P", "L", "I;16", "RGB", "RGBA")


def _mask_image(values: np.ndarray, mode: str, seed: int) -> Image.Image:
    """A mask file's image in `mode` whose stored values are `values` (H, W); colour modes spread each value over
    random channels, so 'non-zero' must be looked for in every channel."""
    if mode == "P":
        im = Image.fromarray(values.astype(np.uint8)).convert("P")
        rng = np.random.default_rng(seed)
        im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())  # index 1 may be colour (0, 0, 0)
        return im
    if mode == "L":
        return Image.fromarray(values.astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray(values.astype(np.uint16))  # mode I;16
    rng = np.random.default_rng(seed)
    chans = np.zeros((H, W, len(mode)), np.uint8)
    pick = rng.integers(0, 3, size=(H, W))
    for c in range(3):
        chans[:, :, c] = np.where(pick == c, values, rng.integers(0, 1, size=(H, W)) * values)
    if mode == "RGBA":
        chans[:, :, 3] = rng.integers(0, 256, size=(H, W))  # alpha is not a value
    return Image.fromarray(chans)  # RGB or RGBA


def _folder(root: Path, mask: Image.Image) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.full((H, W, 3), 40, np.uint8)).save(root / "images" / "s.png")
    mask.save(root / "masks" / "s.png")
    return root


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(ENCODINGS), data=st.data(), seed=st.integers(0, 2**31 - 1),
       ignore=st.sampled_from([None, 255, 3, 1000]))
def test_evaluation_and_training_read_one_ground_truth_from_any_mask_encoding(tmp_path_factory, mode, data, seed,
                                                                                ignore):
    top = 65535 if mode == "I;16" else 255
    pool = st.sampled_from([0, 1, 2, 3, 128, 200, 255, 256, 1000, top]) if mode == "I;16" else \
        st.sampled_from([0, 1, 2, 3, 128, 255])
    values = np.array(data.draw(st.lists(pool, min_size=H * W, max_size=H * W)), dtype=np.int64).reshape(H, W)
    values[0, 0] = 1  # an object pixel in every sample
    root = _folder(tmp_path_factory.mktemp("ds"), _mask_image(values, mode, seed))
    gt = image_mask_folder(root / "images", root / "masks", ignore_value=ignore)[0].load().gt

    training = read_mask(root / "masks" / "s.png", "binary")
    assert np.array_equal(gt != 0, training == 1)  # object/background: training's reader, pixel for pixel
    if mode in ("P", "L", "I;16"):
        assert np.array_equal(gt == 1, (values > 0) & (values != (ignore if ignore is not None else -1)))
    if ignore is not None and mode != "RGBA":  # the ignore value matches the stored value (index, 16-bit, max)
        assert np.array_equal(gt == -1, values == ignore)


def test_a_voc_palette_mask_keeps_both_objects_and_its_border_is_the_ignore_value(tmp_path):
    """The audit's case: indices 1 and 2 (dark red, dark green) are objects, 255 (a light colour) is VOC's border,
    which used to be read through OpenCV's blue channel as the only object."""
    idx = np.zeros((H, W), np.uint8)
    idx[1:3, 1:3], idx[4, 1:4], idx[5, :] = 1, 2, 255
    im = Image.fromarray(idx).convert("P")
    pal = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 252 + [224, 224, 192]
    im.putpalette(pal)
    root = _folder(tmp_path / "voc", im)
    gt = image_mask_folder(root / "images", root / "masks", ignore_value=255)[0].load().gt
    assert (gt == 1).sum() == 7 and (gt == -1).sum() == W and np.array_equal(gt == -1, idx == 255)


def test_a_16_bit_grey_image_gives_the_encoders_pixels(tmp_path):
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)  # 16-bit grey
    assert np.array_equal(read_rgb(path), decode_image(path.read_bytes()))


@pytest.mark.parametrize("big", ["image", "mask"])
def test_an_image_or_mask_over_the_pixel_limit_is_refused_from_its_header(tmp_path, big):
    root = _folder(tmp_path / "ds", Image.fromarray(np.eye(H, W, dtype=np.uint8), "L"))
    folder = root / ("images" if big == "image" else "masks")
    Image.new("1", (9000, 6000)).save(folder / "s.png")  # 54 Mpx, a few KB: the encoder's default refuses it
    ref = image_mask_folder(root / "images", root / "masks")[0]
    with pytest.raises(DatasetError, match=rf"ds/s: {big} file .*s\.png is 9000x6000 = 54000000 pixels, over the "
                                           r"limit of 50000000"):
        ref.load()
    with pytest.raises(DatasetError, match=r"over the limit of 100 pixels"):
        ref.load(max_pixels=100)


@pytest.mark.parametrize("what", ["image", "mask"])
def test_a_file_that_is_not_an_image_is_a_dataset_error_naming_it(tmp_path, what):
    root = _folder(tmp_path / "ds", Image.fromarray(np.eye(H, W, dtype=np.uint8), "L"))
    (root / ("images" if what == "image" else "masks") / "s.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=rf"cannot read {what} file .*s\.png: not_an_image"):
        image_mask_folder(root / "images", root / "masks")[0].load()


def test_training_reader_accepts_the_bytes_evaluation_passes(tmp_path):
    """`read_mask` is given the bytes already read under the cap: a file object works like a path."""
    buf = io.BytesIO()
    Image.fromarray(np.eye(H, W, dtype=np.uint8), "L").save(buf, format="PNG")
    assert np.array_equal(read_mask(io.BytesIO(buf.getvalue()), "binary"), np.eye(H, W, dtype=np.int32))
