"""Turning object prompts into masks from stored features: the body of a bulk pre-annotation worker.

`segment_object` runs one object: a box or given points are replayed as clicks (a box also bounds
the mask, as in the Label Studio backend); a coarse mask drives RITM's click simulator
(`pipeline.clicker.ritm_next_click`) until the mask reaches `target_iou` against it or `max_clicks`
clicks were made, and the best mask seen is kept. `PreannotateWorker` holds the model (interact part
only, unless it may encode), a feature reader opened once, and answers one `ImageJob` at a time with
an `ImageResult`: masks as COCO compressed RLE or, with `MaskFormat("polygon")`, as COCO polygons
(`pipeline.polygons`, converted here so the mask never leaves the worker) with their IoU against the
mask; never feature tensors.

Masks, clicks and sizes in results are in the image's STORED pixel grid, as the features and COCO files are;
each `ImageResult` carries the file's EXIF orientation tag, so that the Label Studio side shows them on the
grid the browser shows (connectors/label_studio_prompts.py). Prompts read from Label Studio are drawn on that
displayed grid: the worker maps them into the stored grid first (`prompt_to_stored`, pipeline/orientation.py).
"""
from __future__ import annotations

import hashlib
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from interformer.clicks import Click
from interformer.click_engine import ClickEngineConfig
from interformer.predictor import ClickResult, InteractiveSession, InvalidClickError, Predictor, set_cpu_threads

from .clicker import mark_clicked, new_not_clicked, ritm_next_click
from .faults import fault_point
from .metrics import iou
from .orientation import Orientation, normalize_tag
from .polygons import DEFAULT_TOLERANCE, MaskPolygons, mask_to_polygons
from .prompts import (
    BAD_POINTS,
    IMAGE_UNREADABLE,
    INTERNAL_ERROR,
    NO_FEATURES,
    RETRYABLE,
    SIZE_MISMATCH,
    WORKER_DIED,
    ImageJob,
    ObjectPrompt,
    decode_rle,
    encode_mask,
)


@dataclass(frozen=True)
class ClickPolicy:
    """When the click simulator stops on a coarse mask: at `target_iou` against it or after `max_clicks`."""

    target_iou: float = 0.9
    max_clicks: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.target_iou <= 1.0:
            raise ValueError(f"target IoU must be in (0, 1], got {self.target_iou}")
        if self.max_clicks < 1:
            raise ValueError(f"max clicks must be at least 1, got {self.max_clicks}")


MASK_FORMATS = ("rle", "polygon")


@dataclass(frozen=True)
class MaskFormat:
    """How a worker delivers masks: "rle" (COCO compressed RLE) or "polygon" (COCO polygons, simplified to
    within `tolerance` pixels, less where the IoU against the mask would fall below 0.98)."""

    kind: str = "rle"
    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if self.kind not in MASK_FORMATS:
            raise ValueError(f"mask format must be one of {MASK_FORMATS}, got {self.kind!r}")
        if not np.isfinite(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"polygon tolerance must be a finite number of pixels >= 0, got {self.tolerance}")


@dataclass
class ObjectResult:
    """One object's outcome. status "ok" carries the mask (COCO compressed RLE at the image size, or COCO
    `polygons` in pixels with `polygon_iou`, their IoU against the mask, and no RLE), the clicks that made
    it ([row, col, positive]), the IoU against the coarse label when there is one, the mean foreground
    probability over the mask (score) and `steps`, the interact steps run (the simulator may click past
    the best mask); "failed" carries a reason code and detail."""

    key: str
    image_id: str
    label: str
    kind: str
    status: str
    category_id: int | None = None
    reason: str | None = None
    detail: str | None = None
    clicks: list[list[int]] = field(default_factory=list)
    steps: int = 0
    iou: float | None = None
    score: float | None = None
    area: int = 0
    bbox: list[float] | None = None
    rle: dict | None = None
    notes: list[str] = field(default_factory=list)
    ms: float = 0.0
    polygons: list[list[float]] | None = None
    polygon_iou: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def segmentation(self) -> dict | list[list[float]] | None:
        """The COCO `segmentation` of the mask: its polygons when delivered as polygons, else its RLE."""
        return self.polygons if self.polygons is not None else self.rle

    def mask_polygons(self, size: tuple[int, int]) -> MaskPolygons:
        """The delivered polygons as `pipeline.polygons.MaskPolygons` of an image of `size` (H, W), for their
        other forms (Label Studio points); hole count and tolerance are not kept (0, NaN)."""
        if self.polygons is None:
            raise ValueError(f"object {self.key!r} was delivered as RLE, not as polygons")
        rings = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in self.polygons]
        return MaskPolygons(rings, (int(size[0]), int(size[1])), float(self.polygon_iou or 0.0), 0, float("nan"))

    @classmethod
    def failure(cls, prompt: ObjectPrompt, reason: str, detail: str) -> "ObjectResult":
        return cls(prompt.key, prompt.image_id, prompt.label, prompt.kind, "failed", prompt.category_id, reason,
                   detail, notes=list(prompt.notes))


