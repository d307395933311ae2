"""The Label Studio ML backend HTTP server (FastAPI): /health, /setup, /predict, /webhook.

Routes parse and answer Label Studio's bodies (protocol.py) and hand each region's clicks to a
`Segmenter` (the Ray actor pool). /health and /setup never wait on the segmenter, so they answer
within Label Studio's 1 s / 3 s limits while the actors are busy. With basic auth on, every route
but /webhook needs it (Label Studio sends the backend's credentials on /health, /setup and /predict,
but its auto-created webhook has none). Every request is logged as one JSON line with its timings.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import secrets
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .json_body import parse_json
from .logs import get_logger, log_event
from .onscreen import interactive_region_id, onscreen_candidates
from .protocol import (
    LabelConfig,
    PredictRequest,
    Prompt,
    ProtocolError,
    SetupRequest,
    mask_results,
    parse_body,
    parse_label_config,
    prediction,
    project_id,
    prompt_from_items,
    stored_prompts,
)
from .segment import SegmentError, Segmenter, SegmentRequest

log = get_logger("server")

# Label Studio's auto-created project webhook carries no credentials; /webhook only logs the event type.
OPEN_PATHS = frozenset({"/webhook"})


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side settings of the backend."""

    model_version: str
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024  # interactive bodies carry the task's earlier RLE predictions
    batch_concurrency: int = 4  # regions of a batch /predict in flight at once
    max_clicks: int = 100  # clicks of one region per request: each is an interact step and a kept state

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)


@dataclass
class _State:
    settings: ServerSettings
    segmenter: Segmenter
    label_configs: dict[str, LabelConfig] = field(default_factory=dict)  # project id -> config from /setup


