"""The stages of the distributed encode job (pipeline.encode_run), as plain callables for Ray Data.

  decode_stage   CPU tasks: read bytes, sha256, decode, check, resize (rows carry the resized RGB pixels)
  EncoderStage   actor pool: the model is loaded once per actor; batched ViT + SimpleFPN forward
  write_stage    CPU tasks: write the feature rows as new, uncommitted Lance fragments and stage them

Every stage passes bad inputs through as rows with a `reason`, so one bad file never fails a batch.
The driver commits what was staged (pipeline.staged_commits): rows become visible only in whole,
exactly-once commits, which is what makes a killed run safe to re-run.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from interformer.checkpoint import load_model
from interformer.click_engine import ClickEngineConfig
from interformer.config import PreprocessConfig, ViTConfig
from interformer.encode_engine import check_encode_names
from interformer.encode_memory import encode_memory_problem, images_per_pass
from interformer.features import ImageFeatures, ImageGeometry
from interformer.predictor import NonFiniteOutputError, Predictor, set_cpu_threads
from interformer.preprocess import compute_geometry, normalize_and_pad, resize_image

from .feature_store import (
    FEATURE_SCHEMA,
    GEOMETRY_FIELDS,
    EncodedImage,
    encoder_provenance,
    feature_rows,
    write_feature_fragments,
)
from .faults import fault_point
from .images import ENCODE_FAILED, TOO_LARGE, ImageDecodeError, decode_image_oriented, max_file_bytes
from .placement import Node, actors_that_fit, describe, fits_on, largest_share, worst_room
from .sources import read_bytes
from .staged_commits import StagedRecord, stage

_ERROR_FIELDS = [pa.field("reason", pa.string()), pa.field("detail", pa.string())]

DECODED_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("content_sha256", pa.string()),
        *GEOMETRY_FIELDS,
        pa.field("exif_orientation", pa.int32()),  # the file's EXIF orientation tag, 1..8 (pipeline/orientation.py)
        pa.field("pixels", pa.large_binary()),  # resized RGB uint8, row-major (H, W, 3), the stored pixel grid
        *_ERROR_FIELDS,
    ]
)

ENCODED_SCHEMA = pa.schema(list(FEATURE_SCHEMA) + _ERROR_FIELDS)

RESULT_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("uri", pa.string()), *_ERROR_FIELDS])

# What encoding one image may raise without the encoder being broken: an allocation failure (torch raises
# RuntimeError, Python MemoryError), NaN/inf features (NonFiniteOutputError), values the storage dtype cannot
# hold (ValueError from feature_rows). EncoderStage retries a failed batch image by image with these.
PER_IMAGE_ERRORS = (RuntimeError, MemoryError, ValueError, NonFiniteOutputError)
# A blank 32x32 decoded row: what EncoderStage encodes to tell a broken encoder from a batch of bad images.
_PROBE = {"image_id": "probe", "uri": "", "content_sha256": "", "original_height": 32, "original_width": 32,
          "resized_height": 32, "resized_width": 32, "padded_height": 32, "padded_width": 32, "scale": 1.0,
          "pixels": bytes(32 * 32 * 3)}


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder to build: weights, variant, preprocessing, storage dtype and CPU threads."""

    checkpoint: str | None = None  # None: random initialisation from `seed`
    variant: str | None = None  # required with no checkpoint; checked against the checkpoint otherwise
    preprocess: PreprocessConfig = PreprocessConfig()
    dtype: str = "float16"
    seed: int = 0
    threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    precision: str = "fp32"  # "bf16": the encoder in bfloat16 (Predictor.encode_precision)
    engine: str = "torch"  # what runs the encoder: torch or openvino (interformer.encode_engine)
    engine_cache: str | None = None  # folder of the runtime's converted models (None: the default cache)

    def __post_init__(self) -> None:
        check_encode_names(self.engine, self.precision)


def build_predictor(spec: EncoderSpec, device: str | torch.device | None = None,
                    engine: ClickEngineConfig | None = None) -> Predictor:
    """Load the model of `spec` into a Predictor (clicks run on `engine`, by default torch with the spec's
    engine cache). Random weights are drawn from a fixed seed so that every actor of a job (and every later
    run) builds the same "random-init" encoder."""
    if engine is None:
        engine = ClickEngineConfig(cache_dir=spec.engine_cache)
    if spec.checkpoint is None:
        if spec.variant is None:
            raise ValueError("with no checkpoint, name the variant to initialise randomly")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = load_model(None, variant=spec.variant)
    else:
        model = load_model(spec.checkpoint, variant=spec.variant)
    return Predictor(model, preprocess=spec.preprocess, device=device, engine=engine,
                     encode_precision=spec.precision, encode_engine=spec.engine)


