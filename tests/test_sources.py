"""Listing inputs (folder, glob, list file, COCO, URIs) and decoding image bytes with typed errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
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
    lst.write_bytes(f"# my images\nx.png\n\n  # indented comment\na/y.JPG\r\n{tree / 'a' / 'b' / 'z.png'}\n"
                    f"{elsewhere}\nmissing.png\n".encode())
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


# --- hostile inputs: special files, huge files, unlistable folders, odd names ---------------------


def _in_thread(fn, seconds: float = 10.0):
    """fn() in a daemon thread: (finished, result or raised error). A call blocked for good (the old open() of a
    FIFO) leaves the test failing, not hanging."""
    out: list = []

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    return (not worker.is_alive()), (out[0] if out else None)


@pytest.fixture()
def specials(tree: Path, monkeypatch) -> dict[str, Path]:
    """A FIFO, a UNIX socket, a character device (a link to /dev/null) and a link to the FIFO, each named
    like an image, beside the regular images of `tree`; a FIFO named like a text file too."""
    os.mkfifo(tree / "pipe.png")
    os.mkfifo(tree / "notes.fifo.txt")
    monkeypatch.chdir(tree)  # AF_UNIX paths are short: bind a relative name
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.png")
    (tree / "null.jpg").symlink_to("/dev/null")
    (tree / "a" / "to_pipe.png").symlink_to(tree / "pipe.png")
    yield {"pipe.png": tree / "pipe.png", "sock.png": tree / "sock.png", "null.jpg": tree / "null.jpg",
           "a/to_pipe.png": tree / "a" / "to_pipe.png"}
    sock.close()


def test_a_special_file_is_unreadable_at_once_and_never_blocks(specials: dict[str, Path]):
    """Opening a FIFO for reading blocks until a writer comes, and a device can be endless: each is refused from
    its stat as that one image's `unreadable`, by path and by file:// URI."""
    kinds = {"pipe.png": "FIFO", "sock.png": "socket", "null.jpg": "character device", "a/to_pipe.png": "FIFO"}
    for name, path in specials.items():
        for uri in (str(path), path.as_uri()):
            finished, result = _in_thread(lambda uri=uri: read_bytes(uri))
            assert finished, f"reading {uri} blocked"
            assert isinstance(result, ImageDecodeError) and result.reason == UNREADABLE, result
            assert f"it is a {kinds[name]}" in result.detail and "not a regular file" in result.detail


def test_every_listing_reports_special_files_named_like_images_without_opening_them(tree: Path,
                                                                                      specials: dict[str, Path]):
    """Folder and glob listings find a special file's type in its directory entry: it is an `unusable`
    (unreadable) input, the regular images are listed as before, a FIFO not named like an image is ignored."""
    expected = {"a/to_pipe.png", "null.jpg", "pipe.png", "sock.png"}
    for spec, unusable in ((str(tree), expected),
                           (str(tree / "**" / "*.*g"), expected),
                           (str(tree / "*.png"), {"pipe.png", "sock.png"})):
        finished, listing = _in_thread(lambda spec=spec: list_images(spec))
        assert finished and not isinstance(listing, BaseException), listing
        assert {u[0] for u in listing.unusable} == unusable, spec
        assert all(u[2] == UNREADABLE and "not a regular file" in u[3] for u in listing.unusable)
        assert not {s.image_id for s in listing.sources} & expected
    assert "notes.fifo.txt" in list_images(str(tree)).ignored


