"""Image bytes -> RGB uint8 (H, W, 3), with one typed error that says why a file cannot be used.

The encode job must record every bad input (id, uri, reason) and go on, so decoding never raises
anything but `ImageDecodeError`, whose `reason` is a short fixed code (for grouping in summaries)
and whose `detail` is a human sentence. Pillow is used because it reports truncated files (OpenCV
silently returns a partly grey image) and reads the header before decoding, so the pixel limit is
enforced without allocating the image. The caller's `max_pixels` is the only pixel limit: Pillow's own
decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 89.5 M by default) is raised to it while a decode runs.

Only the formats the project lists as images (`FORMAT_EXTENSIONS`: JPEG, PNG, BMP, TIFF, WebP, GIF) are opened,
whatever else Pillow can read: the bytes may come from whoever made a task, and a plugin such as EPS (which runs
Ghostscript) must never see them; anything else is `not_an_image`. Running out of memory on one image is that
image's `too_large`, never the end of a batch.

Pixels are returned in the file's STORED grid: an EXIF orientation tag is not applied. `decode_image_oriented`
also returns the tag (1..8, pipeline/orientation.py), read from the same header, which the encoder records with
the features so that the Label Studio boundary can map to the grid a browser shows.
"""
from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections import Counter
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from interformer.preprocess import max_file_bytes  # noqa: F401 - the read cap, re-used by the readers here

from .orientation import IDENTITY, normalize_tag

# Reason codes carried by ImageDecodeError (and stored in the errors table).
EMPTY = "empty"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
TOO_LARGE = "too_large"
CORRUPT = "corrupt"
UNREADABLE = "unreadable"
ENCODE_FAILED = "encode_failed"  # decoded, but the encoder raised for this image (pipeline.encoding.EncoderStage)
REASONS = (EMPTY, NOT_AN_IMAGE, TRUNCATED, TOO_LARGE, CORRUPT, UNREADABLE, ENCODE_FAILED)

DEFAULT_MAX_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112

# Pillow's format id -> the file extensions the project lists as images (pipeline.sources.IMAGE_EXTENSIONS is
# made from it): the only formats decoded.
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "GIF": (".gif",),
}
IMAGE_FORMATS = tuple(FORMAT_EXTENSIONS)

class ImageDecodeError(ValueError):
    """An input file is not a usable image; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown decode error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray)
        return (type(self), (self.reason, self.detail))


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header only; raises ImageDecodeError for non-images."""
    with _open(data) as img:
        return img.height, img.width


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) from the header only, without decoding pixels; a missing, invalid or
    unreadable tag is 1, as browsers take it. Raises ImageDecodeError for non-images."""
    with _open(data) as img:
        return _orientation(img)


def _orientation(img: Image.Image) -> int:
    """The orientation tag of an opened image, read from what Pillow parsed with the header. A PNG's eXIf chunk
    after the image data is not read (getexif would decode the pixels to reach it; the PNG spec puts the chunk
    before the data)."""
    if img.format == "PNG" and "exif" not in img.info:
        return IDENTITY
    try:
        return normalize_tag(img.getexif().get(EXIF_ORIENTATION))
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no tag, as for a browser
        return IDENTITY


_pillow_lock = threading.Lock()
_active_limits: Counter = Counter()  # max_pixels of the decodes in progress (None: unlimited)
_pillow_saved: list = []  # Image.MAX_IMAGE_PIXELS as found when the first of them started


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None) -> Iterator[None]:
    """Keep Pillow's bomb check at or above `max_pixels` while a decode runs, so that only our limit applies.

    Image.MAX_IMAGE_PIXELS is one process-wide value: while decodes with different limits overlap (threads), it
    is the loosest of them (None when any is unlimited), each decode checks its own limit on the header size, and
    the value found before is put back when the last one ends."""
    with _pillow_lock:
        if not _active_limits:
            _pillow_saved[:] = [Image.MAX_IMAGE_PIXELS]
        _active_limits[max_pixels] += 1
        Image.MAX_IMAGE_PIXELS = _loosest(_active_limits)
    try:
        yield
    finally:
        with _pillow_lock:
            _active_limits[max_pixels] -= 1
            if not _active_limits[max_pixels]:
                del _active_limits[max_pixels]
            Image.MAX_IMAGE_PIXELS = _loosest(_active_limits) if _active_limits else _pillow_saved[0]


def _loosest(limits: Counter) -> int | None:
    return None if None in limits else max(limits)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, TIFF, BMP, WebP, GIF...) to an RGB uint8 (H, W, 3) array.

    Grey, palette, alpha and CMYK images become RGB (alpha is dropped); 16-bit images are scaled to
    8 bits; for multi-frame files the first frame is used. Images with more than `max_pixels` pixels
    are refused before their pixels are decoded.
    """
    return decode_image_oriented(data, max_pixels)[0]


