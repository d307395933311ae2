"""The mask already on screen for a region, so that clicks correct it instead of starting over.

Label Studio 1.23.2 embeds the task's annotations, drafts and predictions, with their full brush RLE,
in every interactive /predict body (shared/spec/integrations.md §1.2), so no extra round trip to
Label Studio is needed. Which mask wins:

1. the newest (by `updated_at`, else `created_at`) non-cancelled annotation or draft that has a brush or
   polygon region with the prompt's label on the prompt's image: what the annotator last saved or is
   editing; when one exists, a prediction is never resurrected over it (the annotator may have deleted
   that region on purpose);
2. else the newest prediction with such a region (e.g. a pre-annotation by jobs/preannotate.py);
3. within that source, the first region (in its order) whose mask contains the region's first positive
   click: the object the annotator clicked on. No region under the click: a blank start (a new object).

A region pre-annotated by jobs/preannotate.py also carries the clicks that made it (region_meta.py); the engine
then continues that session rather than starting from the mask alone, when its model matches and the clicks
still reproduce the mask on screen.

Regions this backend returned interactively carry ids starting with `INTERACTIVE_ID_PREFIX` and are
never a start mask, so a draft that saved the answer being refined does not feed back into it. The
choice is made for every request, from that request's click list and body: the start's `identity` (source,
index of the region, a digest of its shape and its clicks) is part of the session's variant (sessions.py), so
moving the first positive click onto another region, or off every region, starts another session, and the
mask never depends on which start an earlier click list chose. An engine remembers, per region, the identity
chosen for a (`candidates_digest`, first positive click) pair: later clicks that keep both decode nothing.

What a request can make this cost is bounded whatever its body holds: at most `MAX_CANDIDATES` regions
are candidates, a polygon of more than `MAX_POLYGON_POINTS` points or with an outline longer than
`MAX_OUTLINE_PER_SIDE` times the image's height + width, or an RLE longer than any valid stream for the
image, is treated as undecodable (no start mask), and RLE decoding spends one `START_DECODE_BUDGET` per
request (rle.py). An RLE is decoded only up to the click unless it covers it, and only polygons with the click
inside or near their outline are rasterised, at most `MAX_RASTERISED` per request.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, Hashable, Iterable

import numpy as np

from interformer.clicks import Click
from pipeline.polygons import rasterize

from .protocol import MAX_REGION_ID_CHARS, Prompt, Task
from .region_meta import StartClicks, parse_click_meta
from .rle import DecodeBudget, RleError, max_rle_bytes, rle_to_mask

INTERACTIVE_ID_PREFIX = "ifx-"
MAX_CANDIDATES = 64  # regions of one source a click may start from; the rest are no start masks
MAX_POLYGON_POINTS = 10_000  # points of one polygon region (rasterising costs memory per point and outline)
MAX_OUTLINE_PER_SIDE = 32  # a polygon's outline may be this many times the image's height + width, in pixels
START_DECODE_BUDGET = 1 << 18  # RLE records and literal values decoded per request (~0.3 s of Python)
MAX_RASTERISED = 4  # polygons rasterised per request (those with the click inside or near their outline)
NEAR_EDGE = 2.0  # pixels: a polygon whose outline passes this close to the click is rasterised to decide


def interactive_region_id() -> str:
    """A fresh id for a region answered interactively (recognised, and skipped, as a start mask)."""
    return INTERACTIVE_ID_PREFIX + uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class StartCandidates:
    """Masks of one source that a region's session may start from, in the source's order."""

    source: str  # "annotation:<id>", "draft:<id>" or "prediction:<id>"
    # one per region with the label: ("rle", Label Studio brush RLE bytes as uint8, clicks) or
    # ("polygon", (k, 2) float64 points in percent of the width / height, clicks); clicks: those in the
    # region's meta when it has valid ones (region_meta.py), else None
    shapes: tuple[tuple[str, np.ndarray, StartClicks | None], ...]
    size: tuple[int, int]  # (H, W) of the masks


@dataclass(frozen=True)
class OnScreenStart:
    """The region under the first positive click: its mask and, if its meta has them, the clicks that made it."""

    mask: np.ndarray  # bool, original size
    clicks: StartClicks | None = None
    identity: Hashable = None  # (source, region index, shape digest, clicks): equal identities, equal starts


def _digest(data: np.ndarray) -> str:
    """A short digest of a candidate's shape data (RLE bytes or polygon points)."""
    return hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=12).hexdigest()


