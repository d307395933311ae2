"""Per-region interactive session state, so that each new click costs one interact step.

Label Studio sends the whole click list of the region being drawn with every call. A serving actor
keeps, per (image id, region key), the model session that produced the last answer and the clicks
it has seen:

- the request repeats the known list          -> the stored result is returned ("cached");
- the request extends the known list          -> only the new clicks are added ("step");
- the request is the known list minus its tail -> the session steps back to its stored state ("undo");
- anything else (another annotator on the same region key, an actor that restarted and lost its
  state, a click moved or removed mid-list)   -> the session is rebuilt from the clicks ("replay").

Replay runs the same per-click sequence as stepping, from the session's start (blank, or the mask that was
on screen when the session was made: onscreen.py), and undo returns states stepping stored, so the mask
never depends on the path taken (tests/test_backend_sessions.py, tests/test_session_start.py check it).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from interformer.clicks import Click

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


class SessionStore:
    """Bounded LRU of interactive sessions keyed by (image id, region key)."""

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError(f"session capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def drop(self, key: Hashable) -> None:
        self._entries.pop(key, None)

    def drop_image(self, image_id: str) -> None:
        """Forget every session of one image (e.g. after its features were re-encoded)."""
        for key in [k for k in self._entries if isinstance(k, tuple) and k and k[0] == image_id]:
            del self._entries[key]

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
            del self._entries[key]
            entry = None
        try:
            if entry is not None:
                self._entries.move_to_end(key)
                outcome = _reuse(entry, clicks)
                if outcome is not None:
                    return dataclasses.replace(outcome, session=entry.session)
            session = entry.session if entry is not None else new_session()
            result = _replay(session, clicks)
        except BaseException:
            self._entries.pop(key, None)  # a half-updated session must not be reused
            raise
        self._entries[key] = _Entry(session, clicks, result, variant)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
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