def decode_image_oriented(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """`decode_image`, and the file's EXIF orientation tag (1..8, see `exif_orientation`) from the same header:
    the pixels stay in the stored grid; the tag says how a browser turns them."""
    with _pillow_limit(max_pixels):
        try:
            return _decode(data, max_pixels)
        except MemoryError:
            raise _out_of_memory(len(data)) from None


def _out_of_memory(size: int) -> ImageDecodeError:
    """The error for an image whose decoding ran out of memory: too large for this worker, not corrupt."""
    return ImageDecodeError(TOO_LARGE, f"decoding this {size}-byte file ran out of memory")


def _decode(data: bytes, max_pixels: int | None) -> tuple[np.ndarray, int]:
    with _open(data, max_pixels) as img:
        orientation = _orientation(img)
        w, h = img.size
        if w == 0 or h == 0:
            raise ImageDecodeError(CORRUPT, f"image header declares a size of {w}x{h}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(
                TOO_LARGE, f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels (--max-pixels)"
            )
        try:
            img.load()
        except MemoryError:
            raise
        except OSError as e:
            message = str(e)
            if "truncated" in message.lower():
                raise ImageDecodeError(TRUNCATED, f"{img.format} data ends early ({message})") from None
            raise ImageDecodeError(CORRUPT, f"{img.format} data cannot be decoded ({message})") from None
        except Exception as e:  # malformed files make codecs raise many types (struct.error, IndexError, ...)
            raise ImageDecodeError(
                CORRUPT, f"{img.format} data cannot be decoded ({type(e).__name__}: {e})"
            ) from None
        try:
            return _to_rgb(img), orientation
        except ImageDecodeError:
            raise
        except (ValueError, OSError, TypeError) as e:  # an odd mode Pillow cannot convert
            raise ImageDecodeError(CORRUPT, f"{img.format} {img.mode} pixels cannot be converted to RGB "
                                            f"({type(e).__name__}: {e})") from None


def _open(data: bytes, max_pixels: int | None = None) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(EMPTY, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's bomb check would only warn or raise at 2x its default.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(bytes(data)), formats=IMAGE_FORMATS)
    except MemoryError:
        raise _out_of_memory(len(data)) from None
    except UnidentifiedImageError:
        head = bytes(data[:12])
        kind = _sniff(head)
        if kind:
            raise ImageDecodeError(CORRUPT, f"starts like {kind} but cannot be parsed ({len(data)} bytes)") from None
        raise ImageDecodeError(
            NOT_AN_IMAGE, f"not an image in a format read here ({', '.join(IMAGE_FORMATS)}; {len(data)} bytes, "
                          f"starting {head[:8]!r})"
        ) from None
    except Image.DecompressionBombError as e:  # Pillow's own hard limit, 2x Image.MAX_IMAGE_PIXELS
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{size.group(1)} pixels" if size else "the image"
        limit = f"the limit of {max_pixels} pixels (--max-pixels)" if max_pixels else "the pixel limit"
        raise ImageDecodeError(TOO_LARGE, f"{pixels} is over {limit}") from None
    except Exception as e:  # a malformed header can make a codec plugin raise anything
        raise ImageDecodeError(CORRUPT, f"the image header cannot be read ({type(e).__name__}: {e})") from None


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)


def _sniff(head: bytes) -> str | None:
    """The image format a file's first bytes announce, if any."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        grey = grey_to_8bit(np.asarray(img), sixteen_bit=img.mode.startswith("I;16"))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if img.mode == "F":
        raise ImageDecodeError(CORRUPT, "floating-point images are not supported")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def grey_to_8bit(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16-bit (or 32-bit integer) grey -> uint8 in integer arithmetic: round(v * 255 / 65535) = (v + 128) // 257
    for v in 0..65535 (257 is odd, so there are no ties), clipped to 0..255; 32-bit images whose values all fit
    in 0..255 are taken as they are. At most 4 bytes per pixel beside the input, where float64 took 24."""
    top = 65535 if sixteen_bit or (arr.size and int(arr.max()) > 255) else 255
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        work = arr.astype(np.uint32)  # one 4-byte copy, native order (I;16B arrives big-endian)
    else:
        work = np.clip(arr, 0, top)  # one copy of the int32 image; clipped first, so + 128 cannot overflow
    if top == 65535:
        work += 128
        work //= 257
    return work.astype(np.uint8)
