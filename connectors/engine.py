"""What a serving process does with one region's clicks: features by id -> interact -> brush RLE.

`SegmentEngine` is the body of a CPU serving actor. It loads the interact part of the model once,
opens the feature table once, keeps LRUs of decoded features and per-region sessions bounded in bytes,
and answers a `SegmentRequest` with RLE (or polygons) + score only; a region's session starts from
the mask on screen under its first click when the request carries one (onscreen.py), or continues after
the clicks that made it when a pre-annotation stored them (region_meta.py). `OnDemandEncoder`
is the body of the encoder actor: it fetches an image that has no features yet (only from allowed
sources, pipeline/image_access.py), encodes it on CPU and stores the row, so that the engine can answer,
slower, instead of failing.
A request's coordinates (clicks, box, masks on screen, a region's stored clicks) are in the grid Label Studio
shows, which is the stored pixel grid turned by the file's EXIF orientation tag; the features are of the stored
grid. The engine maps the request into the stored grid and the mask back (pipeline/orientation.py), using the
tag the encoder recorded with the features.
Both are plain classes so that they run the same inside Ray actors and in-process.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import lance
import numpy as np

from interformer.click_engine import ClickEngine, ClickEngineConfig
from interformer.config import PreprocessConfig
from interformer.encode_engine import check_encode_names
from interformer.features import ImageFeatures, ImageGeometry
from interformer.predictor import InteractiveSession, Predictor, mask_to_canvas, set_cpu_threads
from pipeline.encoding import EncoderSpec, build_predictor, check_encode_memory
from pipeline.feature_store import (
    EncodedImage,
    FeatureReader,
    FeatureStore,
    FeatureStoreError,
    RowIdentity,
    UnknownImageError,
    encoder_provenance,
    feature_rows,
    is_not_found,
    lance_reason,
    row_identity,
    sql_string,
    table_uri,
)
from pipeline.image_access import ImageAccess, ImageAccessError, read_image_bytes
from pipeline.images import TOO_LARGE, ImageDecodeError, decode_image_oriented
from pipeline.metrics import iou
from pipeline.orientation import Orientation, normalize_tag
from pipeline.polygons import mask_to_polygons

from .logs import get_logger, log_event
from .memory import ByteLRU, buffer_bytes
from .onscreen import OnScreenStart, candidates_digest, start_region
from .region_meta import REFINE_STARTS, model_key
from .rle import mask_to_rle
from .segment import EncodeFirst, SegmentError, SegmentRequest, SegmentResult
from .sessions import SessionStore

MIB = 1024 * 1024
REPLAY_AGREEMENT = 0.95  # IoU a pre-annotation's replayed clicks must reach against the mask on screen
MAX_ALIASES = 100_000  # task image id / reference -> stored id lookups an engine remembers

log = get_logger("engine")


@dataclass(frozen=True)
class EngineConfig:
    """Everything a serving or encoder actor needs; built once by the command line."""

    db: str  # LanceDB root holding the feature table
    table: str
    checkpoint: str | None  # None: the seeded random init jobs/encode.py builds without a checkpoint
    variant: str | None = None  # checked against the checkpoint when given; required without one
    seed: int = 0  # of the random init (no checkpoint), as jobs/encode.py --seed
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    feature_cache_bytes: int = 256 * MIB  # decoded features (and the model's cache of them) an actor keeps
    session_cache_bytes: int = 512 * MIB  # interactive sessions an actor keeps, each with its click states
    threads: int = 1  # torch intra-op threads per actor
    access: ImageAccess = field(default_factory=ImageAccess)  # where on-demand encoding may read images
    click_engine: ClickEngineConfig = field(default_factory=ClickEngineConfig)  # what runs each click
    refine_from: str = "clicks"  # a pre-annotated region: continue its meta's clicks, or "mask" alone (REFINE_STARTS)
    encode_engine: str = "torch"  # what encodes images on demand (interformer.encode_engine; fp32 either way)

    def __post_init__(self) -> None:
        if self.refine_from not in REFINE_STARTS:
            raise ValueError(f"refine_from must be one of {REFINE_STARTS}, got {self.refine_from!r}")
        check_encode_names(self.encode_engine, "fp32")


def _load_predictor(cfg: EngineConfig, interact_only: bool) -> Predictor:
    """The model exactly as jobs/encode.py builds it (same weights, same fingerprint), on CPU."""
    spec = EncoderSpec(checkpoint=cfg.checkpoint, variant=cfg.variant, preprocess=cfg.preprocess, seed=cfg.seed,
                       threads=cfg.threads, engine=cfg.encode_engine, engine_cache=cfg.click_engine.cache_dir)
    set_cpu_threads(cfg.threads)
    predictor = build_predictor(spec, device="cpu", engine=cfg.click_engine)
    if interact_only:
        # A serving actor never encodes: free the ViT and the training-only auxiliary head.
        predictor.model.backbone = None
        predictor.model.auxiliary_head = None
    return predictor


EncodeMissing = Callable[[str, str, "int | None"], dict]  # (image_id, image_ref, task_id) -> info


def size_mismatch(image_id: str, shown: tuple[int, int], stored: tuple[int, int], tag: int | None = None) -> str:
    """Why Label Studio's size of an image (H, W) differs from the size its features show at: `stored` is the
    stored pixel grid and `tag` the EXIF orientation the encoder recorded (None: a row stored before the tag
    was recorded, then compared as the stored grid). A transposed size with no recorded tag is what a photo
    with a 90-degree EXIF tag gives (browsers show it turned): encoding it again records the tag."""
    text = (f"Label Studio sizes image {image_id!r} at {shown[1]}x{shown[0]} (WxH) but its features were computed "
            f"at {stored[1]}x{stored[0]}")
    if tag is not None and normalize_tag(tag) != 1:
        expected = Orientation(tuple(stored), normalize_tag(tag)).displayed_size
        text += f", which its EXIF orientation tag {tag} shows at {expected[1]}x{expected[0]}"
    if tag is None and tuple(shown) == tuple(stored)[::-1]:
        return (text + ": the file probably carries an EXIF orientation tag, which the browser applies, and its "
                "features were stored before the encoder recorded the tag; re-encode the image (remove its row "
                "and run jobs/encode.py again) so that its orientation is recorded, or rotate the pixels of the "
                "file itself (e.g. `exiftran -ai`), re-import it and re-encode it (--check-content "
                "--reencode-changed)")
    return text + ": is the task pointing at another file?"


class SegmentEngine:
    """Interact part of the model + feature reader + sessions; one per serving actor."""

    def __init__(self, cfg: EngineConfig, encode_missing: EncodeMissing | None = None) -> None:
        self.cfg = cfg
        self.predictor = _load_predictor(cfg, interact_only=True)
        self.fingerprint = self.predictor.fingerprint
        self.model_key = model_key(self.fingerprint)
        self.reader = FeatureReader(cfg.db, self.fingerprint, table=cfg.table)
        self.features: ByteLRU[ImageFeatures] = ByteLRU(cfg.feature_cache_bytes, buffer_bytes)
        self.sessions = SessionStore(cfg.session_cache_bytes)
        self.encode_missing = encode_missing
        self._uri_ds: lance.LanceDataset | None = None
        self._uri_to_id: OrderedDict[str, str] = OrderedDict()  # task image reference -> stored image id
        self._aliases: OrderedDict[tuple[str, str], str] = OrderedDict()  # (task image_id, reference) -> stored id
        self._start_sources: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> its start
        self._start_ids: OrderedDict[tuple, tuple] = OrderedDict()  # region key -> ((candidates, click), start identity)
        self._identity: dict[str, RowIdentity] = {}  # image id -> the row its cached features / sessions came from
        self._orientation: dict[str, int | None] = {}  # image id -> its row's EXIF orientation (None: unknown)
        self._checked_version = self.reader.version  # the table version `_identity` was last checked against

    def segment(self, req: SegmentRequest) -> SegmentResult:
        """Answer one request; SegmentError (4xx) for requests that cannot be answered."""
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        if not req.clicks:
            raise SegmentError(422, "no clicks to segment")
        _check_text(req.image_id, "image_id")
        _check_text(req.image_ref, "image reference")
        feats, on_demand, image_id = self._features(req, t)
        t1 = time.perf_counter()
        tag = self._orientation.get(image_id)
        view = Orientation(tuple(feats.geometry.original_size), normalize_tag(tag))
        if view.displayed_size != tuple(req.original_size):
            raise SegmentError(422, size_mismatch(image_id, tuple(req.original_size),
                                                  tuple(feats.geometry.original_size), tag))
        starts: dict = {}
        key = (image_id, req.task_id, req.region_key)
        identity, found = self._start_identity(key, req, starts)
        try:
            clicks, box = view.clicks_to_stored(req.clicks), view.box_to_stored(req.box)
            # The click engine answering this image's size now: torch until a background conversion is ready.
            click_engine = self.predictor.click_engine_for(feats)
            # Everything a session bakes in besides the clicks: a change starts another session, so that the
            # answer is the model's for this request whatever the region's earlier requests chose.
            variant = (box, identity, click_engine.name)
            outcome = self.sessions.run(
                key, clicks, lambda: self._new_session(feats, req, found, click_engine, starts, view), variant=variant,
            )
        except ValueError as e:  # InvalidClickError and friends
            raise SegmentError(422, str(e)) from None
        self.features.remeasure(image_id)  # the first session adds the model's cache to the features
        start, start_kind = self._start_sources.get(outcome.session, ("blank", "blank"))
        result = outcome.result
        mask = result.mask
        if box is not None:
            left, up, right, bottom = box
            bounded = np.zeros_like(mask)
            bounded[up:bottom, left:right] = mask[up:bottom, left:right]
            mask = bounded
        score = mask_score(result.margin, feats.geometry, mask)
        mask = view.mask_to_displayed(mask)  # Label Studio draws it on the grid the browser shows
        t2 = time.perf_counter()
        rle, polygons, polygon_iou = [], None, None
        if req.output == "polygonlabels":
            polys = mask_to_polygons(mask)
            polygons, polygon_iou = polys.label_studio_points(), polys.iou
        else:
            rle = mask_to_rle(mask)
        t3 = time.perf_counter()
        t.update(interact=(t2 - t1) * 1e3, actor_total=(t3 - t0) * 1e3, **starts)
        t["polygon" if polygons is not None else "rle"] = (t3 - t2) * 1e3
        return SegmentResult(rle=rle, score=score, image_id=image_id, path=outcome.path, steps=outcome.steps,
                             area=int(mask.sum()), timings_ms=t, encoded_on_demand=on_demand, start=start, start_kind=start_kind,
                             polygons=polygons, polygon_iou=polygon_iou)

    def _start_identity(self, key: tuple, req: SegmentRequest,
                        timings: dict) -> tuple[Hashable, Callable[[], OnScreenStart | None]]:
        """The identity of the request's on-screen start (None: blank) and a function giving the start itself.

        The identity chosen for the region's (candidates, first positive click) is remembered, so a request that
        keeps both decodes nothing unless a new session must be made."""
        if req.start is None:
            return None, lambda: None
        first = next((c for c in req.clicks if c.positive), None)
        memo = (candidates_digest(req.start), first)
        known = self._start_ids.get(key)
        decoded: list = []

        def found() -> OnScreenStart | None:
            if not decoded:
                t0 = time.perf_counter()
                decoded.append(start_region(req.start, req.clicks))
                timings["start_mask"] = timings.get("start_mask", 0.0) + (time.perf_counter() - t0) * 1e3
            return decoded[0]

        if known is not None and known[0] == memo:
            return known[1], found
        start = found()
        identity = None if start is None else start.identity
        _remember(self._start_ids, key, (memo, identity))
        return identity, found

    def _new_session(self, feats: ImageFeatures, req: SegmentRequest, start: Callable[[], OnScreenStart | None],
                     click_engine: ClickEngine, timings: dict, view: Orientation) -> InteractiveSession:
        """A session for the region: after the clicks that made the on-screen region under its first positive
        click (`found`; when its meta has them, for this model, and they reproduce it), else from that region's
        mask, else blank. The session is kept while the request's start identity stays the same (its variant).
        What is on screen is in the displayed grid: `view` maps it into the features' stored grid."""
        found = start()
        t0 = time.perf_counter()
        session, kind = None, "blank"
        mask = None if found is None else view.mask_to_stored(found.mask)
        if (found is not None and found.clicks is not None and self.cfg.refine_from == "clicks" and req.box is None
                and found.clicks.model == self.model_key):
            replayed = self.predictor.session(feats, initial_clicks=view.clicks_to_stored(found.clicks.clicks),
                                              engine=click_engine)
            if iou(mask, replayed.result.mask) >= REPLAY_AGREEMENT:
                session, kind = replayed, "clicks"
        if session is None:
            session = self.predictor.session(feats, box=view.box_to_stored(req.box), initial_mask=mask,
                                             engine=click_engine)
            kind = "blank" if found is None else "mask"
        source = "blank" if found is None else req.start.source
        self._start_sources[session] = (source, kind)
        if req.start is not None:
            timings["start_mask"] = timings.get("start_mask", 0.0) + (time.perf_counter() - t0) * 1e3
            log_event(log, "session start", image_id=req.image_id, region=req.region_key, start=source,
                      start_kind=kind, replayed=len(session.start.clicks), candidates=len(req.start.shapes))
        return session

    def _features(self, req: SegmentRequest, t: dict) -> tuple[ImageFeatures, bool, str]:
        """The features of the task's image: stored under its image_id, else under its reference (a row whose
        `uri` is the reference), else encoded on demand and stored under the reference.

        On-demand rows are keyed by the reference, never by the task's image_id: an image_id is only as unique
        as the project that chose it, so a task in another project reusing the id for another picture must not
        get (or poison) this one's features."""
        t0 = time.perf_counter()
        alias = (req.image_id, req.image_ref) if req.image_id is not None and req.image_ref else None
        for image_id in self._candidates(req, alias):
            feats = self._stored(image_id)
            if feats is not None:
                if alias is not None and image_id != req.image_id:
                    _remember(self._aliases, alias, image_id)
                t["fetch"] = (time.perf_counter() - t0) * 1e3
                return feats, False, image_id
        if req.image_id is not None:
            miss = f"image {req.image_id!r} has no stored features for this backend's model"
        else:
            miss = "the task's image has no stored features for this backend's model"
        if self.encode_missing is None or not req.image_ref:
            why = "on-demand encoding is off" if self.encode_missing is None else "the task has no image URL"
            raise SegmentError(404, f"{miss}; {why}, so it cannot be encoded now")
        new_id = req.image_ref
        self.reader.refresh()
        feats = self._stored(new_id, cache=False)  # stored since this reader looked: by the encoder actor
        info = None
        if feats is None:
            log_event(log, "encoding on demand", image_id=new_id, task_image_id=req.image_id,
                      image_ref=req.image_ref)
            t1 = time.perf_counter()
            with _unexpected(502, "the task's image could not be encoded on demand", image_id=new_id):
                info = self.encode_missing(new_id, req.image_ref, req.task_id)
            t["encode"] = (time.perf_counter() - t1) * 1e3
            self.reader.refresh()
            feats = self._stored(new_id, cache=False)
            if feats is None:
                raise SegmentError(500, "the image was encoded but its features cannot be read back")
        self.features.put(new_id, feats)
        self.sessions.drop_image(new_id)
        _remember(self._uri_to_id, req.image_ref, new_id)
        if alias is not None:
            _remember(self._aliases, alias, new_id)
        t["fetch"] = (time.perf_counter() - t0) * 1e3 - t.get("encode", 0.0)
        if info is not None:
            log_event(log, "encoded on demand", image_id=new_id, encode_ms=round(t["encode"], 1), **info)
        return feats, True, new_id

    def _stored(self, image_id: str, cache: bool = True) -> ImageFeatures | None:
        """Features stored under `image_id` (from the LRU, else the table), or None when there are none. The
        LRU only answers with the row the table holds at the version the reader sees (`_drop_replaced`)."""
        with _unexpected(500, "the stored features of the task's image could not be read", image_id=image_id):
            self._drop_replaced()
        feats = self.features.get(image_id) if cache else None
        if feats is not None:
            return feats
        try:
            with _unexpected(500, "the stored features of the task's image could not be read", image_id=image_id):
                record = self.reader.get_record(image_id)
        except UnknownImageError as e:  # its message names the table's path: for the log only
            log_event(log, "no stored features", image_id=image_id, reason=str(e))
            return None
        if self._identity.get(image_id, row_identity(record)) != row_identity(record):
            self.sessions.drop_image(image_id)  # sessions over the row this one replaced
        self._identity[image_id] = row_identity(record)
        self._orientation[image_id] = record.exif_orientation
        self.features.put(image_id, record.features)
        if len(self._identity) > MAX_ALIASES:  # bounded: forget ids whose features and sessions are all evicted
            held = set(self.features.keys()) | self.sessions.image_ids()
            self._identity = {i: v for i, v in self._identity.items() if i in held}
            self._orientation = {i: v for i, v in self._orientation.items() if i in held}
        return record.features

    def _drop_replaced(self) -> None:
        """Forget cached features and sessions whose row the table no longer holds.

        `jobs/encode.py --reencode-changed` removes an image's row and stores a new one under the same id:
        whenever the reader moves to a new table version, the ids this engine holds are re-checked (one
        indexed query) against the identity (content hash, creation time, EXIF tag) of the row they were read
        from; `--check-content` filling in a legacy row's tag counts as a replacement, so the tag is read again."""
        version = self.reader.refresh_if_due()
        if version == self._checked_version:
            return
        self._checked_version = version
        held = set(self.features.keys()) | self.sessions.image_ids()
        for image_id in [i for i in self._identity if i not in held]:
            del self._identity[image_id]
            self._orientation.pop(image_id, None)
        if not self._identity:
            return
        current = self.reader.identities(self._identity)
        for image_id, identity in list(self._identity.items()):
            if current.get(image_id) != identity:
                log_event(log, "stored features replaced", image_id=image_id,
                          now="removed" if image_id not in current else "re-encoded")
                self.features.pop(image_id)
                self.sessions.drop_image(image_id)
                del self._identity[image_id]
                self._orientation.pop(image_id, None)

    def _candidates(self, req: SegmentRequest, alias: tuple[str, str] | None):
        """Stored ids that may hold the task's image, best first, each computed only when the one before missed:
        where this (image_id, reference) was found before, the image_id, the row whose uri is the reference."""
        seen = set()
        for lookup in (lambda: self._aliases.get(alias) if alias else None, lambda: req.image_id,
                       lambda: self._lookup_uri(req.image_ref)):
            image_id = lookup()
            if image_id is not None and image_id not in seen:
                seen.add(image_id)
                yield image_id

    def _lookup_uri(self, image_ref: str | None) -> str | None:
        """Image id of the row whose `uri` is the task's image URL/path (this encoder's rows only)."""
        if not image_ref:
            return None
        if image_ref in self._uri_to_id:
            return self._uri_to_id[image_ref]
        where = f"uri = {sql_string(image_ref)} AND fingerprint = {sql_string(self.fingerprint)}"
        for attempt in range(2):
            try:
                if self._uri_ds is None:
                    self._uri_ds = lance.dataset(table_uri(self.cfg.db, self.cfg.table))
                elif attempt:
                    self._uri_ds.checkout_latest()
                ids = self._uri_ds.to_table(columns=["image_id"], filter=where).column("image_id").to_pylist()
            except (OSError, ValueError, RuntimeError) as e:
                if attempt and not is_not_found(e):  # the table exists but cannot be read: an error, not a miss
                    with _unexpected(500, "the stored features of the task's image could not be read"):
                        raise FeatureStoreError(f"the feature table cannot be read: {lance_reason(e)}") from None
                ids = []
            if ids:
                _remember(self._uri_to_id, image_ref, ids[0])
                return ids[0]
        return None


