"""The public two-stage API: `Predictor.encode` once per image, then an `InteractiveSession` per object.

Encode (GPU when present) runs the ViT + SimpleFPN and the click-independent I-MSA keys/values.
A click runs only I-MSA + UPerHead on CPU. The session state (reference-label map, clicks, previous
prediction) is explicit, and `replay` rebuilds it from a click list with identical results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .click_engine import ClickEngine, ClickEngineConfig, build_engine
from .clicks import DEF_FG, Click, Roi, add_click_disk, initial_ref_label, update_by_prediction, zoom_in_roi
from .config import PreprocessConfig
from .encode_engine import OpenVINOEncoder, TorchEncoder, build_encoder, check_encode_names
from .encode_memory import check_encode_memory, images_per_pass
from .features import ImageFeatures, ImageGeometry
from .modeling import InterFormer
from .modeling.imsa import IMSACache
from .preprocess import preprocess, validate_image

__all__ = ["Click", "ClickResult", "InteractiveSession", "InvalidMaskError", "NonFiniteOutputError", "Predictor",
           "SessionStart", "default_device", "mask_to_canvas", "set_cpu_threads"]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_cpu_threads(n: int) -> None:
    """Intra-op threads for CPU inference (a serving process should match its CPU share)."""
    torch.set_num_threads(max(1, int(n)))


class InvalidClickError(ValueError):
    """A click or box outside the image (or an empty box)."""


def check_box(box: Sequence[float], original_size: tuple[int, int]) -> None:
    """Raise InvalidClickError unless a zoom-in box (left, up, right, bottom; original pixels, exclusive ends)
    is 4 finite numbers, non-empty and inside the image: an empty box would give the refine stages an empty
    region, an inverted one a meaningless one."""
    h0, w0 = original_size
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        raise InvalidClickError(f"box {box!r} must be 4 numbers (left, up, right, bottom)") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InvalidClickError(f"box {box!r} must be 4 finite numbers (left, up, right, bottom)")
    left, up, right, bottom = values
    if not (0 <= left < right <= w0 and 0 <= up < bottom <= h0):
        raise InvalidClickError(f"box {tuple(box)!r} (left, up, right, bottom) must satisfy 0 <= left < right <= "
                                f"{w0} and 0 <= up < bottom <= {h0} for the {h0}x{w0} image")


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or inf (damaged weights or features): refused rather than shown as an empty mask."""


def check_finite(values: torch.Tensor | np.ndarray, what: str) -> None:
    """Raise NonFiniteOutputError naming `what` unless every value is finite (one pass over the tensor)."""
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(finite):
        raise NonFiniteOutputError(f"{what}: are the weights or the stored features damaged? Check the "
                                   f"checkpoint and re-encode the image")


class InvalidMaskError(ValueError):
    """A mask or reference-label map that does not fit the session's image (shape, dtype, values)."""


