"""A classical click-driven baseline: OpenCV GrabCut seeded by the clicks.

It has the session interface of the model (`start(image)` -> session, `session.add_click(row, col, positive)`
-> result with `.mask` and `.padded_mask`), so the evaluation harness runs without a checkpoint and gives a
floor to compare checkpoints with.

Per click, the label map handed to `cv2.grabCut` is built from scratch: the previous result as "probably
foreground / background", a soft disk around every click ("probably" its label, later clicks win), and a
small hard disk at every click ("definitely" its label). GrabCut runs on a copy of the image scaled so its
longest side is `work_side` (max-flow on full-size DAVIS frames takes seconds per call); the mask is scaled
back. OpenCV's RNG is re-seeded before every call, so results are deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from interformer.preprocess import validate_image

from .clicker import Click


@dataclass(frozen=True)
class GrabCutConfig:
    """work_side: longest side of the working image (None: native size); iterations: GrabCut iterations per
    click; hard_radius: radius of the definite-label disk at a click, in original pixels; soft_radius_frac:
    radius of the probable-label disk, as a fraction of the shorter image side; size_divisor: the padded
    canvas multiple used for `padded_mask` (32, as the network's); seed: OpenCV RNG seed."""

    work_side: int | None = 320
    iterations: int = 3
    hard_radius: int = 5
    soft_radius_frac: float = 0.15
    size_divisor: int = 32
    seed: int = 0


@dataclass(frozen=True)
class BaselineResult:
    """The prediction after a click: `mask` at image size, `padded_mask` on the padded canvas (bool)."""

    mask: np.ndarray
    padded_mask: np.ndarray


class GrabCutSession:
    """Clicks on one image; every `add_click` reruns GrabCut with all clicks so far.

    allow_padding: clicks may also lie in the padding of `canvas_size` (the InterFormer protocol's canvas).
    GrabCut never predicts there, so that protocol's simulator never asks for one; one given anyway is
    kept in `clicks` and leaves the prediction as it was (there is no image under it)."""

    def __init__(self, image: np.ndarray, config: GrabCutConfig, allow_padding: bool = False) -> None:
        self.config = config
        self.allow_padding = allow_padding
        self.image_size = image.shape[:2]
        h, w = self.image_size
        d = config.size_divisor
        self.canvas_size = (math.ceil(h / d) * d, math.ceil(w / d) * d)
        self.scale = 1.0
        if config.work_side is not None and max(h, w) > config.work_side:
            self.scale = config.work_side / max(h, w)
        wh, ww = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        self._work = bgr if (wh, ww) == (h, w) else cv2.resize(bgr, (ww, wh), interpolation=cv2.INTER_AREA)
        self._prev = np.zeros((wh, ww), dtype=bool)
        self.clicks: list[Click] = []
        self._last = self._result(self._prev)

    def add_click(self, row: int, col: int, positive: bool) -> BaselineResult:
        """Add a click at (row, col) of the original image (or of the padded canvas, with `allow_padding`) and
        return the new mask."""
        h, w = self.image_size
        inside = 0 <= row < h and 0 <= col < w
        hp, wp = self.canvas_size
        if not inside and not (self.allow_padding and 0 <= row < hp and 0 <= col < wp):
            where = f"the {hp}x{wp} canvas" if self.allow_padding else f"the {h}x{w} image"
            raise ValueError(f"click ({row}, {col}) lies outside {where}")
        self.clicks.append(Click(int(row), int(col), bool(positive)))
        if inside:
            self._prev = self._segment()
            self._last = self._result(self._prev)
        return self._last

    def repredict(self) -> BaselineResult:
        """The current mask: GrabCut keeps no state that would change it without a new click."""
        return self._last

    def _segment(self) -> np.ndarray:
        cfg = self.config
        wh, ww = self._work.shape[:2]
        labels = np.where(self._prev, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        soft = max(1, round(cfg.soft_radius_frac * min(wh, ww)))
        hard = max(1, round(cfg.hard_radius * self.scale))
        clicks = [c for c in self.clicks if c.row < self.image_size[0] and c.col < self.image_size[1]]
        for c in clicks:
            cv2.circle(labels, self._work_xy(c), soft, int(cv2.GC_PR_FGD if c.positive else cv2.GC_PR_BGD), -1)
        for c in clicks:
            cv2.circle(labels, self._work_xy(c), hard, int(cv2.GC_FGD if c.positive else cv2.GC_BGD), -1)
        fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        if fg.all() or not fg.any():
            return fg
        cv2.setRNGSeed(cfg.seed)
        bgd_model = np.zeros((1, 65), np.float64)
        fgd_model = np.zeros((1, 65), np.float64)
        cv2.grabCut(self._work, labels, None, bgd_model, fgd_model, cfg.iterations, cv2.GC_INIT_WITH_MASK)
        return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)

    def _work_xy(self, c: Click) -> tuple[int, int]:
        wh, ww = self._work.shape[:2]
        x = min(ww - 1, int((c.col + 0.5) * self.scale))
        y = min(wh - 1, int((c.row + 0.5) * self.scale))
        return x, y

    def _result(self, work_mask: np.ndarray) -> BaselineResult:
        h, w = self.image_size
        if work_mask.shape != (h, w):
            up = cv2.resize(work_mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR)
            mask = up > 127
        else:
            mask = work_mask.copy()
        padded = np.zeros(self.canvas_size, dtype=bool)
        padded[:h, :w] = mask
        return BaselineResult(mask, padded)


class GrabCutBaseline:
    """Factory of GrabCut sessions with the model's `start(image)` interface."""

    name = "grabcut"

    def __init__(self, config: GrabCutConfig = GrabCutConfig()) -> None:
        self.config = config

    def start(self, image: np.ndarray, image_id: str | None = None, allow_padding: bool = False) -> GrabCutSession:
        """Open a session on an RGB uint8 image (`image_id` is not needed: nothing is precomputed);
        `allow_padding`: see `GrabCutSession`."""
        return GrabCutSession(validate_image(image), self.config, allow_padding)
