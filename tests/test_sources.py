"""Listing inputs (folder, glob, list file, COCO, URIs) and decoding image bytes with typed errors."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (
    CORRUPT,
    EMPTY,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TRUNCATED,
    UNREADABLE,
    ImageDecodeError,
    decode_image,
    image_size,
)
from pipeline.sources import ImageSource, SourceError, list_images, read_bytes

ROOT = Path(__file__).resolve().parents[1]


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- decoding -------------------------------------------------------------------------------------


def test_png_decodes_exactly():
    img = _rgb()
    out = decode_image(_encode(img, "PNG"))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, img)


def test_jpeg_and_sample_files_decode_to_rgb():
    out = decode_image(_encode(_rgb(), "JPEG", quality=95))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    for path in sorted((ROOT / "samples").glob("*.*")):
        if path.suffix in (".jpg", ".png"):
            arr = decode_image(path.read_bytes())
            assert arr.ndim == 3 and arr.shape[2] == 3 and arr.flags.c_contiguous


def test_grey_alpha_palette_and_16bit_become_rgb():
    grey = np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) % 256
    out = decode_image(_encode(grey.astype(np.uint8), "PNG"))
    assert out.shape == (40, 60, 3) and np.array_equal(out[..., 0], out[..., 2])
    rgba = np.dstack([_rgb(), np.full((40, 60), 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(rgba, "PNG")), rgba[..., :3])
    pal = Image.fromarray(_rgb()).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert decode_image(buf.getvalue()).shape == (40, 60, 3)
    deep = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(deep).save(buf, "PNG")
    out = decode_image(buf.getvalue())
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(deep / 257.0).astype(np.uint8))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", EMPTY),
        (b"this is a text file, not a png\n", NOT_AN_IMAGE),
        (_encode(_rgb(200, 300), "JPEG")[:2000], TRUNCATED),
        (_encode(_rgb(200, 300), "PNG")[:5000], TRUNCATED),
        (_encode(_rgb(), "PNG")[:30], CORRUPT),
    ],
    ids=["zero-size", "text", "truncated-jpeg", "truncated-png", "header-only"],
)
def test_bad_bytes_raise_typed_errors(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason + ": ") and info.value.detail


def test_pixel_limit_is_checked_from_the_header():
    data = _encode(_rgb(100, 80), "PNG")
    assert image_size(data) == (100, 80)
    assert decode_image(data, max_pixels=8000).shape == (100, 80, 3)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=7999)
    assert info.value.reason == TOO_LARGE and "8000 pixels" in info.value.detail


def test_decode_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageDecodeError(TRUNCATED, "ends early")))
    assert isinstance(err, ImageDecodeError) and err.reason == TRUNCATED and err.detail == "ends early"
    with pytest.raises(ValueError):
        ImageDecodeError("no-such-reason", "x")


# --- listing --------------------------------------------------------------------------------------


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    png = _encode(_rgb(), "PNG")
    for rel in ("x.png", "a/y.JPG", "a/b/z.png", ".hidden/h.png", "a/.dot.png"):
        (root / rel).write_bytes(png)
    (root / "notes.txt").write_text("hello")
    (root / "a" / "label.json").write_text("{}")
    return root


def test_folder_is_listed_recursively_with_relative_ids(tree: Path):
    listing = list_images(str(tree))
    assert [s.image_id for s in listing.sources] == ["a/b/z.png", "a/y.JPG", "x.png"]
    assert all(Path(s.uri).is_file() and Path(s.uri).is_absolute() for s in listing.sources)
    assert listing.ignored == ["a/label.json", "notes.txt"]
    assert listing.duplicates == []


def test_glob_patterns(tree: Path):
    ids = lambda pattern: [s.image_id for s in list_images(pattern).sources]  # noqa: E731
    assert ids(str(tree / "**" / "*.png")) == ["a/b/z.png", "x.png"]
    assert ids(str(tree / "*.png")) == ["x.png"]
    assert ids(str(tree / "a" / "*")) == ["y.JPG"]
    assert ids(str(tree / "a" / "**")) == ["b/z.png", "y.JPG"]
    assert ids(str(tree / "*.txt")) == ["notes.txt"]  # an explicit extension keeps any match


def test_list_file_with_relative_absolute_and_comment_lines(tree: Path, tmp_path: Path):
    elsewhere = tmp_path / "other.png"
    elsewhere.write_bytes(_encode(_rgb(), "PNG"))
    lst = tree / "list.txt"
    lst.write_text(f"# my images\nx.png\n\n  a/y.JPG  \n{tree / 'a' / 'b' / 'z.png'}\n{elsewhere}\nmissing.png\n")
    listing = list_images(str(lst))
    by_id = {s.image_id: s.uri for s in listing.sources}
    assert set(by_id) == {"x.png", "a/y.JPG", "a/b/z.png", str(elsewhere), "missing.png"}
    assert by_id["x.png"] == str(tree / "x.png")
    assert by_id["missing.png"] == str(tree / "missing.png")  # listed; the job records it as unreadable
    rooted = list_images(str(lst), image_root=str(tree / "a"))
    assert {s.image_id for s in rooted.sources} >= {"y.JPG", "b/z.png", "x.png"}


def test_coco_file_ids_by_file_name_or_numeric_id(tree: Path, tmp_path: Path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 7, "file_name": "x.png"}, {"id": 3, "file_name": "a/y.JPG"}],
                               "annotations": []}))
    by_name = list_images(str(ann), image_root=str(tree))
    assert by_name.sources == [ImageSource("a/y.JPG", str(tree / "a" / "y.JPG")), ImageSource("x.png", str(tree / "x.png"))]
    by_id = list_images(str(ann), image_root=str(tree), coco_id="id")
    assert [(s.image_id, Path(s.uri).name) for s in by_id.sources] == [("3", "y.JPG"), ("7", "x.png")]
    with pytest.raises(SourceError, match="--image-root"):
        list_images(str(ann))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": []}))
    with pytest.raises(SourceError, match="no 'images' list"):
        list_images(str(bad), image_root=str(tree))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SourceError, match="too deeply"):
        list_images(str(deep), image_root=str(tree))


def test_duplicate_ids_keep_the_first_and_are_reported(tree: Path, tmp_path: Path):
    other = tmp_path / "elsewhere" / "x.png"
    other.parent.mkdir()
    other.write_bytes(b"")
    lst = tree / "dups.txt"
    lst.write_text(f"x.png\nx.png\n{other}\n")
    listing = list_images(str(lst), image_root=str(tmp_path / "elsewhere"))
    assert [s.image_id for s in listing.sources] == ["x.png"]
    assert len(listing.duplicates) == 1 and listing.duplicates[0][1].uri == str(other)


def test_single_file_missing_input_and_file_uris(tree: Path):
    assert list_images(str(tree / "x.png")).sources == [ImageSource("x.png", str(tree / "x.png"))]
    with pytest.raises(SourceError, match="does not exist"):
        list_images(str(tree / "nope"))
    uri_listing = list_images(tree.as_uri())
    assert [s.image_id for s in uri_listing.sources] == ["a/b/z.png", "a/y.JPG", "x.png"]
    assert uri_listing.sources[0].uri == tree.as_uri() + "/a/b/z.png"
    assert read_bytes(uri_listing.sources[0].uri) == (tree / "a" / "b" / "z.png").read_bytes()


def test_unreadable_paths_raise_typed_errors(tree: Path):
    for uri in (str(tree / "missing.png"), (tree / "missing.png").as_uri(), str(tree / "a")):
        with pytest.raises(ImageDecodeError) as info:
            read_bytes(uri)
        assert info.value.reason == UNREADABLE


def test_folder_and_list_modes_agree_on_paths_that_cannot_be_read(tree: Path, tmp_path: Path):
    """One rule for both modes: every path named like an image is an input; a dangling link or a folder named
    like an image is listed (never dropped silently) and is then unreadable, in a folder as in a list file."""
    (tree / "gone.png").symlink_to(tree / "deleted.png")
    (tree / "album.jpg").mkdir()
    (tree / "album.jpg" / "inner.png").write_bytes((tree / "x.png").read_bytes())
    (tree / "linked").symlink_to(tree / "a")  # a link to a folder is listed, not followed
    folder = list_images(str(tree))
    expected = ["a/b/z.png", "a/y.JPG", "album.jpg", "album.jpg/inner.png", "gone.png", "x.png"]
    assert [s.image_id for s in folder.sources] == expected
    assert folder.ignored == ["a/label.json", "notes.txt"]
    list_file = tmp_path / "inputs.txt"
    list_file.write_text("\n".join(str(tree / i) for i in expected) + "\n")
    listed = list_images(str(list_file), image_root=str(tree))
    assert listed.sources == folder.sources
    for source in folder.sources:
        if source.image_id in ("gone.png", "album.jpg"):
            with pytest.raises(ImageDecodeError) as info:
                read_bytes(source.uri)
            assert info.value.reason == UNREADABLE
        else:
            assert read_bytes(source.uri)


def test_an_image_over_pillows_own_limit_is_refused_naming_max_pixels():
    """Pillow refuses a header over twice its MAX_IMAGE_PIXELS before our check runs: the message still names
    the job's --max-pixels limit and the image's size, not Pillow's internals."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 400 Mpixels, RGB, no pixel data
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png, max_pixels=50_000_000)
    assert info.value.reason == TOO_LARGE
    assert info.value.detail == "400000000 pixels is over the limit of 50000000 pixels (--max-pixels)"