def _remember(table: OrderedDict, key, value: str) -> None:
    """Put `key` -> `value` in a bounded LRU of lookups (MAX_ALIASES entries)."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_ALIASES:
        table.popitem(last=False)


def _check_text(value: str | None, what: str) -> None:
    """422 for task text that cannot be stored or looked up (a lone surrogate has no UTF-8 form)."""
    if value is not None and any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
        raise SegmentError(422, f"the task's {what} is not valid Unicode (it has a lone surrogate); fix the task data")


class _unexpected:
    """Turn an unexpected exception into a SegmentError with a fixed message and an error id, logged with its
    traceback: the message never carries table paths, hosts or Ray internals. SegmentError and
    UnknownImageError pass through, as does EncodeFirst (a serving actor asking its caller to encode)."""

    def __init__(self, status: int, message: str, **fields) -> None:
        self.status, self.message, self.fields = status, message, fields

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, (SegmentError, UnknownImageError, EncodeFirst)) \
                or not isinstance(exc, Exception):
            return False
        error_id = uuid.uuid4().hex[:12]
        log.error("%s (error id %s)", self.message, error_id, exc_info=(kind, exc, tb),
                  extra={"fields": {"error_id": error_id, **self.fields}})
        raise SegmentError(self.status, f"{self.message}; the backend's log has the details (error id {error_id})"
                           ) from None


def mask_score(margin: np.ndarray, g: ImageGeometry, mask: np.ndarray) -> float:
    """Mean foreground probability over the returned mask (bool, original size: a box prompt's is cut to the
    box), from the margin on the padded canvas of geometry `g`: the mask is taken to the network canvas (nearest,
    as a start mask is), so a rescaled image (--max-side) scores the mask it returns, not the whole canvas; its
    canvas pixels of positive margin, else all its canvas pixels, else (a mask too small to cover one canvas
    pixel centre) the canvas pixels its own pixels fall in. 0 exactly for an empty mask."""
    if not mask.any():
        return 0.0
    h, w = g.resized_size
    m = margin[:h, :w]
    canvas = mask_to_canvas(mask, g)[:h, :w]
    pos = canvas & (m > 0)
    if pos.any():
        values = m[pos]
    elif canvas.any():
        values = m[canvas]
    else:
        rows, cols = np.nonzero(mask)
        oh, ow = mask.shape
        values = m[np.minimum(rows * h // oh, h - 1), np.minimum(cols * w // ow, w - 1)]
    return float(np.mean(1.0 / (1.0 + np.exp(-values.astype(np.float64)))))


class OnDemandEncoder:
    """Fetch (allowed sources only), decode, encode on CPU and store images that have no features yet."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.predictor = _load_predictor(cfg, interact_only=False)
        self.fingerprint = self.predictor.fingerprint
        self.store = FeatureStore(cfg.db, cfg.table)
        self.encoder_name = self._prepare()

    def _prepare(self) -> str:
        """Build the encoder at start (an OpenVINO conversion, ~20 s once per machine for Light, ~1 s from its
        cache), not in an annotator's first request; the name of what runs it."""
        t0 = time.perf_counter()
        encoder = self.predictor.encoder
        name = encoder.name if encoder.prepare() else f"torch-fp32 (the fallback of {encoder.name})"
        log_event(log, "on-demand encoder ready", encoder=name, seconds=round(time.perf_counter() - t0, 2))
        return name

    def encode(self, image_id: str, image_ref: str, task_id: int | None = None) -> dict:
        """Make sure `image_id` has features in the table; returns timings and sizes for the log."""
        if self.store.dataset().count_rows(
            f"image_id = {sql_string(image_id)} AND fingerprint = {sql_string(self.fingerprint)}"
        ):
            return {"already_stored": True}
        t0 = time.perf_counter()
        try:
            data = read_image_bytes(image_ref, self.cfg.access, task_id)
            image, orientation = decode_image_oriented(data, self.cfg.preprocess.max_pixels)
            check_encode_memory(image.shape[:2], self.cfg.preprocess, self.predictor.model.config.vit)
        except ImageAccessError as e:
            raise SegmentError(e.status, f"the task's image has no features and cannot be read: {e.message}") from None
        except ImageDecodeError as e:  # its detail may quote the file's first bytes: only the reason goes out
            log_event(log, "image cannot be decoded", level=30, image_id=image_id, reason=e.reason, detail=e.detail)
            detail = f" ({e.detail})" if e.reason == TOO_LARGE else ""
            raise SegmentError(422, f"the task's image has no features and is not a usable image: "
                                    f"{e.reason}{detail}") from None
        t1 = time.perf_counter()
        feats = self.predictor.encode(image)
        t2 = time.perf_counter()
        item = EncodedImage(image_id, image_ref, hashlib.sha256(data).hexdigest(), feats, orientation)
        self.store.add(feature_rows([item], self.fingerprint, encoder=encoder_provenance(self.predictor)))
        t3 = time.perf_counter()
        return {"fetch_image_ms": round((t1 - t0) * 1e3, 1), "vit_ms": round((t2 - t1) * 1e3, 1),
                "store_ms": round((t3 - t2) * 1e3, 1), "height": image.shape[0], "width": image.shape[1],
                "exif_orientation": orientation}


class InProcessSegmenter:
    """A `Segmenter` running one engine in this process (worker thread): for tests and comparisons."""

    def __init__(self, cfg: EngineConfig, encode_on_demand: bool = True) -> None:
        self._encoder = OnDemandEncoder(cfg) if encode_on_demand else None
        self.engine = SegmentEngine(cfg, self._encoder.encode if self._encoder else None)
        self._lock = threading.Lock()

    def _run(self, req: SegmentRequest) -> SegmentResult:
        with self._lock:
            return self.engine.segment(req)

    async def segment(self, req: SegmentRequest) -> SegmentResult:
        return await asyncio.to_thread(self._run, req)

    def ready(self) -> bool:
        return True