def check_encode_memory(size: tuple[int, int], preprocess: PreprocessConfig, vit: ViTConfig) -> None:
    """Refuse an image whose encoding would need more attention memory than --max-encode-memory, as TOO_LARGE
    (the detail names the --max-side that fits), before it reaches an encoder."""
    problem = encode_memory_problem(size, preprocess, vit)
    if problem is not None:
        raise ImageDecodeError(TOO_LARGE, problem)


def decode_stage(batch: pa.Table, preprocess: PreprocessConfig, vit: ViTConfig | None = None) -> pa.Table:
    """(image_id, uri) rows -> DECODED_SCHEMA rows; unreadable or bad images get a reason instead of pixels.
    With the encoder's `vit`, images over the attention memory budget are refused too."""
    rows = []
    for image_id, uri in zip(batch.column("image_id").to_pylist(), batch.column("uri").to_pylist()):
        row: dict = {"image_id": image_id, "uri": uri}
        try:
            data = read_bytes(uri, max_bytes=max_file_bytes(preprocess.max_pixels))
            row["content_sha256"] = hashlib.sha256(data).hexdigest()
            image, orientation = decode_image_oriented(data, max_pixels=preprocess.max_pixels)
            if vit is not None:
                check_encode_memory(image.shape[:2], preprocess, vit)
            geometry = compute_geometry(image.shape[:2], preprocess)
            pixels = np.ascontiguousarray(resize_image(image, geometry)).tobytes()
        except ImageDecodeError as e:
            row.update(reason=e.reason, detail=e.detail)
            rows.append(row)
            continue
        except MemoryError:  # this image, not the batch: the others are decoded
            row.update(reason=TOO_LARGE, detail="decoding or resizing it ran out of memory")
            rows.append(row)
            continue
        row.update(
            original_height=geometry.original_size[0],
            original_width=geometry.original_size[1],
            resized_height=geometry.resized_size[0],
            resized_width=geometry.resized_size[1],
            padded_height=geometry.padded_size[0],
            padded_width=geometry.padded_size[1],
            scale=float(geometry.scale),
            exif_orientation=orientation,
            pixels=pixels,
        )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


