"""The clicks a pre-annotated region carries, so that the backend continues its session instead of its mask.

jobs/preannotate.py writes, in the `meta` of each region it pushes to Label Studio, the simulated (or given)
clicks that made the mask and a key of the model that answered them:

    "meta": {"interformer": {"model": "<16 hex digits>", "clicks": [[row, col, positive], ...]}}

rows and columns in pixels of the image as Label Studio displays it (EXIF orientation applied), positive 1 or 0.
When an annotator clicks on that region, the backend (same model only) starts the session after those clicks
(`Predictor.session(initial_clicks=...)`) instead of from the mask alone: on GrabCut / Berkeley with the trained
small model that takes 0.5 / 0.7 fewer corrective clicks to IoU 0.9 (bench/bench_refine.py,
docs/label-studio-backend.md). The key is a digest of the feature fingerprint, not the fingerprint itself, so a
prediction names no path or weights file.

Box prompts get no clicks: their region bounds the mask, and replaying the centre click without it would not
reproduce what is on screen. The backend's `--refine-from mask` ignores the clicks (no replay on a region's first
click, at the cost of the corrective clicks they save). Everything read back is checked (the request body is not trusted): anything
malformed, too long or outside the image is ignored, and the backend starts from the mask.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Sequence

from interformer.clicks import Click

META_KEY = "interformer"
MAX_START_CLICKS = 20  # a replay costs one interact step per click, on the region's first click only
REFINE_STARTS = ("clicks", "mask")  # the backend's --refine-from: continue a region's clicks, or its mask alone
_MODEL_KEY = re.compile(r"[0-9a-f]{16}")


def model_key(fingerprint: str) -> str:
    """A short digest of a feature fingerprint: equal keys mean the same weights and preprocessing."""
    return hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:16]


def click_meta(clicks: Sequence[Sequence[int]], fingerprint: str) -> dict[str, Any] | None:
    """The region `meta` for a mask made by `clicks` ([row, col, positive] each); None when there are none
    or more than the backend would replay."""
    if not clicks or len(clicks) > MAX_START_CLICKS:
        return None
    return {META_KEY: {"model": model_key(fingerprint),
                       "clicks": [[int(r), int(c), int(bool(p))] for r, c, p in clicks]}}


@dataclass(frozen=True)
class StartClicks:
    """Clicks read back from a region's meta, checked against the image size."""

    model: str
    clicks: tuple[Click, ...]


def _pixel(v: Any, limit: int) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit:
        return None
    return v


def parse_click_meta(meta: Any, size: tuple[int, int]) -> StartClicks | None:
    """The clicks in a region's meta for an (H, W) image, or None unless they are exactly what
    `click_meta` writes: 1..MAX_START_CLICKS clicks inside the image and a model key."""
    entry = meta.get(META_KEY) if isinstance(meta, dict) else None
    if not isinstance(entry, dict):
        return None
    model, raw = entry.get("model"), entry.get("clicks")
    if not isinstance(model, str) or not _MODEL_KEY.fullmatch(model):
        return None
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_START_CLICKS:
        return None
    h, w = size
    clicks = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 3:
            return None
        row, col, positive = _pixel(item[0], h), _pixel(item[1], w), item[2]
        if row is None or col is None or positive not in (0, 1) or isinstance(positive, float):
            return None
        clicks.append(Click(row, col, bool(positive)))
    return StartClicks(model, tuple(clicks))