def test_a_file_over_the_byte_cap_is_too_large_unread_and_its_batch_goes_on(tmp_path: Path):
    """An image file with more bytes than the pixel limit can need (a huge sparse file: /dev/zero behind a
    regular name) is refused from its size before a byte is read; the decode stage records it and decodes the
    other image of its batch. The cap follows --max-pixels."""
    import pyarrow as pa

    from interformer.config import PreprocessConfig
    from pipeline.encoding import decode_stage
    from pipeline.images import max_file_bytes

    assert max_file_bytes(None) is None
    assert max_file_bytes(60_000) == 60_000 * 16 + 64 * 1024 * 1024
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(3 * 1024**3)  # 3 GiB of holes: nothing on disk
    ok = tmp_path / "ok.png"
    ok.write_bytes(_encode(_rgb(), "PNG"))
    with pytest.raises(ImageDecodeError) as info:
        read_bytes(str(huge), max_bytes=10_000)
    assert info.value.reason == TOO_LARGE and str(3 * 1024**3) in info.value.detail
    assert "--max-pixels" in info.value.detail
    small = tmp_path / "small.png"
    small.write_bytes(b"x" * 10_001)
    with pytest.raises(ImageDecodeError, match="too_large"):
        read_bytes(small.as_uri(), max_bytes=10_000)
    assert read_bytes(str(small), max_bytes=10_001) == b"x" * 10_001

    batch = pa.table({"image_id": ["huge.png", "ok.png"], "uri": [str(huge), str(ok)]})
    finished, out = _in_thread(lambda: decode_stage(batch, PreprocessConfig(max_pixels=60_000)), seconds=60)
    assert finished and not isinstance(out, BaseException), out
    rows = {r["image_id"]: r for r in out.to_pylist()}
    assert rows["huge.png"]["reason"] == TOO_LARGE and rows["ok.png"]["reason"] is None
    assert rows["ok.png"]["pixels"]