class EncoderStage:
    """Ray Data actor: builds the encoder once, then encodes batches of decoded rows into feature rows."""

    def __init__(self, spec: EncoderSpec, fingerprint: str):
        if spec.threads is not None:
            set_cpu_threads(spec.threads)
        self.spec = spec
        self.predictor = build_predictor(spec)
        if self.predictor.fingerprint != fingerprint:
            raise RuntimeError(
                f"this worker built encoder {self.predictor.fingerprint!r}, the job expects {fingerprint!r}: "
                "is the checkpoint file the same on every node?"
            )
        self.fingerprint = fingerprint

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok_mask = pc.is_null(batch.column("reason"))
        good = batch.filter(ok_mask).to_pylist()
        bad = batch.filter(pc.invert(ok_mask)).select(["image_id", "uri", "content_sha256", "reason", "detail"])
        bad = bad.to_pylist()
        try:
            encoded = self._feature_rows(good)
        except PER_IMAGE_ERRORS:
            encoded = self._one_by_one(good, bad)
        encoded = encoded.append_column(_ERROR_FIELDS[0], pa.nulls(encoded.num_rows, pa.string()))
        encoded = encoded.append_column(_ERROR_FIELDS[1], pa.nulls(encoded.num_rows, pa.string()))
        failed = pa.Table.from_pylist(
            [
                {
                    **{k: row[k] for k in ("image_id", "uri", "content_sha256", "reason", "detail")},
                    "fingerprint": self.fingerprint,
                    "dtype": self.spec.dtype,
                }
                for row in bad
            ],
            schema=ENCODED_SCHEMA,
        )
        return pa.concat_tables([encoded.cast(ENCODED_SCHEMA), failed])

    def _feature_rows(self, rows: list[dict]) -> pa.Table:
        items = [
            EncodedImage(row["image_id"], row["uri"], row["content_sha256"], feats, row.get("exif_orientation"))
            for row, feats in zip(rows, self._encode(rows))
        ]
        return feature_rows(items, self.fingerprint, self.spec.dtype, encoder_provenance(self.predictor))

    def _one_by_one(self, good: list[dict], bad: list[dict]) -> pa.Table:
        """Encode a batch that failed image by image: the images that fail again join `bad` as ENCODE_FAILED.
        When every one fails, a blank probe image decides: if it fails too the encoder itself is broken and the
        job stops (RuntimeError) rather than recording every image as bad."""
        tables = []
        for row in good:
            try:
                tables.append(self._feature_rows([row]))
            except PER_IMAGE_ERRORS as e:
                bad.append({**{k: row[k] for k in ("image_id", "uri", "content_sha256")}, "reason": ENCODE_FAILED,
                            "detail": f"the encoder failed on this image: {type(e).__name__}: {e}"[:1000]})
        if not tables:
            try:
                self._feature_rows([_PROBE])
            except PER_IMAGE_ERRORS as e:
                raise RuntimeError(
                    f"the encoder failed on each of {len(good)} images and on a blank {_PROBE['padded_height']}x"
                    f"{_PROBE['padded_width']} probe ({type(e).__name__}: {e}): the model or its runtime is broken, "
                    "not the images; nothing was recorded for them") from e
            return feature_rows([], self.fingerprint, self.spec.dtype, encoder_provenance(self.predictor))
        return pa.concat_tables(tables)

    @torch.inference_mode()
    def _encode(self, rows: list[dict]) -> list[ImageFeatures]:
        """One forward pass per group of images with the same padded size (split to fit --max-encode-memory)."""
        geometries = [
            ImageGeometry(
                (r["original_height"], r["original_width"]),
                (r["resized_height"], r["resized_width"]),
                (r["padded_height"], r["padded_width"]),
                r["scale"],
            )
            for r in rows
        ]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(geometries):
            groups.setdefault(g.padded_size, []).append(i)
        out: list[ImageFeatures | None] = [None] * len(rows)
        device = self.predictor.device
        vit = self.predictor.model.config.vit
        passes = []
        for size, idxs in groups.items():
            n = images_per_pass(size, self.spec.preprocess, vit)
            passes += [(size, idxs[k : k + n]) for k in range(0, len(idxs), n)]
        for padded, idxs in passes:
            tensors = []
            for i in idxs:
                h, w = geometries[i].resized_size
                image = np.frombuffer(rows[i]["pixels"], dtype=np.uint8).reshape(h, w, 3)
                tensors.append(normalize_and_pad(image, padded))
            pyramid = self.predictor.encode_pyramid(torch.cat(tensors).to(device))
            for j, i in enumerate(idxs):
                out[i] = ImageFeatures(tuple(p[j : j + 1].float().cpu() for p in pyramid), geometries[i])
        return out  # type: ignore[return-value]


def write_stage(batch: pa.Table, uri: str, staging: str, fingerprint: str,
                storage_options: dict | None = None) -> pa.Table:
    """Write the batch's feature rows as uncommitted fragments and stage them, with the batch's failures,
    for the driver to commit (pipeline.staged_commits); returns one RESULT_SCHEMA row per image, for
    progress only: what is committed is what was staged."""
    ok_mask = pc.is_null(batch.column("reason"))
    fragments = write_feature_fragments(uri, batch.filter(ok_mask).select(FEATURE_SCHEMA.names), storage_options)
    if fragments:
        fault_point("written")
    bad = batch.filter(pc.invert(ok_mask)).select(["image_id", "uri", "reason", "detail"]).to_pylist()
    errors = [(r["image_id"], r["uri"], r["reason"], r["detail"] or "") for r in bad]
    if fragments or errors:
        stage(staging, StagedRecord(fragments, errors, fingerprint), storage_options)
    return pa.table(
        {
            "image_id": batch.column("image_id"),
            "uri": batch.column("uri"),
            "reason": batch.column("reason"),
            "detail": batch.column("detail"),
        },
        schema=RESULT_SCHEMA,
    )


@dataclass(frozen=True)
class ResourcePlan:
    """How the job uses a cluster: the encoder actor pool and the CPUs of the read/write tasks."""

    num_encoders: int
    cpus_per_encoder: float
    gpus_per_encoder: float
    threads_per_encoder: int
    cpus_per_task: float