def create_app(settings: ServerSettings, segmenter: Segmenter) -> FastAPI:
    """Build the FastAPI app around a segmenter (started and stopped by the caller)."""
    if settings.basic_auth_user and not settings.basic_auth_pass:
        raise ValueError("basic auth needs a password as well as a user")
    app = FastAPI(title="InterFormer Label Studio ML backend", docs_url=None, redoc_url=None)
    state = _State(settings, segmenter)
    app.state.backend = state

    @app.middleware("http")
    async def _auth_and_log(request: Request, call_next):
        request_id = uuid.uuid4().hex[:12]
        request.state.request_id = request_id
        request.state.fields = {}
        t0 = time.perf_counter()
        if settings.auth_enabled and request.url.path not in OPEN_PATHS and not _authorised(request, settings):
            response = JSONResponse({"error": "authentication required"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Basic realm="ml-backend"'})
        else:
            try:
                response = await call_next(request)
            except Exception as e:  # a bug or a broken actor: 500, details in the log only, keep serving
                log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
                request.state.fields["error"] = f"{type(e).__name__}: {e}"
                response = JSONResponse(
                    {"error": f"internal error; the backend's log has the details (request id {request_id})"},
                    status_code=500)
        total = (time.perf_counter() - t0) * 1e3
        fields = request.state.fields
        timing = [f"{k[:-3]};dur={v:.2f}" for k, v in fields.items() if k.endswith("_ms")] + [f"total;dur={total:.2f}"]
        response.headers["Server-Timing"] = ", ".join(timing)
        response.headers["X-Request-Id"] = request_id
        if "actor" in fields:
            response.headers["X-Backend-Actor"] = str(fields["actor"])
        level = logging.INFO if response.status_code < 400 else logging.WARNING
        if request.url.path == "/health" and response.status_code == 200:
            level = logging.DEBUG
        log_event(log, "request", level, request_id=request_id, method=request.method, path=request.url.path,
                  status=response.status_code, total_ms=round(total, 2), **fields)
        return response

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        request.state.fields["error"] = exc.message
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(SegmentError)
    async def _segment_error(request: Request, exc: SegmentError):
        request.state.fields["error"] = exc.message
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "InterFormer", "model_version": settings.model_version,
                "actors_ready": segmenter.ready()}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        raw = await _read_json(request, settings.max_body_bytes)
        with _client_input("the /setup body"):
            body = parse_body(SetupRequest, raw)
            pid = project_id(body.project)
            config = parse_label_config(body.label_config) if body.label_config else None
        if config is not None and pid:
            state.label_configs[pid] = config
        request.state.fields.update(project=pid, hostname=body.hostname)
        return {"model_version": settings.model_version}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        body = await _read_json(request, settings.max_body_bytes)
        action = body.get("action") if isinstance(body, dict) else None
        project = body.get("project") if isinstance(body, dict) else None
        project = project.get("id") if isinstance(project, dict) else project
        request.state.fields.update(action=_loggable(action), project=_loggable(project))
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        raw = await _read_json(request, settings.max_body_bytes)
        with _client_input("the /predict body"):
            body = parse_body(PredictRequest, raw)
            pid = project_id(body.project)
            config = _label_config(state, body.label_config, pid)
            context = body.params.context if body.params else None
        parse_ms = (time.perf_counter() - t0) * 1e3
        request.state.fields.update(project=pid, parse_ms=round(parse_ms, 2))
        if context is not None:
            answer = await _interactive(state, body, config, request.state.fields)
        else:
            answer = await _batch(state, body, config, request.state.fields)
        # Serialised directly: FastAPI's generic encoder would walk the RLE list value by value.
        return JSONResponse(answer)

    return app


def _authorised(request: Request, settings: ServerSettings) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return False
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    ok_user = secrets.compare_digest(user.encode(), (settings.basic_auth_user or "").encode())
    ok_pass = secrets.compare_digest(password.encode(), (settings.basic_auth_pass or "").encode())
    return bool(sep) and ok_user and ok_pass


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing bodies over `limit` bytes before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ProtocolError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        except ValueError:
            raise ProtocolError(400, f"invalid Content-Length {declared!r}") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ProtocolError(400, "request body is empty; expected JSON")
    return parse_json(raw)


# Faults that pure parsing of a client's body can raise: they mean the body is malformed, not the server.
_INPUT_FAULTS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


@contextmanager
def _client_input(what: str) -> Iterator[None]:
    """Turn any fault raised while interpreting client input into a 422 (logged with its traceback)."""
    try:
        yield
    except ProtocolError:
        raise
    except _INPUT_FAULTS as e:
        log.warning("client input could not be interpreted", exc_info=True)
        raise ProtocolError(422, f"{what} could not be interpreted ({type(e).__name__})") from None


def _loggable(value: Any) -> str | int | None:
    """A webhook field for the log: short scalars only (the webhook is unauthenticated)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    return value[:100] if isinstance(value, str) else None


def _label_config(state: _State, xml: str | None, pid: str | None) -> LabelConfig:
    if xml:
        return parse_label_config(xml)
    if pid and pid in state.label_configs:
        return state.label_configs[pid]
    raise ProtocolError(422, "request has no label_config and /setup was not called for this project")


MAX_IMAGE_ID_CHARS = 1024
MAX_IMAGE_REF_CHARS = 4096


def _segment_request(task, prompt: Prompt, config: LabelConfig, max_clicks: int) -> SegmentRequest:
    if len(prompt.clicks) > max_clicks:
        raise ProtocolError(413, f"the region has {len(prompt.clicks)} clicks; at most {max_clicks} are served "
                                 "per request")
    image_id = task.data.get("image_id")
    image_ref = task.data.get(config.image_key(prompt.image_name))
    if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, (str, int))):
        raise ProtocolError(422, f"task data image_id must be a string, got {type(image_id).__name__}")
    if image_ref is not None and not isinstance(image_ref, str):
        raise ProtocolError(422, "task image must be a URL or path string")
    if image_id is not None and len(str(image_id)) > MAX_IMAGE_ID_CHARS:
        raise ProtocolError(422, f"task data image_id is longer than {MAX_IMAGE_ID_CHARS} characters")
    if image_ref is not None and len(image_ref) > MAX_IMAGE_REF_CHARS:
        raise ProtocolError(422, f"task image reference is longer than {MAX_IMAGE_REF_CHARS} characters")
    if image_id in (None, "") and not image_ref:
        raise ProtocolError(
            422, f"task {task.id} has neither data.image_id nor data.{config.image_key(prompt.image_name)}"
        )
    return SegmentRequest(
        clicks=prompt.clicks,
        original_size=prompt.original_size,
        image_id=str(image_id) if image_id not in (None, "") else None,
        image_ref=image_ref or None,
        task_id=task.id,
        box=prompt.box,
        region_key=prompt.region_key,
        output=prompt.output_type,
    )


async def _interactive(state: _State, body: PredictRequest, config: LabelConfig, fields: dict) -> dict:
    if len(body.tasks) != 1:
        raise ProtocolError(422, f"an interactive request (with context) must carry one task, got {len(body.tasks)}")
    task = body.tasks[0]
    with _client_input("the interactive context"):
        prompt = prompt_from_items(body.params.context.result, config)
        fields.update(task=task.id, clicks=len(prompt.clicks), label=prompt.label, mode="interactive")
        req = _segment_request(task, prompt, config, state.settings.max_clicks) if prompt.has_positive else None
    mv = state.settings.model_version
    if req is None:
        fields.update(outcome="negative_only")
        return {"results": [prediction([], mv)]}
    req = dataclasses.replace(req, start=onscreen_candidates(task, prompt))
    res = await state.segmenter.segment(req)
    fields.update(image_id=res.image_id, session=res.path, steps=res.steps, actor=res.actor, area=res.area,
                  encoded_on_demand=res.encoded_on_demand, start=res.start, start_kind=res.start_kind,
                  polygon_iou=res.polygon_iou,
                  **{f"{k}_ms": round(v, 2) for k, v in res.timings_ms.items()})
    regions = mask_results(prompt, res.score, res.rle, res.polygons, interactive_region_id())
    return {"results": [prediction(regions, mv)]}


async def _batch(state: _State, body: PredictRequest, config: LabelConfig, fields: dict) -> dict:
    """One prediction per task, from the keypoints/boxes saved in it (none: an empty prediction)."""
    mv = state.settings.model_version
    gate = asyncio.Semaphore(state.settings.batch_concurrency)
    failures: list[str] = []

    async def one_task(task) -> dict:
        try:
            with _client_input(f"task {task.id}'s stored prompts"):
                prompts = [p for p in stored_prompts(task, config) if p.has_positive]
                reqs = [(p, _segment_request(task, p, config, state.settings.max_clicks)) for p in prompts]
        except ProtocolError as e:
            failures.append(f"task {task.id}: {e.message}")
            return prediction([], mv)
        results = []
        for prompt, req in reqs:
            try:
                async with gate:
                    res = await state.segmenter.segment(req)
            except SegmentError as e:
                failures.append(f"task {task.id}: {e.message}")
                continue
            results.extend(mask_results(prompt, res.score, res.rle, res.polygons))
        return prediction(results, mv)

    predictions = await asyncio.gather(*(one_task(t) for t in body.tasks))
    fields.update(mode="batch", tasks=len(body.tasks), regions=sum(len(p["result"]) for p in predictions))
    if failures:
        fields.update(task_errors=failures[:20])
    return {"results": list(predictions)}