def mask_to_canvas(mask: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """A bool mask at the original image size -> the padded network canvas (nearest resize, zero pad)."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        kind = f"dtype {mask.dtype}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InvalidMaskError(f"expected a bool numpy mask, got {kind} (convert with `mask > 0`)")
    if tuple(mask.shape) != tuple(geometry.original_size):
        raise InvalidMaskError(f"mask shape {tuple(mask.shape)} differs from the image size "
                               f"{tuple(geometry.original_size)}")
    h, w = geometry.resized_size
    if geometry.resized:
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    out = np.zeros(geometry.padded_size, dtype=bool)
    out[:h, :w] = mask
    return out


@dataclass(frozen=True, eq=False)
class SessionStart:
    """The state a session starts from (and returns to on `reset`, `replay`, undo of every click).

    ref_label: uint8 reference-label map on the padded canvas (values 0-4, spec §4.1).
    prev_pred: bool previous prediction on the padded canvas, as the zoom-in ROI sees it.
    mask: the mask shown before any click at the original size (None for a blank start).
    clicks: the clicks that made this state (`InteractiveSession.snapshot`); the zoom-in counts them, undo
        never removes them.
    result: the prediction shown before any click when it came from the model (a snapshot), else None.
    """

    ref_label: np.ndarray
    prev_pred: np.ndarray
    mask: np.ndarray | None = None
    clicks: tuple[Click, ...] = ()
    result: "ClickResult | None" = None

    @classmethod
    def blank(cls, geometry: ImageGeometry) -> "SessionStart":
        """No prior: UNKNOWN everywhere, an empty previous prediction."""
        return cls(initial_ref_label(geometry.padded_size), np.zeros(geometry.padded_size, dtype=bool))

    @classmethod
    def from_mask(cls, mask: np.ndarray, geometry: ImageGeometry) -> "SessionStart":
        """A loaded mask (bool, original size) taken as if the model had predicted it: the blank map gets
        the prediction update (UNKNOWN -> maybe-fg inside, maybe-bg outside) and zoom-in sees it as the
        previous prediction."""
        canvas = mask_to_canvas(mask, geometry)
        return cls(update_by_prediction(initial_ref_label(geometry.padded_size), canvas), canvas, mask.copy())

    @classmethod
    def from_ref_label(cls, ref_label: np.ndarray, geometry: ImageGeometry,
                       prev_pred: np.ndarray | None = None) -> "SessionStart":
        """A given reference-label map (padded canvas, integer values 0-4) and optional previous prediction
        (bool, padded canvas; empty when omitted)."""
        padded = tuple(geometry.padded_size)
        if not isinstance(ref_label, np.ndarray) or not np.issubdtype(ref_label.dtype, np.integer):
            kind = f"dtype {ref_label.dtype}" if isinstance(ref_label, np.ndarray) else type(ref_label).__name__
            raise InvalidMaskError(f"expected an integer numpy reference-label map, got {kind}")
        if tuple(ref_label.shape) != padded:
            raise InvalidMaskError(f"reference-label map shape {tuple(ref_label.shape)} differs from the padded "
                                   f"canvas {padded}")
        if ref_label.size and (ref_label.min() < 0 or ref_label.max() > DEF_FG):
            raise InvalidMaskError(f"reference-label values must lie in 0..{DEF_FG}, got "
                                   f"{int(ref_label.min())}..{int(ref_label.max())}")
        if prev_pred is None:
            prev_pred = np.zeros(padded, dtype=bool)
        elif not isinstance(prev_pred, np.ndarray) or prev_pred.dtype != np.bool_ or tuple(prev_pred.shape) != padded:
            raise InvalidMaskError(f"prev_pred must be a bool array of the padded canvas shape {padded}")
        return cls(ref_label.astype(np.uint8), prev_pred.copy())


@dataclass
class ClickResult:
    """Prediction after one click. `margin` is logit1 - logit0 on the padded canvas (float32)."""

    margin: np.ndarray
    geometry: ImageGeometry
    clicks: tuple[Click, ...]

    @cached_property
    def padded_mask(self) -> np.ndarray:
        """Foreground on the padded network canvas (argmax; ties are background)."""
        return self.margin > 0

    @cached_property
    def _original_margin(self) -> np.ndarray:
        g = self.geometry
        h, w = g.resized_size
        m = self.margin[:h, :w]
        if g.resized:
            h0, w0 = g.original_size
            m = F.interpolate(torch.from_numpy(np.ascontiguousarray(m))[None, None], size=(h0, w0),
                              mode="bilinear", align_corners=False)[0, 0].numpy()
        return m

    @cached_property
    def mask(self) -> np.ndarray:
        """Foreground at the original image size (bool)."""
        return self._original_margin > 0

    @cached_property
    def prob(self) -> np.ndarray:
        """Foreground probability at the original image size (softmax of the two logits)."""
        return (1.0 / (1.0 + np.exp(-self._original_margin))).astype(np.float32)


@dataclass
class _State:
    ref_label: np.ndarray
    pred: np.ndarray  # bool, padded canvas
    result: ClickResult | None


class Predictor:
    """Holds a model on a device; `encode` images once and open sessions over their features.

    `engine` picks what runs the per-click network (interformer.click_engine): "torch" (the fp32
    reference, default), "openvino-f32", "openvino-bf16" or "fast"; a name or a ClickEngineConfig.
    `encode_engine` picks what runs the image encoder (interformer.encode_engine): "torch" (default) or
    "openvino" (CPU; f32 the same function, several times faster), at `encode_precision` "fp32" (default, the
    reference) or "bf16" (torch: autocast, on CPUs with AMX / AVX512-BF16 or CUDA; openvino: native bf16
    CPUs). The pyramid is returned in fp32 either way. The runtime's converted models live in the click engine
    config's cache folder.
    """

    def __init__(self, model: InterFormer, preprocess: PreprocessConfig = PreprocessConfig(),
                 device: str | torch.device | None = None,
                 engine: str | ClickEngineConfig = ClickEngineConfig(), encode_precision: str = "fp32",
                 encode_engine: str = "torch") -> None:
        check_encode_names(encode_engine, encode_precision)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval().fuse_for_inference()
        self.preprocess = preprocess
        self.engine_config = ClickEngineConfig(engine) if isinstance(engine, str) else engine
        self._engine: ClickEngine | None = None
        self.encode_precision = encode_precision
        self.encode_engine = encode_engine
        self._encoder: TorchEncoder | OpenVINOEncoder | None = None
        self._encoder_request: tuple[str, str] | None = None

    @property
    def engine(self) -> ClickEngine:
        """The click engine, built on first use (a fallback is logged once, when it is built)."""
        if self._engine is None:
            self._engine = build_engine(self.engine_config, self.model, self.device)
        return self._engine

    @property
    def encoder(self) -> TorchEncoder | OpenVINOEncoder:
        """The image encoder for `encode_engine` and `encode_precision` (rebuilt when either changes); a
        fallback is logged once, when it is built."""
        encoder, wanted = self._encoder, (self.encode_engine, self.encode_precision)
        if encoder is None or self._encoder_request != wanted:
            encoder = self._encoder = build_encoder(*wanted, self.model.backbone, self.device,
                                                    self.engine_config.cache_path)
            self._encoder_request = wanted
        return encoder

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint(self.preprocess)

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> ImageFeatures:
        """RGB uint8 (H, W, 3) -> ImageFeatures (pyramid + geometry + I-MSA cache)."""
        return self.encode_batch([image])[0]

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[np.ndarray], max_batch: int = 8) -> list[ImageFeatures]:
        """Encode several images; images with the same padded size share a forward pass, as many as fit the
        attention memory budget. Raises ImageTooLargeError (an InvalidImageError) before any encoding when an
        image alone would need more than `preprocess.max_encode_memory_gib`."""
        vit = self.model.config.vit
        for img in images:
            check_encode_memory(validate_image(img, self.preprocess.max_pixels).shape[:2], self.preprocess, vit)
        prepared = [preprocess(img, self.preprocess) for img in images]
        out: list[ImageFeatures | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, geo) in enumerate(prepared):
            groups.setdefault(geo.padded_size, []).append(i)
        for padded, idxs in groups.items():
            step = min(max_batch, images_per_pass(padded, self.preprocess, vit))
            for start in range(0, len(idxs), step):
                chunk = idxs[start : start + step]
                batch = torch.cat([prepared[i][0] for i in chunk]).to(self.device)
                pyramid = self.encode_pyramid(batch)
                for j, i in enumerate(chunk):
                    feats = ImageFeatures(tuple(p[j : j + 1].float() for p in pyramid), prepared[i][1])
                    self._ensure_cache(feats)
                    out[i] = feats
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def encode_pyramid(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Normalised, padded images [B, 3, H, W] on the device -> the pyramid in fp32, on `encode_engine` at
        `encode_precision`; raises NonFiniteOutputError when a level holds NaN or inf."""
        pyramid = self.encoder(batch)
        for i, level in enumerate(pyramid):
            check_finite(level, f"the encoder produced non-finite features (pyramid level {i})")
        return pyramid

    def _ensure_cache(self, feats: ImageFeatures) -> IMSACache:
        key = ("imsa", id(self.model))
        cache = feats.cache.get(key)
        if cache is None:
            if feats.device != self.device:
                feats.pyramid = tuple(p.to(self.device) for p in feats.pyramid)
            with torch.inference_mode():
                cache = self.model.precompute(list(feats.pyramid))
            feats.cache[key] = cache
        return cache

    def session(self, feats: ImageFeatures, box: Roi | None = None, initial_mask: np.ndarray | None = None,
                start: SessionStart | None = None,
                initial_clicks: Sequence[Click | tuple] | None = None,
                engine: ClickEngine | None = None, zoom_in: bool = True,
                allow_padding: bool = False) -> "InteractiveSession":
        """A new interactive session (one object) over encoded features.

        `box` (left, up, right, bottom, original pixels) fixes the zoom-in region of the refine stages
        instead of deriving it per click. At most one start: `initial_mask` (bool, original image size)
        starts from an existing mask, e.g. a pre-annotation to correct (`SessionStart.from_mask`);
        `initial_clicks` from the state those clicks make (e.g. the pre-annotation's own simulated clicks:
        later clicks answer exactly as if added after them, and undo stops there); `start` from any
        `SessionStart`, e.g. a given reference-label map (`SessionStart.from_ref_label`). Every click of the
        session runs on one engine: `engine` when given (from `click_engine_for`), else the one answering now.
        `zoom_in` and `allow_padding`: see `InteractiveSession` (the released evaluation, clicktest, runs with
        zoom_in=False and allow_padding=True).
        """
        if sum(x is not None for x in (initial_mask, start, initial_clicks)) > 1:
            raise ValueError("give at most one of initial_mask, initial_clicks and start")
        engine = engine if engine is not None else self.click_engine_for(feats)
        if initial_mask is not None:
            start = SessionStart.from_mask(initial_mask, feats.geometry)
        elif initial_clicks is not None:
            prefix = InteractiveSession(self, feats, box, engine=engine, zoom_in=zoom_in, allow_padding=allow_padding)
            prefix.replay(initial_clicks)
            start = prefix.snapshot()
        return InteractiveSession(self, feats, box, start, engine=engine, zoom_in=zoom_in, allow_padding=allow_padding)

    def click_engine_for(self, feats: ImageFeatures) -> ClickEngine:
        """The engine that answers this image's clicks now: `engine`, or its torch fallback while the compiled
        model of the image's padded size is converted in the background. A session pins it (`session`)."""
        cache = self._ensure_cache(feats)
        ref = torch.from_numpy(initial_ref_label(feats.geometry.padded_size)).to(self.device)[None, None]
        return self.engine.answering(feats.pyramid[0], ref, cache)

    @torch.inference_mode()
    def predict_margin(self, feats: ImageFeatures, ref_label: np.ndarray, roi: Roi | None,
                       engine: ClickEngine | None = None) -> np.ndarray:
        """One interact step: logit1 - logit0 at the padded resolution, as float32 numpy (on `engine` when
        given, e.g. a session's pinned one)."""
        cache = self._ensure_cache(feats)
        rl = torch.from_numpy(ref_label).to(self.device)[None, None]
        margin = (engine or self.engine).margin(feats.pyramid[0], rl, cache, roi)
        check_finite(margin, "the click decoder produced a non-finite margin")
        return margin


def _mask_result(start: SessionStart, geometry: ImageGeometry) -> ClickResult:
    """A ClickResult that shows the start mask: margin +-1 on the canvas, mask/prob exactly the given mask."""
    result = ClickResult(np.where(start.prev_pred, 1.0, -1.0).astype(np.float32), geometry, ())
    result.__dict__["mask"] = start.mask.copy()  # cached_property slot: exact at the original size
    result.__dict__["prob"] = start.mask.astype(np.float32)
    return result


class InteractiveSession:
    """Click-by-click segmentation of one object. State: reference-label map, clicks, last prediction.

    zoom_in: the demo's feature-level zoom-in of the refine stages (spec §4.4; `ModelConfig.zoom_in`), on by
    default as in the demo and the backend; False runs every step on the whole map, as the released
    evaluation (`ClickSegmentor`, no zoom-in) does. A `box` needs it.
    allow_padding: clicks may also lie in the bottom/right padding of the network canvas (coordinates up to
    the padded size), as the released clicktest's simulator puts them; only for images at native size. Off,
    a click outside the image is an InvalidClickError.
    """

    def __init__(self, predictor: Predictor, feats: ImageFeatures, box: Roi | None = None,
                 start: SessionStart | None = None, engine: ClickEngine | None = None, zoom_in: bool = True,
                 allow_padding: bool = False) -> None:
        if box is not None:
            if not zoom_in:
                raise ValueError("a zoom-in box needs zoom_in=True")
            check_box(box, feats.geometry.original_size)
        if allow_padding and feats.geometry.resized:
            raise ValueError("clicks in the padding (allow_padding) need an image at native size; this predictor "
                             "resizes it (max_side)")
        self.zoom_in = bool(zoom_in)
        self.allow_padding = bool(allow_padding)
        self.predictor = predictor
        self.feats = feats
        self.engine = engine if engine is not None else predictor.click_engine_for(feats)  # runs every click
        self.geometry = feats.geometry
        self.box = box
        if start is None:
            start = SessionStart.blank(self.geometry)
        elif tuple(start.ref_label.shape) != tuple(self.geometry.padded_size):
            raise InvalidMaskError(f"the start state's canvas {tuple(start.ref_label.shape)} differs from the "
                                   f"image's padded canvas {tuple(self.geometry.padded_size)}")
        self.start = start
        if start.result is not None:
            self._start_result = start.result
        else:
            self._start_result = None if start.mask is None else _mask_result(start, self.geometry)
        self.reset()

    @property
    def clicks(self) -> list[Click]:
        return list(self._clicks)

    @property
    def ref_label(self) -> np.ndarray:
        return self._states[-1].ref_label

    @property
    def result(self) -> ClickResult | None:
        return self._states[-1].result

    def reset(self) -> None:
        """Back to the start state (blank, or the initial mask / reference-label map the session began with)."""
        self._clicks: list[Click] = []
        self._states = [_State(self.start.ref_label.copy(), self.start.prev_pred.copy(), self._start_result)]

    def snapshot(self) -> SessionStart:
        """The current state as a `SessionStart`: a session started from it answers the next clicks exactly
        as this one would (the clicks so far count for the zoom-in, the current prediction is shown)."""
        state = self._states[-1]
        mask = None if state.result is None else state.result.mask.copy()
        return SessionStart(state.ref_label.copy(), state.pred.copy(), mask,
                            tuple(self.start.clicks) + tuple(self._clicks), state.result)

    def to_network(self, row: int, col: int) -> tuple[int, int]:
        """Original-image pixel -> pixel of the (resized) network canvas; raises for clicks outside the image
        (with `allow_padding`: outside the padded canvas)."""
        if self.allow_padding:
            hp, wp = self.geometry.padded_size
            if not (0 <= row < hp and 0 <= col < wp):
                raise InvalidClickError(f"click ({row}, {col}) is outside the {hp}x{wp} padded canvas")
            return int(row), int(col)
        h0, w0 = self.geometry.original_size
        if not (0 <= row < h0 and 0 <= col < w0):
            raise InvalidClickError(f"click ({row}, {col}) is outside the {h0}x{w0} image")
        if not self.geometry.resized:
            return int(row), int(col)
        h, w = self.geometry.resized_size
        s = self.geometry.scale
        return min(int(math.floor((row + 0.5) * s)), h - 1), min(int(math.floor((col + 0.5) * s)), w - 1)

    def _roi(self, prev_pred: np.ndarray, ref_label: np.ndarray) -> Roi | None:
        model = self.predictor.model
        zc = model.config.zoom_in
        if not model.neck.has_refine or not zc.enabled or not self.zoom_in:
            return None
        if self.box is not None:
            s = self.geometry.scale
            left, up, right, bottom = self.box
            hp, wp = self.geometry.padded_size
            st = zc.max_stride
            return (max(0, int(left * s) // st * st), max(0, int(up * s) // st * st),
                    min(wp, -(-int(math.ceil(right * s)) // st) * st), min(hp, -(-int(math.ceil(bottom * s)) // st) * st))
        if len(self.start.clicks) + len(self._clicks) < zc.start_click:
            return None
        return zoom_in_roi(prev_pred, ref_label, zc.expand_ratio, zc.min_size, zc.max_stride)

    def add_click(self, row: int, col: int, positive: bool = True) -> ClickResult:
        """Add a click (original-image pixels) and return the new prediction."""
        r, c = self.to_network(row, col)
        prev = self._states[-1]
        ref = add_click_disk(prev.ref_label, r, c, bool(positive), self.predictor.model.config.clicks.inner_radius)
        self._clicks.append(Click(int(row), int(col), bool(positive)))
        self._states.append(self._step(ref, prev.pred))
        return self._states[-1].result

    def repredict(self) -> ClickResult:
        """Run the network again on the current state, without a new click, and return its prediction.

        The released clicktest runs a forward pass at every step, also when its simulator has no click to
        add: the reference-label map, already updated by the last prediction, goes in as it is, so the
        prediction can still change. The new state replaces the current one (undo still removes the last
        click; `replay` does not repeat re-predictions)."""
        state = self._states[-1]
        self._states[-1] = self._step(state.ref_label, state.pred)
        return self._states[-1].result

    def _step(self, ref: np.ndarray, prev_pred: np.ndarray) -> _State:
        """One forward pass on reference map `ref` (previous prediction `prev_pred` for the zoom-in), and the
        state it leads to: the prediction and the map it updates."""
        margin = self.predictor.predict_margin(self.feats, ref, self._roi(prev_pred, ref), self.engine)
        result = ClickResult(margin, self.geometry, tuple(self._clicks))
        pred = result.padded_mask
        return _State(update_by_prediction(ref, pred), pred, result)

    def undo(self) -> ClickResult | None:
        """Remove the last click; returns the prediction before it (with no click left: the initial mask's
        result for a session started from a mask, else None)."""
        if not self._clicks:
            return self._states[-1].result
        self._clicks.pop()
        self._states.pop()
        return self._states[-1].result

    def replay(self, clicks: Sequence[Click | tuple]) -> ClickResult | None:
        """Rebuild the state from a click list (e.g. after a restart); same results as clicking anew."""
        self.reset()
        result = None
        for click in clicks:
            result = self.add_click(*click)
        return result

    def matches_prefix(self, clicks: Sequence[Click | tuple]) -> bool:
        """True when `clicks` starts with this session's clicks (so only the rest must be added)."""
        own = self._clicks
        return len(clicks) >= len(own) and all(Click(*a) == b for a, b in zip(clicks, own))
