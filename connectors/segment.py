"""The boundary between the HTTP server and whatever runs the model: one request, one answer.

The server speaks Label Studio's protocol and hands a `SegmentRequest` to a `Segmenter` (the Ray
actor pool in production); the answer carries only the brush RLE, a score and timings, never
feature tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from interformer.clicks import Click, Roi

from .onscreen import StartCandidates


class SegmentError(Exception):
    """A request the model side cannot answer (unknown image, size mismatch...); `status` is the HTTP code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __reduce__(self):  # keep the fields when the error crosses a process boundary (Ray)
        return (type(self), (self.status, self.message))


class EncodeFirst(Exception):
    """A serving actor's answer for an image with no stored features, when encoding is the caller's job: the
    caller has the encoder actor store it (without holding the serving actor, which goes on answering other
    annotators' clicks meanwhile), then sends the request again."""

    def __init__(self, image_id: str, image_ref: str, task_id: int | None) -> None:
        super().__init__(f"encode {image_id!r} first")
        self.image_id, self.image_ref, self.task_id = image_id, image_ref, task_id

    def __reduce__(self):
        return (type(self), (self.image_id, self.image_ref, self.task_id))


@dataclass(frozen=True)
class SegmentRequest:
    """The clicks of one region on one image, in original-image pixels."""

    clicks: tuple[Click, ...]
    original_size: tuple[int, int]  # (H, W) as Label Studio knows the image
    image_id: str | None = None  # task.data.image_id, when the task has one
    image_ref: str | None = None  # the task's image URL/path: looked up in the table, fetched to encode
    task_id: int | None = None
    box: Roi | None = None  # (left, up, right, bottom) of a box prompt: zoom-in region and mask bound
    region_key: str = ""
    start: StartCandidates | None = None  # masks on screen the region's session may start from (onscreen.py)
    output: str = "brushlabels"  # answer as brush RLE, or "polygonlabels": polygons (pipeline/polygons.py)

    @property
    def route_key(self) -> str:
        """What picks the actor: the same image always goes to the same actor."""
        return self.image_id if self.image_id else f"ref:{self.image_ref}"


@dataclass(frozen=True)
class SegmentResult:
    rle: list[int]
    score: float
    image_id: str
    path: str  # "cached", "step", "undo" or "replay" (see sessions.py)
    steps: int  # interact steps this request ran
    area: int  # foreground pixels of the mask
    timings_ms: dict[str, float] = field(default_factory=dict)  # fetch, encode, interact, rle, ...
    encoded_on_demand: bool = False
    actor: int = -1
    start: str = "blank"  # what the region's session started from: "blank" or the source of its mask
    start_kind: str = "blank"  # "blank", "mask" (the region's mask) or "clicks" (the clicks in its meta, replayed)
    polygons: list[list[list[float]]] | None = None  # output "polygonlabels": per polygon [[x%, y%], ...]
    polygon_iou: float | None = None  # IoU of those polygons against the mask


class Segmenter(Protocol):
    """Runs `SegmentRequest`s; raises SegmentError for requests that cannot be answered."""

    async def segment(self, request: SegmentRequest) -> SegmentResult: ...

    def ready(self) -> bool: ...