class ResourcePlanError(ValueError):
    """Encoder pool options the cluster cannot take (a usage error: exit 2, before anything is changed)."""


def plan_resources(
    total_cpus: float,
    total_gpus: float,
    num_encoders: int | None = None,
    cpus_per_encoder: float | None = None,
    nodes: Sequence[Node] | None = None,
    task_memory: float = 0.0,
) -> ResourcePlan:
    """Size the encoder pool. With GPUs: one actor per GPU with one CPU each. CPU only: a quarter of the
    CPUs (at least one) stays free for the decode and write tasks; an actor pool that takes every CPU
    leaves Ray Data's read tasks unscheduled and the job hangs without an error.

    With `nodes` (the live nodes' resources), the plan is also checked against each node, as Ray places it: the
    default CPUs per encoder are capped to a share the nodes hold a whole number of, and encoders or a decode
    task (one CPU share and `task_memory` bytes) that no node can hold are a ResourcePlanError: Ray would queue
    them forever, without a word."""
    if total_cpus <= 0:
        raise ResourcePlanError("the Ray cluster has no CPUs")
    if total_gpus >= 1:
        n = num_encoders or int(total_gpus)
        if n > total_gpus:
            raise ResourcePlanError(f"{n} GPU encoders asked for, the cluster has {total_gpus:g} GPUs")
        cpus = cpus_per_encoder if cpus_per_encoder is not None else max(0.25, min(1.0, (total_cpus - 1) / n))
        gpus = 1.0
    else:
        reserve = max(1.0, 0.25 * total_cpus) if total_cpus >= 2 else total_cpus / 2
        available = total_cpus - reserve
        n = num_encoders or max(1, int(available // 4))
        cpus = cpus_per_encoder if cpus_per_encoder is not None else available / n
        if cpus_per_encoder is None and nodes:
            cpus = largest_share(n, nodes, cap=cpus) or cpus
        gpus = 0.0
    left = total_cpus - n * cpus
    if left <= 0:
        raise ResourcePlanError(
            f"{n} encoders x {cpus:g} CPUs take all {total_cpus:g} CPUs of the cluster: Ray Data could not run "
            "its read tasks and the job would hang; use fewer or smaller encoders"
        )
    plan = ResourcePlan(n, float(cpus), gpus, max(1, int(cpus)), float(min(1.0, left)))
    return _check_nodes(plan, nodes, task_memory) if nodes else plan


def _check_nodes(plan: ResourcePlan, nodes: Sequence[Node], task_memory: float) -> ResourcePlan:
    """The plan with a decode task's CPU share that some node has free while the encoders run, wherever Ray put
    them; ResourcePlanError when the encoders or a decode task cannot all be placed on the nodes."""
    fit = actors_that_fit(nodes, plan.cpus_per_encoder, plan.gpus_per_encoder)
    if fit < plan.num_encoders:
        gpu = f" + {plan.gpus_per_encoder:g} GPU" if plan.gpus_per_encoder else ""
        size = f"{plan.cpus_per_encoder:g} CPUs{gpu}"
        raise ResourcePlanError(
            f"{plan.num_encoders} encoders of {size} each cannot all be placed: the cluster's nodes "
            f"({describe(nodes)}) hold {fit}, and Ray would wait for the others forever; use fewer or smaller "
            "encoders (--num-encoders, --cpus-per-encoder)")
    if not any(fits_on(node, min(plan.cpus_per_task, float(node.get("CPU", 0.0))) or 1.0, 0.0, task_memory)
               for node in nodes):
        raise ResourcePlanError(
            f"no node of the cluster ({describe(nodes)}) can run a decode task (CPUs and "
            f"{task_memory / 1024**2:.0f} MiB of Ray memory): Ray would wait for one forever; give the nodes more "
            "memory or CPUs")
    room = math.floor(worst_room(nodes, plan.num_encoders, plan.cpus_per_encoder, plan.gpus_per_encoder,
                                 task_memory) * 1000 + 1e-6) / 1000
    if room <= 0:
        raise ResourcePlanError(
            f"{plan.num_encoders} encoders of {plan.cpus_per_encoder:g} CPUs each can take every CPU of the nodes "
            f"that could run a decode task ({describe(nodes)}): Ray would wait for one forever; use fewer or "
            "smaller encoders (--num-encoders, --cpus-per-encoder)")
    return replace(plan, cpus_per_task=min(plan.cpus_per_task, room))