def test_a_read_capped_at_a_limit_never_allocates_the_limit(tmp_path: Path):
    """The cap is an upper bound, not a buffer size: under an address-space limit a few hundred MB above what
    the process holds, a small file reads with a cap of 1.6 GB (as --max-pixels 100000000 gives), and an image
    whose decoding runs out of memory is that image's `too_large` while the other image of its batch decodes."""
    script = f"""
import io, json, resource, struct, sys, zlib
import numpy as np, pyarrow as pa
from PIL import Image
from interformer.config import PreprocessConfig
from pipeline.encoding import decode_stage

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
z = zlib.compressobj(1)
body = b"".join(z.compress(b"\\0" * (1 + 3 * 10000)) for _ in range(8000)) + z.flush()
header = struct.pack(">IIBBBBB", 10000, 8000, 8, 2, 0, 0, 0)  # 80 Mpixels of zeros, 1 MB compressed
open({str(tmp_path / 'big.png')!r}, "wb").write(b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header)
                                                 + chunk(b"IDAT", body) + chunk(b"IEND", b""))
buf = io.BytesIO()
Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, "PNG")
open({str(tmp_path / 'ok.png')!r}, "wb").write(buf.getvalue())
batch = pa.table({{"image_id": ["big.png", "ok.png"],
                  "uri": [{str(tmp_path / 'big.png')!r}, {str(tmp_path / 'ok.png')!r}]}})
cfg = PreprocessConfig(max_pixels=100_000_000)
decode_stage(batch.slice(1), cfg)  # everything imported and warmed before the limit
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))
rows = decode_stage(batch, cfg).select(["image_id", "reason", "detail"]).to_pylist()
print(json.dumps(rows))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["image_id"]: r for r in json.loads(run.stdout.strip().splitlines()[-1])}
    assert rows["ok.png"]["reason"] is None, rows
    assert rows["big.png"]["reason"] == TOO_LARGE and "ran out of memory" in rows["big.png"]["detail"], rows


def unlistable_folder(parent: Path) -> str:
    """A folder under `parent` that cannot be listed, made as root can (permissions do not stop root): folders
    nested until its absolute path is longer than PATH_MAX, so that scandir fails with ENAMETOOLONG. Returns its
    path relative to `parent`; an image lies inside it."""
    name = "d" * 250
    fd = os.open(parent, os.O_RDONLY)
    rel = []
    try:
        while len(str(parent)) + sum(len(p) + 1 for p in rel) <= 4200:
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, rel = inner, rel + [name]
        image = os.open("lost.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(image, _encode(_rgb(), "PNG"))
        os.close(image)
    finally:
        os.close(fd)
    return "/".join(rel)


def test_a_folder_that_cannot_be_listed_is_an_unreadable_input_not_silently_missing(tree: Path):
    """Before, os.walk's error for a subfolder was dropped whenever anything else was listed: its images were
    neither encoded nor reported, and --strict passed. Now the folder is one `unusable` input, so it reaches the
    summary, the errors table and --strict; a glob reports it only where its matches could lie."""
    deep = "a/" + unlistable_folder(tree / "a")
    for spec in (str(tree), str(tree / "**" / "*.png"), str(tree / "a" / "*") + "/**"):
        listing = list_images(spec)
        assert len(listing.unusable) == 1, (spec, listing.unusable)
        image_id, uri, reason, detail = listing.unusable[0]
        assert reason == UNREADABLE and "cannot list folder" in detail and "not listed" in detail
        assert f"{tree}/{deep}".startswith(uri) and uri.endswith("/" + image_id)
        assert len(uri) >= 4096 and len(uri) - 251 < 4096  # the first folder on the way past PATH_MAX
    assert [s.image_id for s in list_images(str(tree)).sources] == ["a/b/z.png", "a/y.JPG", "x.png"]
    assert list_images(str(tree / "a" / "*.JPG")).unusable == []  # the glob cannot reach into it


_NAME = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0\n"), min_size=1,
                max_size=8).filter(lambda t: not t.startswith(".") and not t.lstrip().startswith("#") and t != "*")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stems=st.lists(_NAME, min_size=1, max_size=5, unique=True))
@example(stems=[" a", "a", "b\x85c", "d\u2028e", "f\u2029g", "h\x0bi", "j\x0ck", "l\x1cm\x1dn\x1eo", " p \r q"])
@example(stems=["trailing ", "\ttab", "x\r", "\u00a0nbsp"])
def test_folder_glob_and_list_modes_list_the_same_names(tmp_path_factory, stems: list[str]):
    """Every file named like an image is listed under its own name in all three modes: a list file ends lines at
    '\\n' only (and drops one '\\r' before it), so spaces, U+0085, U+2028, form feeds... stay part of a name."""
    root = tmp_path_factory.mktemp("names")
    names = [stem + ".png" for stem in stems]
    for name in names:
        (root / name).write_bytes(b"")
    (root / "list.txt").write_text("# the images\n" + "".join(n + "\n" for n in names[:-1]) + names[-1] + "\r\n",
                                   encoding="utf-8", newline="")
    expected = sorted(names)
    for spec in (str(root), str(root / "*.png"), str(root / "list.txt")):
        listing = list_images(spec)
        assert [s.image_id for s in listing.sources] == expected, spec
        assert [s.uri for s in listing.sources] == [str(root / n) for n in expected], spec
        assert not listing.duplicates and not listing.unusable


def test_a_path_with_glob_characters_that_exists_is_listed_as_itself(tmp_path: Path):
    """'set[1]/' or 'what?/' names a folder: list it, not the glob it also spells (which matched nothing).
    A spec that exists nowhere is still a glob."""
    png = _encode(_rgb(), "PNG")
    for folder in ("set[1]", "what?", "a*b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(png)
        assert [s.image_id for s in list_images(str(tmp_path / folder)).sources] == ["x.png"], folder
    (tmp_path / "set1").mkdir()
    (tmp_path / "set1" / "y.png").write_bytes(png)
    # inside a glob, '[1]' is a pattern ('set1'); '[[]' spells a literal '['
    assert [s.image_id for s in list_images(str(tmp_path / "set[1]" / "*.png")).sources] == ["set1/y.png"]
    assert [s.image_id for s in list_images(str(tmp_path / "set[[]1]" / "*.png")).sources] == ["set[1]/x.png"]
    assert [s.image_id for s in list_images(str(tmp_path / "set[0-9]")).sources] == []  # a glob matching a folder
    (tmp_path / "shot[2].png").write_bytes(png)
    assert [s.image_id for s in list_images(str(tmp_path / "shot[2].png")).sources] == ["shot[2].png"]