def _stamp(item: dict[str, Any]) -> str:
    return str(item.get("updated_at") or item.get("created_at") or "")


def _rle_bytes(rle: Any, size: tuple[int, int]) -> np.ndarray | None:
    """The RLE as uint8 bytes, or None when it is not a list of bytes, or is longer than any valid stream for a
    mask of `size` or than any stream START_DECODE_BUDGET can decode (checked before converting)."""
    longest = max_rle_bytes(min(size[0] * size[1] * 4, START_DECODE_BUDGET))
    if not isinstance(rle, list) or not rle or len(rle) > longest:
        return None
    try:
        arr = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.ndim != 1 or arr.min() < 0 or arr.max() > 255:
        return None
    return arr.astype(np.uint8)


def outline_pixels(points: np.ndarray, size: tuple[int, int]) -> float:
    """Length in pixels (the longer axis of each edge, as a rasteriser walks it) of a closed polygon in percent."""
    xy = points * [size[1] / 100.0, size[0] / 100.0]
    return float(np.abs(np.roll(xy, -1, axis=0) - xy).max(axis=1).sum())


def _points(points: Any, size: tuple[int, int]) -> np.ndarray | None:
    """A polygon's (k, 2) points in percent, clipped to the image, or None when they are not 3 or more finite
    number pairs, are more than MAX_POLYGON_POINTS or outline more than MAX_OUTLINE_PER_SIDE x (H + W) pixels."""
    if not isinstance(points, list) or not 3 <= len(points) <= MAX_POLYGON_POINTS:
        return None
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # not numbers, ragged, or an integer beyond float range
        return None
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
        return None
    arr = np.clip(arr, 0.0, 100.0)  # percent: never rasterise far outside the image (cost grows with extent)
    if outline_pixels(arr, size) > MAX_OUTLINE_PER_SIDE * (size[0] + size[1]):
        return None
    return arr


def _regions(result: Any, prompt: Prompt) -> list[tuple[str, np.ndarray, StartClicks | None]]:
    """Shapes (with their meta's clicks) of the brush / polygon regions in `result` with the prompt's label (by
    its value or its alias: Label Studio saves the alias), image and size."""
    out: list[tuple[str, np.ndarray, StartClicks | None]] = []
    size = tuple(prompt.original_size)
    for r in result if isinstance(result, list) else []:
        if len(out) == MAX_CANDIDATES:
            break
        if not isinstance(r, dict) or r.get("type") not in ("brushlabels", "polygonlabels"):
            continue
        if str(r.get("id") or "").startswith(INTERACTIVE_ID_PREFIX):
            continue  # an answer of ours, maybe saved in a draft: never its own start
        if r.get("to_name", prompt.image_name) != prompt.image_name:
            continue
        value = r.get("value") if isinstance(r.get("value"), dict) else {}
        labels = value.get(r["type"])
        if not isinstance(labels, list) or not any(name in labels for name in prompt.names):
            continue
        if (r.get("original_height"), r.get("original_width")) != size:
            continue
        if r["type"] == "brushlabels" and value.get("format", "rle") == "rle":
            kind, data = "rle", _rle_bytes(value.get("rle"), size)
        else:
            kind, data = "polygon", _points(value.get("points"), size)
        if data is not None:
            out.append((kind, data, parse_click_meta(r.get("meta"), size)))
    return out


def source_name(kind: str, item_id: object) -> str:
    """`kind:id`, the name of the saved item a start comes from (kept with sessions and logged): an integer id
    or a string of at most MAX_REGION_ID_CHARS as it is, any other id (a long string, a list, an object: the
    client chose it) by its first characters and a digest, so that it costs neither memory nor log space."""
    if isinstance(item_id, int) and not isinstance(item_id, bool) and abs(item_id) < 10**18:
        return f"{kind}:{item_id}"
    if isinstance(item_id, str) and len(item_id) <= MAX_REGION_ID_CHARS:
        return f"{kind}:{item_id}"
    text = item_id if isinstance(item_id, str) else repr(item_id)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{kind}:{text[:16]}~{digest}"


def _newest(items: Iterable[tuple[str, dict[str, Any]]], prompt: Prompt) -> StartCandidates | None:
    ranked = sorted((it for it in items if isinstance(it[1], dict) and not it[1].get("was_cancelled")),
                    key=lambda it: _stamp(it[1]), reverse=True)
    for kind, item in ranked:
        shapes = _regions(item.get("result"), prompt)
        if shapes:
            return StartCandidates(source_name(kind, item.get("id")), tuple(shapes), tuple(prompt.original_size))
    return None


