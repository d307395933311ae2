"""Stored features whose image has changed since they were encoded.

The feature table keys rows by (image id, encoder), and a rerun of the encode job skips every id it already
holds. That is right unless the id now names other pixels: a file rewritten in place, or an id another file
has taken (two COCO files whose numeric ids overlap, a list file that points elsewhere). Each stored row keeps
the uri and the sha256 of the bytes it was encoded from; `changed_sources` compares them with the listing.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .feature_store import Origin
from .images import ImageDecodeError
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


def changed_sources(sources: Iterable[ImageSource], stored: Mapping[str, Origin], check_all: bool = False,
                    read: Callable[[str], bytes] = read_bytes) -> tuple[list[ChangedSource], int]:
    """(the listed sources whose bytes differ from their stored row's, how many were read).

    A source that cannot be read now is not judged: its row stays, as for any skipped image; nor is a row
    without a recorded sha256."""
    todo = sources_to_check(sources, stored, check_all)

    def digest(source: ImageSource) -> str | None:
        try:
            return hashlib.sha256(read(source.uri)).hexdigest()
        except (ImageDecodeError, OSError):
            return None

    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        digests = list(pool.map(digest, todo))
    changed = [ChangedSource(s.image_id, s.uri, stored[s.image_id].uri) for s, d in zip(todo, digests)
               if d is not None and stored[s.image_id].sha256 is not None and d != stored[s.image_id].sha256]
    return changed, len(todo)
