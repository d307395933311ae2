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
choice is made once, when the region's session is created, and cached with the session (sessions.py):
later clicks of the region cost no decode, whatever the drafts hold by then.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from interformer.clicks import Click
from pipeline.polygons import rasterize

from .protocol import Prompt, Task
from .region_meta import StartClicks, parse_click_meta
from .rle import rle_to_mask

INTERACTIVE_ID_PREFIX = "ifx-"


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


def _stamp(item: dict[str, Any]) -> str:
    return str(item.get("updated_at") or item.get("created_at") or "")


def _rle_bytes(rle: Any) -> np.ndarray | None:
    if not isinstance(rle, list) or not rle:
        return None
    try:
        arr = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if arr.ndim != 1 or arr.min() < 0 or arr.max() > 255:
        return None
    return arr.astype(np.uint8)


def _points(points: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 2 or arr.shape[0] < 3 or arr.shape[1] != 2 or not np.isfinite(arr).all():
        return None
    return np.clip(arr, 0.0, 100.0)  # percent: never rasterise far outside the image (cost grows with extent)


def _regions(result: Any, prompt: Prompt) -> list[tuple[str, np.ndarray, StartClicks | None]]:
    """Shapes (with their meta's clicks) of the brush / polygon regions in `result` with the prompt's label,
    image and size."""
    out = []
    for r in result if isinstance(result, list) else []:
        if not isinstance(r, dict) or r.get("type") not in ("brushlabels", "polygonlabels"):
            continue
        if str(r.get("id") or "").startswith(INTERACTIVE_ID_PREFIX):
            continue  # an answer of ours, maybe saved in a draft: never its own start
        if r.get("to_name", prompt.image_name) != prompt.image_name:
            continue
        value = r.get("value") if isinstance(r.get("value"), dict) else {}
        labels = value.get(r["type"])
        if not isinstance(labels, list) or prompt.label not in labels:
            continue
        if (r.get("original_height"), r.get("original_width")) != tuple(prompt.original_size):
            continue
        if r["type"] == "brushlabels" and value.get("format", "rle") == "rle":
            kind, data = "rle", _rle_bytes(value.get("rle"))
        else:
            kind, data = "polygon", _points(value.get("points"))
        if data is not None:
            out.append((kind, data, parse_click_meta(r.get("meta"), tuple(prompt.original_size))))
    return out


def _newest(items: Iterable[tuple[str, dict[str, Any]]], prompt: Prompt) -> StartCandidates | None:
    ranked = sorted((it for it in items if isinstance(it[1], dict) and not it[1].get("was_cancelled")),
                    key=lambda it: _stamp(it[1]), reverse=True)
    for kind, item in ranked:
        shapes = _regions(item.get("result"), prompt)
        if shapes:
            return StartCandidates(f"{kind}:{item.get('id')}", tuple(shapes), tuple(prompt.original_size))
    return None


def onscreen_candidates(task: Task, prompt: Prompt) -> StartCandidates | None:
    """The masks the region may start from (see the module docstring for which source wins), or None."""
    saved = [("annotation", a) for a in task.annotations] + [("draft", d) for d in task.drafts]
    return _newest(saved, prompt) or _newest((("prediction", p) for p in task.predictions), prompt)


def start_region(candidates: StartCandidates | None, clicks: tuple[Click, ...]) -> OnScreenStart | None:
    """The first candidate region whose mask is under the first positive click, else None."""
    first = next((c for c in clicks if c.positive), None)
    if candidates is None or first is None:
        return None
    h, w = candidates.size
    for kind, data, start_clicks in candidates.shapes:
        try:
            if kind == "rle":
                mask = rle_to_mask(data, h, w)
            else:
                mask = rasterize([(data * [w / 100.0, h / 100.0]).reshape(-1).tolist()], (h, w))
        except Exception:  # noqa: BLE001 - a region from the request that does not decode is no start mask
            continue
        if 0 <= first.row < h and 0 <= first.col < w and mask[first.row, first.col]:
            return OnScreenStart(mask, start_clicks)
    return None
