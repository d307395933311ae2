"""Stored features whose image has changed since they were encoded.

The feature table keys rows by (image id, encoder), and a rerun of the encode job skips every id it already
holds. That is right unless the id now names other pixels: a file rewritten in place, or an id another file
has taken (two COCO files whose numeric ids overlap, a list file that points elsewhere). Each stored row keeps
the uri and the sha256 of the bytes it was encoded from; `changed_sources` compares them with the listing.

A row can also be stale with the same bytes: computed by an older version of the encoder code that gives other
features at its geometry, or at another precision than this run's. Each row records its feature version, engine
and precision (not part of the fingerprint); `stale_rows` finds those.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from interformer.config import PreprocessConfig, ViTConfig
from interformer.modeling.interformer import stale_reason

from .encoding import check_encode_memory
from .feature_store import Origin, RowProvenance
from .images import ImageDecodeError, decode_image_oriented, exif_orientation, max_file_bytes
from .sources import ImageSource, read_bytes, sha256_of

READ_THREADS = 8  # hashing is I/O-bound; hashlib releases the GIL on large buffers


@dataclass(frozen=True)
class ChangedSource:
    """A listed image whose bytes differ from those its stored features were computed from."""

    image_id: str
    uri: str
    stored_uri: str | None


def sources_to_check(sources: Iterable[ImageSource], stored: Mapping[str, Origin], check_all: bool) -> list[ImageSource]:
    """The stored sources whose bytes must be read: those listed under another uri than the one they were
    encoded from (cheap to find, and where a reused id shows), or every stored one with `check_all`."""
    return [s for s in sources if s.image_id in stored and (check_all or stored[s.image_id].uri != s.uri)]


@dataclass(frozen=True)
class ContentCheck:
    """What reading the stored sources showed: the changed ones, how many were read, and the EXIF orientation tag
    of unchanged sources whose row was stored before the tag was recorded (image id -> tag)."""

    changed: list[ChangedSource]
    read: int
    orientations: dict[str, int]


def check_content(sources: Iterable[ImageSource], stored: Mapping[str, Origin], check_all: bool = False,
                  read: Callable[[str], bytes] = read_bytes,
                  digest_of: Callable[[str], str] = sha256_of) -> ContentCheck:
    """Hash the sources `sources_to_check` names (streamed: memory bounded whatever a file's size), compare
    with the stored row's sha256, and take the orientation tag from the header of those unchanged whose row
    has none (read with `read`).

    A source that cannot be read now (e.g. a special file) is not judged: its row stays, as for any skipped
    image; nor is a row without a recorded sha256."""
    todo = sources_to_check(sources, stored, check_all)

    def inspect(source: ImageSource) -> tuple[str | None, int | None]:
        origin = stored[source.image_id]
        try:
            digest = digest_of(source.uri)
        except (ImageDecodeError, OSError):
            return None, None
        tag = None
        if origin.exif_orientation is None and origin.sha256 == digest:
            try:
                tag = exif_orientation(read(source.uri))
            except (ImageDecodeError, OSError):
                tag = None
        return digest, tag

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        found = list(pool.map(inspect, todo))
    changed = [ChangedSource(s.image_id, s.uri, stored[s.image_id].uri) for s, (d, _) in zip(todo, found)
               if d is not None and stored[s.image_id].sha256 is not None and d != stored[s.image_id].sha256]
    orientations = {s.image_id: t for s, (_, t) in zip(todo, found) if t is not None}
    return ContentCheck(changed, len(todo), orientations)


def changed_sources(sources: Iterable[ImageSource], stored: Mapping[str, Origin], check_all: bool = False,
                    read: Callable[[str], bytes] = read_bytes) -> tuple[list[ChangedSource], int]:
    """(the listed sources whose bytes differ from their stored row's, how many were read): `check_content`."""
    result = check_content(sources, stored, check_all, read)
    return result.changed, result.read


@dataclass(frozen=True)
class StaleRow:
    """A listed image whose stored row this run would compute differently, and why."""

    image_id: str
    uri: str
    reason: str


def precision_stale(requested: str, recorded: str | None) -> bool:
    """Whether a row recorded at `recorded` precision is stale for a run asking for `requested`: only a bf16 row
    (the lossy one) when fp32 is asked for. Judged on the request, never on what the driver would resolve: every
    engine and device computes fp32 when asked, while what bf16 resolves to depends on each actor's hardware, so
    a driver-side guess would flag rows the actors write again identically, on every run. A bf16 run takes fp32
    rows (more exact) and rows of unknown precision as they are."""
    return requested == "fp32" and recorded == "bf16"


def row_stale_reason(row: RowProvenance, vit: ViTConfig, precision: str) -> str | None:
    """Why a stored row differs from what an encoder of `vit` asked for `precision` computes now: an older
    feature version at a geometry a later version changed, or a bf16 row for an fp32 run (`precision_stale`);
    an unknown version is version 1."""
    reason = stale_reason(row.feature_version, row.padded_size, vit)
    if reason is not None:
        return reason
    if precision_stale(precision, row.precision):
        return f"encoded at {row.precision} precision, this run encodes at {precision}"
    return None


def stale_rows(sources: Iterable[ImageSource], stored: Mapping[str, RowProvenance], vit: ViTConfig,
               precision: str) -> list[StaleRow]:
    """The listed images whose stored row is stale (`row_stale_reason`), in listing order."""
    found = []
    for source in sources:
        row = stored.get(source.image_id)
        reason = None if row is None else row_stale_reason(row, vit, precision)
        if reason is not None:
            found.append(StaleRow(source.image_id, source.uri, reason))
    return found


def capped_read(preprocess: PreprocessConfig) -> Callable[[str], bytes]:
    """`read_bytes` under the byte cap of the run's --max-pixels, as the decode stage reads: a file larger than
    any image the run could encode is never read whole into the driver's memory."""
    cap = max_file_bytes(preprocess.max_pixels)
    return lambda uri: read_bytes(uri, max_bytes=cap)


def reencode_problem(source: ImageSource, preprocess: PreprocessConfig, vit: ViTConfig,
                     read: Callable[[str], bytes] | None = None) -> str | None:
    """Why this run could not encode `source` again now ("reason: detail"), or None: its bytes are read and
    decoded under the run's --max-pixels and checked against --max-encode-memory, as the decode stage does. A
    stored row is removed for re-encoding only when this passes, so that features are never lost to an image
    the run would refuse."""
    try:
        image, _ = decode_image_oriented((read or capped_read(preprocess))(source.uri),
                                         max_pixels=preprocess.max_pixels)
        check_encode_memory(image.shape[:2], preprocess, vit)
    except ImageDecodeError as e:
        return f"{e.reason}: {e.detail}"
    return None


def plan_replacements(candidates: list[ImageSource], replace: set[str], limit: int | None,
                      problems: Callable[[list[ImageSource]], list[str | None]]) -> tuple[list[ImageSource], dict[str, str]]:
    """Which of the images to encode (`candidates`, in listing order: those without a row and those in `replace`,
    whose stored row would be replaced) this run takes: (the pending images, within `limit`; the ids in `replace`
    whose row stays, with why). A row to replace is checked with `problems` (one answer per source, e.g.
    `reencode_problem`) only once it falls within the limit, and stays when the check fails or it falls beyond
    the limit; images without a row are taken as they come."""
    kept: dict[str, str] = {}
    checked: set[str] = set()
    while True:
        window = [s for s in candidates if s.image_id not in kept][:limit]
        todo = [s for s in window if s.image_id in replace and s.image_id not in checked]
        if not todo:
            break
        for source, problem in zip(todo, problems(todo)):
            checked.add(source.image_id)
            if problem is not None:
                kept[source.image_id] = problem
    taken = {s.image_id for s in window}
    for source in candidates:
        if source.image_id in replace and source.image_id not in taken and source.image_id not in kept:
            kept[source.image_id] = f"beyond --limit {limit}"
    return window, kept


def reencode_problems(sources: list[ImageSource], preprocess: PreprocessConfig, vit: ViTConfig,
                      read: Callable[[str], bytes] | None = None) -> list[str | None]:
    """`reencode_problem` of each source, read and decoded on a few threads (Pillow and I/O release the GIL)."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        return list(pool.map(lambda s: reencode_problem(s, preprocess, vit, read), sources))
