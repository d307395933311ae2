"""Per-region interactive session state, so that each new click costs one interact step.

Label Studio sends the whole click list of the region being drawn with every call. A serving actor
keeps, per (image id, task id, region key), the model session that produced the last answer and the clicks
it has seen (region ids are made by the browser, unique within a task at best: a task of another project
with the same image and region id must not continue this session, nor start from its mask on screen):

- the request repeats the known list          -> the stored result is returned ("cached");
- the request extends the known list          -> only the new clicks are added ("step");
- the request is the known list minus its tail -> the session steps back to its stored state ("undo");
- anything else (another annotator on the same region key, an actor that restarted and lost its
  state, a click moved or removed mid-list)   -> the session is rebuilt from the clicks ("replay").

Replay runs the same per-click sequence as stepping, from the session's start (blank, or the mask on screen
under the request's first positive click: onscreen.py), and undo returns states stepping stored. Whatever
else a session bakes in (a box prompt, the start's identity, the click engine that answers) is its `variant`:
a request with another variant gets a new session. So the mask never depends on the path taken
(tests/test_backend_sessions.py, tests/test_session_start.py, and tests/test_backend_history.py over random edit
sequences, check it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from interformer.clicks import Click

from .memory import ByteLRU, buffer_bytes

SessionFactory = Callable[[], Any]  # () -> a fresh InteractiveSession over the image's features


@dataclass
class _Entry:
    session: Any
    clicks: tuple[Click, ...]
    result: Any
    variant: Hashable  # what else shaped the session (e.g. a box prompt's region)


@dataclass(frozen=True)
class SessionOutcome:
    """The answer for a click list and how it was obtained."""

    result: Any  # the predictor's ClickResult for the last click
    path: str  # "cached", "step", "undo" or "replay"
    steps: int  # interact steps run for this request
    session: Any = None  # the session that answered (its `start` tells what it began from)


DEFAULT_MAX_BYTES = 512 * 1024 * 1024


class SessionStore:
    """LRU of interactive sessions keyed by (image id, ...) tuples, bounded in bytes.

    A session is measured with everything it holds: its per-click states (kept for undo) and the
    features of its image, so the store never holds more than `max_bytes` of array buffers, whatever
    the image sizes and click counts. A session larger than the whole budget answers its request and
    is not kept (the next request for that region replays).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._entries: ByteLRU[_Entry] = ByteLRU(max_bytes, buffer_bytes)

    @property
    def max_bytes(self) -> int:
        return self._entries.max_bytes

    @property
    def nbytes(self) -> int:
        return self._entries.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def drop(self, key: Hashable) -> None:
        self._entries.pop(key)

    def image_ids(self) -> set:
        """The image ids (first key element) that stored sessions hold features of."""
        return {k[0] for k in self._entries.keys() if isinstance(k, tuple) and k}

    def drop_image(self, image_id: str) -> None:
        """Forget every session of one image (e.g. after its features were re-encoded)."""
        for key in [k for k in self._entries.keys() if isinstance(k, tuple) and k and k[0] == image_id]:
            self._entries.pop(key)

    def run(self, key: Hashable, clicks: Sequence[Click], new_session: SessionFactory,
            variant: Hashable = None) -> SessionOutcome:
        """Answer `clicks` (at least one) for the region `key`, reusing the stored session when possible.

        `variant` names anything besides the clicks that `new_session` bakes into a session (a box
        prompt's region); a stored session made for another variant is never reused.
        """
        clicks = tuple(Click(int(c.row), int(c.col), bool(c.positive)) for c in clicks)
        if not clicks:
            raise ValueError("a session needs at least one click")
        entry = self._entries.get(key)
        if entry is not None and entry.variant != variant:
            self._entries.pop(key)
            entry = None
        try:
            if entry is not None:
                outcome = _reuse(entry, clicks)
                if outcome is not None:
                    self._entries.remeasure(key)
                    return dataclasses.replace(outcome, session=entry.session)
            session = entry.session if entry is not None else new_session()
            result = _replay(session, clicks)
        except BaseException:
            self._entries.pop(key)  # a half-updated session must not be reused
            raise
        self._entries.put(key, _Entry(session, clicks, result, variant))
        return SessionOutcome(result, "replay", len(clicks), session)


def _reuse(entry: _Entry, clicks: tuple[Click, ...]) -> SessionOutcome | None:
    """Serve `clicks` from a stored session when they repeat, extend or shorten its list; else None."""
    known = entry.clicks
    if clicks == known:
        return SessionOutcome(entry.result, "cached", 0)
    if len(clicks) > len(known) and clicks[: len(known)] == known:
        result = entry.result
        for c in clicks[len(known):]:
            result = entry.session.add_click(c.row, c.col, positive=c.positive)
        entry.clicks, entry.result = clicks, result
        return SessionOutcome(result, "step", len(clicks) - len(known))
    if len(clicks) < len(known) and known[: len(clicks)] == clicks:
        result = entry.result
        for _ in range(len(known) - len(clicks)):
            result = entry.session.undo()  # the session keeps every earlier state: no step needed
        entry.clicks, entry.result = clicks, result
        return SessionOutcome(result, "undo", 0)
    return None


def _replay(session: Any, clicks: tuple[Click, ...]) -> Any:
    """Rebuild `session` from `clicks` and return the result of the last click."""
    result = session.replay(list(clicks))
    if result is None:
        raise RuntimeError("session.replay returned no result for a non-empty click list")
    return result