@dataclass
class ImageResult:
    """All objects of one image job (`key`, see ImageJob.key); `digest` identifies the prompts they answer."""

    key: str
    image_id: str
    digest: str
    size: list[int]
    objects: list[ObjectResult]
    encoded_on_the_fly: bool = False
    ms: float = 0.0  # wall time in the worker
    cpu_ms: float = 0.0  # CPU time of the worker process meanwhile (all its threads)
    exif_orientation: int | None = None  # the image file's EXIF tag (1..8) as stored with its features; None: unknown
    feature_row: list | None = None  # [table id, content_sha256, created_at ISO] of the feature row the masks come
    # from; None: none was read (or a ledger written before rows were recorded)

    @property
    def final(self) -> bool:
        """True unless some object failed for a reason a later run may not meet again."""
        return not any(o.reason in RETRYABLE for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageResult":
        objects = [ObjectResult(**o) for o in d["objects"]]
        row = d.get("feature_row")
        return cls(d["key"], d["image_id"], d["digest"], list(d["size"]), objects,
                   bool(d.get("encoded_on_the_fly")), float(d.get("ms", 0.0)), float(d.get("cpu_ms", 0.0)),
                   d.get("exif_orientation"), list(row) if row else None)

    def features_changed(self, identities: dict[str, Any]) -> bool:
        """Whether the feature row these masks come from is no longer the one stored under its id (re-encoded,
        or gone); `identities` is `FeatureReader.identities` of `feature_row[0]`. A result without a recorded
        row cannot tell and counts as unchanged."""
        if not self.feature_row:
            return False
        row_id, sha256, created_at = self.feature_row
        now = identities.get(row_id)
        return now is None or (now[0], now[1].isoformat(), now[2]) != (sha256, created_at, self.exif_orientation)


def lost_image(job: ImageJob, error: BaseException) -> ImageResult:
    """The result of an image whose every worker died with it: each object failed as `worker_died` (not final,
    so a later run tries again), the error named, the run going on with the other images."""
    detail = f"every worker that took this image died ({type(error).__name__}: {str(error).splitlines()[0][:300]})"
    return ImageResult(job.key, job.image_id, job.digest(), list(job.size),
                       [ObjectResult.failure(p, WORKER_DIED, detail) for p in job.objects])


def mask_score(prob: np.ndarray, mask: np.ndarray) -> float:
    """Mean foreground probability over the mask (0 for an empty mask)."""
    return float(prob[mask].mean()) if mask.any() else 0.0


def bound_to_box(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Zero the mask outside the (left, up, right, bottom) region."""
    left, up, right, bottom = box
    out = np.zeros_like(mask)
    out[up:bottom, left:right] = mask[up:bottom, left:right]
    return out


def simulate_clicks(session: InteractiveSession, target: np.ndarray, policy: ClickPolicy) -> tuple[list[Click], ClickResult, float]:
    """RITM's robot user against `target` (bool mask): click until IoU >= target_iou or max_clicks.

    Returns the clicks of the best mask seen (the first to reach the best IoU), that mask's result and IoU;
    `session.clicks` holds every click made.
    """
    gt = target.astype(np.int8)
    pred = np.zeros(gt.shape, dtype=bool)
    not_clicked = new_not_clicked(gt.shape)
    best: tuple[int, ClickResult, float] | None = None
    for n in range(1, policy.max_clicks + 1):
        click = ritm_next_click(gt, pred, not_clicked)
        mark_clicked(not_clicked, click)
        result = session.add_click(click.row, click.col, click.positive)
        pred = result.mask
        score = iou(gt, pred)
        if best is None or score > best[2]:
            best = (n, result, score)
        if score >= policy.target_iou:
            break
    n, result, score = best  # type: ignore[misc]
    return session.clicks[:n], result, score


def segment_object(predictor: Predictor, feats: Any, prompt: ObjectPrompt, policy: ClickPolicy,
                   output: MaskFormat = MaskFormat()) -> ObjectResult:
    """One object's mask from its prompt, delivered as `output` says; a click outside the image is a
    BAD_POINTS failure."""
    from pycocotools import mask as mask_utils

    t0 = time.perf_counter()
    coarse = decode_rle(prompt.coarse) if prompt.coarse is not None else None
    session = predictor.session(feats, box=prompt.box)
    try:
        if prompt.kind == "mask":
            clicks, result, _ = simulate_clicks(session, coarse, policy)
        else:
            result = session.replay(prompt.clicks)
            clicks = list(prompt.clicks)
        steps = len(session.clicks)
    except InvalidClickError as e:
        return ObjectResult.failure(prompt, BAD_POINTS, str(e))
    mask = result.mask
    if prompt.box is not None:
        mask = bound_to_box(mask, prompt.box)
    rle = encode_mask(mask)
    coco_rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    polygons = polygon_iou = None
    if output.kind == "polygon":
        polys = mask_to_polygons(mask, output.tolerance)
        polygons, polygon_iou, rle = polys.coco(), round(float(polys.iou), 6), None
    return ObjectResult(
        key=prompt.key, image_id=prompt.image_id, label=prompt.label, kind=prompt.kind, status="ok",
        category_id=prompt.category_id,
        clicks=[[int(c.row), int(c.col), int(bool(c.positive))] for c in clicks],
        steps=steps,
        iou=round(float(iou(coarse.astype(np.int8), mask)), 6) if coarse is not None else None,
        score=round(mask_score(result.prob, mask), 6),
        area=int(mask.sum()),
        bbox=[float(v) for v in mask_utils.toBbox(coco_rle)],
        rle=rle,
        notes=list(prompt.notes),
        ms=round((time.perf_counter() - t0) * 1e3, 3),
        polygons=polygons,
        polygon_iou=polygon_iou,
    )


def prompt_to_stored(prompt: ObjectPrompt, view: Orientation) -> ObjectPrompt:
    """A prompt drawn on the displayed grid of `view` (a Label Studio region) in the features' stored grid:
    clicks, box and coarse mask mapped exactly; ValueError for a click outside the displayed grid."""
    if view.identity:
        return prompt
    coarse = None if prompt.coarse is None else encode_mask(view.mask_to_stored(decode_rle(prompt.coarse)))
    return replace(prompt, size=view.stored_size, clicks=view.clicks_to_stored(prompt.clicks),
                   box=view.box_to_stored(prompt.box), coarse=coarse)


def size_mismatch_detail(job: ImageJob, stored: tuple[int, int], tag: int | None, view: Orientation) -> str:
    """Why the prompts' size of an image differs from its features'."""
    h, w = stored
    text = (f"the prompts size image {job.image_id!r} {job.size[1]}x{job.size[0]} (WxH), its features were "
            f"computed at {w}x{h}")
    if not view.identity:
        text += f", which its EXIF orientation tag {view.tag} shows at {view.displayed_size[1]}x{view.displayed_size[0]}"
    if job.via_label_studio and tag is None and tuple(job.size) == tuple(stored)[::-1]:
        return (text + ": the file probably carries an EXIF orientation tag, which Label Studio applies, and its "
                "features were stored before the encoder recorded the tag; re-encode the image so that its "
                "orientation is recorded")
    return text + ": is the id pointing at another file?"


@dataclass(frozen=True)
class WorkerSpec:
    """What each worker builds: the model (as jobs/encode.py did), the feature table, the click policy.

    encode_missing: encode images without stored features (on this worker's CPU) and store them;
    otherwise their objects fail with NO_FEATURES. image_access: where Label Studio image references may
    be fetched from (pipeline.image_access.ImageAccess), for encoding images of Label Studio tasks.
    engine: what runs the clicks (interformer.click_engine.ClickEngineConfig; torch is the exact reference).
    """

    encoder: Any  # pipeline.encoding.EncoderSpec: weights, variant, seed, preprocessing, as jobs/encode.py
    db: str
    table: str
    policy: ClickPolicy = ClickPolicy()
    encode_missing: bool = False
    threads: int = 1
    image_access: Any = None
    storage_options: dict | None = None
    engine: ClickEngineConfig = ClickEngineConfig()
    output: MaskFormat = MaskFormat()


def _elapsed(t0: float, c0: float) -> tuple[float, float]:
    """(wall ms, process CPU ms) since (perf_counter, process_time) readings t0, c0."""
    return round((time.perf_counter() - t0) * 1e3, 3), round((time.process_time() - c0) * 1e3, 3)


class ImageUnavailable(Exception):
    """No features for an image and none could be made; `reason` is NO_FEATURES or IMAGE_UNREADABLE."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PreannotateWorker:
    """One worker: model, feature reader and (optionally) a feature writer; `run` answers one image."""

    def __init__(self, spec: WorkerSpec) -> None:
        import cv2

        from .encoding import build_predictor  # the model exactly as the encode job builds it

        set_cpu_threads(spec.threads)
        cv2.setNumThreads(spec.threads)
        self.spec = spec
        self.predictor = build_predictor(spec.encoder, device="cpu", engine=spec.engine)
        if not spec.encode_missing:  # interact only: free the ViT and the training-only head
            self.predictor.model.backbone = None
            self.predictor.model.auxiliary_head = None
        self.fingerprint = self.predictor.fingerprint
        from .feature_store import FeatureReader

        self.reader = FeatureReader(spec.db, self.fingerprint, table=spec.table, storage_options=spec.storage_options)
        self._store = None

    def ping(self) -> str:
        return self.fingerprint

    def run(self, job: ImageJob) -> ImageResult:
        """Every object of the image; never raises (failures are per object, with reasons)."""
        fault_point("segment")
        fault_point(f"segment {job.image_id}")  # one image that kills every worker taking it
        t0, c0 = time.perf_counter(), time.process_time()
        digest = job.digest()
        try:
            record, encoded = self._features(job)
        except ImageUnavailable as e:
            return self._all_failed(job, digest, e.reason, e.detail, t0, c0)
        except Exception:  # a broken table row, an IO error: reported, the job goes on
            return self._all_failed(job, digest, INTERNAL_ERROR, traceback.format_exc(limit=4), t0, c0)
        feats, tag = record.features, record.exif_orientation
        row = [record.image_id, record.content_sha256, record.created_at.isoformat()]
        stored = tuple(feats.geometry.original_size)
        # Label Studio prompts are drawn on the grid the browser shows; COCO prompts on the stored grid.
        view = Orientation(stored, normalize_tag(tag) if job.via_label_studio else 1)
        if view.displayed_size != tuple(job.size):
            return self._all_failed(job, digest, SIZE_MISMATCH, size_mismatch_detail(job, stored, tag, view), t0, c0)
        results = []
        for prompt in job.objects:
            try:
                mapped = prompt_to_stored(prompt, view)
            except ValueError as e:
                results.append(ObjectResult.failure(prompt, BAD_POINTS, str(e)))
                continue
            try:
                results.append(segment_object(self.predictor, feats, mapped, self.spec.policy, self.spec.output))
            except Exception:
                results.append(ObjectResult.failure(prompt, INTERNAL_ERROR, traceback.format_exc(limit=4)))
        return ImageResult(job.key, job.image_id, digest, list(stored), results, encoded, *_elapsed(t0, c0),
                           exif_orientation=tag, feature_row=row)

    def _all_failed(self, job: ImageJob, digest: str, reason: str, detail: str, t0: float, c0: float) -> ImageResult:
        return ImageResult(job.key, job.image_id, digest, list(job.size),
                           [ObjectResult.failure(p, reason, detail) for p in job.objects], False, *_elapsed(t0, c0))

    def _features(self, job: ImageJob) -> tuple[Any, bool]:
        """(the feature row as stored: features, EXIF tag, identity; whether it was encoded now).

        A Label Studio task's image is looked up as the interactive backend looks it up (its image_id, then
        the row whose uri is its URL) and, when encoded here, stored as the backend stores it: under its URL,
        never under the project-chosen image_id, which another project may use for another picture. The
        masks are made from the row as stored (at the table's dtype), so a later run, or the backend
        continuing a region's clicks, gets the same masks."""
        from .feature_store import UnknownImageError

        try:
            return self.reader.get_record(job.image_id), False
        except UnknownImageError as e:
            miss = str(e)
        if job.via_label_studio and job.uri:
            stored_id = self._id_of_uri(job.uri)  # on-demand rows are keyed by the URL (and hold it as uri)
            if stored_id is not None:
                return self.reader.get_record(stored_id), False
        if not self.spec.encode_missing:
            raise ImageUnavailable(NO_FEATURES, f"{miss}; run jobs/encode.py on it first, or pass --encode-missing")
        if not job.uri:
            raise ImageUnavailable(NO_FEATURES, f"{miss}; and no image file is known to encode it from "
                                                "(give --image-root)")
        data = self._read(job)
        from .images import ImageDecodeError, decode_image_oriented

        try:
            image, tag = decode_image_oriented(data, self.spec.encoder.preprocess.max_pixels)
        except ImageDecodeError as e:
            raise ImageUnavailable(IMAGE_UNREADABLE, f"{job.uri}: {e.reason}: {e.detail}") from None
        from interformer.encode_memory import ImageTooLargeError

        try:
            feats = self.predictor.encode(image)
        except ImageTooLargeError as e:  # over --max-encode-memory: refused before any encoding
            raise ImageUnavailable(IMAGE_UNREADABLE, f"{job.uri}: too_large: {e}") from None
        key = job.uri if job.via_label_studio else job.image_id
        self._save(job, key, data, feats, tag)
        self.reader.refresh()
        return self.reader.get_record(key), True  # the row as stored (or as another run stored it first)

    def _id_of_uri(self, uri: str) -> str | None:
        """The id of this encoder's row whose `uri` is `uri` (as the interactive backend looks tasks up)."""
        import lance

        from .feature_store import sql_string, table_uri

        try:
            ds = lance.dataset(table_uri(self.spec.db, self.spec.table), storage_options=self.spec.storage_options)
            ids = ds.to_table(columns=["image_id"], filter=f"uri = {sql_string(uri)} AND fingerprint = "
                              f"{sql_string(self.fingerprint)}").column("image_id").to_pylist()
        except (FileNotFoundError, ValueError, OSError):
            return None
        return ids[0] if ids else None

    def _read(self, job: ImageJob) -> bytes:
        if job.via_label_studio:
            from .image_access import ImageAccess, ImageAccessError, read_image_bytes

            try:
                return read_image_bytes(job.uri, self.spec.image_access or ImageAccess.from_env(), job.task_id)
            except ImageAccessError as e:
                raise ImageUnavailable(IMAGE_UNREADABLE, e.message) from None
        from .images import ImageDecodeError, max_file_bytes
        from .sources import read_bytes

        try:
            return read_bytes(job.uri, max_bytes=max_file_bytes(self.spec.encoder.preprocess.max_pixels))
        except ImageDecodeError as e:
            raise ImageUnavailable(IMAGE_UNREADABLE, e.detail) from None

    def _save(self, job: ImageJob, key: str, data: bytes, feats: Any, tag: int) -> None:
        """Store the new features under `key`, so that later runs and the interactive backend find them."""
        from .feature_store import EncodedImage, FeatureStore, encoder_provenance, feature_rows

        if self._store is None:
            self._store = FeatureStore(self.spec.db, self.spec.table, storage_options=self.spec.storage_options)
        item = EncodedImage(key, job.uri or "", hashlib.sha256(data).hexdigest(), feats, tag)
        self._store.add(feature_rows([item], self.fingerprint, self.spec.encoder.dtype,
                                     encoder_provenance(self.predictor)))