def onscreen_candidates(task: Task, prompt: Prompt) -> StartCandidates | None:
    """The masks the region may start from (see the module docstring for which source wins), or None."""
    saved = [("annotation", a) for a in task.annotations] + [("draft", d) for d in task.drafts]
    return _newest(saved, prompt) or _newest((("prediction", p) for p in task.predictions), prompt)


def _polygon_near(points: np.ndarray, size: tuple[int, int], row: int, col: int) -> bool:
    """Whether pixel (row, col)'s centre is inside the polygon (even-odd) or within NEAR_EDGE pixels of its
    outline: a pixel that is neither is outside the rasterised mask, whatever the rasteriser's edge rule."""
    a = points * [size[1] / 100.0, size[0] / 100.0]
    b = np.roll(a, -1, axis=0)
    x, y = col + 0.5, row + 0.5
    d = b - a
    crosses = (a[:, 1] > y) != (b[:, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        at = a[:, 0] + (y - a[:, 1]) * d[:, 0] / d[:, 1]
    if np.count_nonzero(crosses & (x < at)) % 2:
        return True
    p = np.array([x, y]) - a
    length2 = (d * d).sum(axis=1)
    t = np.clip(np.divide((p * d).sum(axis=1), length2, out=np.zeros_like(length2), where=length2 > 0), 0.0, 1.0)
    return bool((((p - t[:, None] * d) ** 2).sum(axis=1)).min() <= NEAR_EDGE ** 2)


def _polygon_mask(points: np.ndarray, size: tuple[int, int], click: Click, rasterised: list[int]) -> np.ndarray | None:
    """The polygon's mask when it covers the click, else None. Only a polygon with the click inside or near
    its outline is rasterised, at most MAX_RASTERISED per call (`rasterised` counts them)."""
    h, w = size
    if len(points) > MAX_POLYGON_POINTS or outline_pixels(points, size) > MAX_OUTLINE_PER_SIDE * (h + w):
        return None
    if not _polygon_near(points, size, click.row, click.col) or rasterised[0] == MAX_RASTERISED:
        return None
    rasterised[0] += 1
    mask = rasterize([(points * [w / 100.0, h / 100.0]).reshape(-1).tolist()], (h, w))
    return mask if mask[click.row, click.col] else None


def candidates_digest(candidates: StartCandidates) -> str:
    """A digest of everything a start can be chosen from (source, shapes, their clicks): with the first positive
    click, it decides the start, so an engine that saw both before knows the start's identity without decoding."""
    h = hashlib.blake2b(candidates.source.encode("utf-8", "surrogatepass"), digest_size=16)
    h.update(repr(tuple(candidates.size)).encode())
    for kind, data, clicks in candidates.shapes[:MAX_CANDIDATES]:
        h.update(kind.encode())
        h.update(_digest(data).encode())
        h.update(repr(clicks).encode())
    return h.hexdigest()


def start_region(candidates: StartCandidates | None, clicks: tuple[Click, ...]) -> OnScreenStart | None:
    """The first candidate region whose mask is under the first positive click, else None.

    At most MAX_CANDIDATES regions are tried, an RLE is decoded only up to the click unless it covers it, all
    RLE decoding of the call shares one START_DECODE_BUDGET, and at most MAX_RASTERISED polygons are rasterised."""
    first = next((c for c in clicks if c.positive), None)
    if candidates is None or first is None:
        return None
    size = tuple(candidates.size)
    if not (0 <= first.row < size[0] and 0 <= first.col < size[1]):
        return None
    budget, rasterised = DecodeBudget(START_DECODE_BUDGET), [0]
    for index, (kind, data, start_clicks) in enumerate(candidates.shapes[:MAX_CANDIDATES]):
        try:
            if kind == "rle":
                mask = rle_to_mask(data, size[0], size[1], budget, covering=(first.row, first.col))
            else:
                mask = _polygon_mask(data, size, first, rasterised)
        except RleError:
            if budget.left == 0:
                return None  # the call's decoding budget is spent: no later region is decoded either
            continue
        except Exception:  # noqa: BLE001 - a region from the request that does not decode is no start mask
            continue
        if mask is not None:
            return OnScreenStart(mask, start_clicks, (candidates.source, index, _digest(data), start_clicks))
    return None
