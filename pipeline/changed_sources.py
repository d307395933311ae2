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

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from interformer.config import ViTConfig
from interformer.modeling.interformer import stale_reason

from .feature_store import Origin, RowProvenance
from .images import ImageDecodeError, exif_orientation
from .sources import ImageSource, read_bytes

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
                  read: Callable[[str], bytes] = read_bytes) -> ContentCheck:
    """Read the sources `sources_to_check` names, compare their sha256 with the stored row's, and take the
    orientation tag from the header of those unchanged whose row has none.

    A source that cannot be read now is not judged: its row stays, as for any skipped image; nor is a row
    without a recorded sha256."""
    todo = sources_to_check(sources, stored, check_all)

    def inspect(source: ImageSource) -> tuple[str | None, int | None]:
        origin = stored[source.image_id]
        try:
            data = read(source.uri)
        except (ImageDecodeError, OSError):
            return None, None
        digest = hashlib.sha256(data).hexdigest()
        tag = None
        if origin.exif_orientation is None and origin.sha256 == digest:
            try:
                tag = exif_orientation(data)
            except ImageDecodeError:
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


def row_stale_reason(row: RowProvenance, vit: ViTConfig, precision: str) -> str | None:
    """Why a stored row differs from what an encoder of `vit` at `precision` computes now: an older feature
    version at a geometry a later version changed, or another precision. A row of unknown precision (stored
    before it was recorded) is not judged on it; an unknown version is version 1."""
    reason = stale_reason(row.feature_version, row.padded_size, vit)
    if reason is not None:
        return reason
    if row.precision is not None and row.precision != precision:
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
