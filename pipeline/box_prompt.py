"""The box rule shared by the interactive backend and bulk pre-annotation: a box -> one click and a region.

InterFormer is trained with clicks only, the first one placed deep inside the object, so a box becomes
that first click at its centre. Synthetic negative clicks around the box are not added: the model learnt
negatives on false-positive regions, not on a fixed pattern of corners, and each would cost an interact
step. The box instead gives the region: the box grown by BOX_MARGIN per side (1.4x, InterFormer's zoom-in
expand ratio) is the zoom-in region of the refine stages from the first click on, and pixels outside it
are background, which stops leaks into neighbouring objects that a centre click alone cannot rule out.
"""
from __future__ import annotations

import math
from typing import Any

from interformer.clicks import Click, Roi
from interformer.numbers import is_finite_number

BOX_MARGIN = 0.2  # a box prompt's region: the box grown by this fraction of its size on each side (1.4x,
# the expand ratio InterFormer's own zoom-in uses around the object)


# Why a rectangle cannot be a prompt: reason codes of pipeline.prompts (defined here, where they are raised).
DEGENERATE_BOX = "degenerate_box"  # malformed: not an object, a missing or non-finite coordinate, no area
BOX_OUTSIDE = "box_outside"  # leaves the image
ROTATED_BOX = "rotated_box"  # a rotated rectangle (Label Studio): only axis-aligned boxes are prompts


class BoxPromptError(ValueError):
    """A rectangle that cannot be a prompt; the message says why, `reason` is its code (DEGENERATE_BOX,
    BOX_OUTSIDE or ROTATED_BOX)."""

    def __init__(self, message: str, reason: str = DEGENERATE_BOX) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason when the error is pickled
        return (type(self), (str(self), self.reason))


def shown(v: Any) -> str:
    """`repr(v)` for an error message, cut to 40 characters (a request's value may be a 300-digit number)."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def box_to_click(value: dict[str, Any], size: tuple[int, int]) -> tuple[Click, Roi]:
    """A rectangle (percent x, y, width, height of an (H, W) image, as Label Studio stores it) -> a positive
    click at its centre and the grown region (left, up, right, bottom), clipped to the image."""
    h, w = size
    if not isinstance(value, dict):
        raise BoxPromptError(f"rectangle value must be an object, got {type(value).__name__}")
    for key in ("x", "y", "width", "height"):
        if key not in value:
            raise BoxPromptError(f"rectangle value has no {key!r}")
    rotation = value.get("rotation") or 0.0
    if not is_finite_number(rotation):
        raise BoxPromptError(f"rectangle rotation must be a number in degrees, got {shown(rotation)}")
    if rotation != 0.0:
        raise BoxPromptError("rotated rectangles are not supported as prompts: set the rectangle's rotation to 0",
                             ROTATED_BOX)
    x, y, bw, bh = (value[k] for k in ("x", "y", "width", "height"))
    for key, v in (("x", x), ("y", y), ("width", bw), ("height", bh)):
        if not is_finite_number(v):
            raise BoxPromptError(f"rectangle {key} must be a number in percent, got {shown(v)}")
    if bw <= 0 or bh <= 0:
        raise BoxPromptError(f"rectangle has no area (width={shown(bw)}, height={shown(bh)})")
    if x < 0 or y < 0 or x + bw > 100.0001 or y + bh > 100.0001:
        raise BoxPromptError(f"rectangle x={shown(x)} y={shown(y)} w={shown(bw)} h={shown(bh)} (percent) leaves the image",
                             BOX_OUTSIDE)
    left, top = x * w / 100.0, y * h / 100.0
    right, bottom = (x + bw) * w / 100.0, (y + bh) * h / 100.0
    centre = Click(min(int((top + bottom) / 2.0), h - 1), min(int((left + right) / 2.0), w - 1), True)
    mx, my = BOX_MARGIN * (right - left), BOX_MARGIN * (bottom - top)
    region = (
        max(0, int(math.floor(left - mx))),
        max(0, int(math.floor(top - my))),
        min(w, int(math.ceil(right + mx))),
        min(h, int(math.ceil(bottom + my))),
    )
    return centre, region
