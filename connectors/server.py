"""The Label Studio ML backend HTTP server (FastAPI): /health, /setup, /predict, /webhook.

Routes parse and answer Label Studio's bodies (protocol.py) and hand each region's clicks to a
`Segmenter` (the Ray actor pool). /health and /setup never wait on the segmenter, so they answer
within Label Studio's 1 s / 3 s limits while the actors are busy. With basic auth on, every route
but /webhook needs it (Label Studio sends the backend's credentials on /health, /setup and /predict,
but its auto-created webhook has none). Every request is logged as one JSON line with its timings.

Bodies are read with a byte limit (1 MiB for the unauthenticated /webhook) and a deadline (408), and parsed,
validated and interpreted in a worker thread, so the event loop keeps answering /health; at most
`large_body_concurrency` bodies that have sent over LARGE_BODY_BYTES are read and parsed at once. A client that
leaves mid-body is logged as one INFO line (499), not a fault. Anything a client sent is interpreted inside
`_client_input` (a fault in it is a 4xx, never a 500), and client strings are cut short in the log.
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
from collections import OrderedDict
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

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
    stored_prompt_items,
    stored_prompts,
    task_image,
)
from .segment import SegmentError, Segmenter, SegmentRequest

log = get_logger("server")

# Label Studio's auto-created project webhook carries no credentials; /webhook only logs the event type.
OPEN_PATHS = frozenset({"/webhook"})
LARGE_BODY_BYTES = 1 << 20  # bodies over this many bytes wait for one of `large_body_concurrency` slots
MAX_PROJECT_CONFIGS = 32  # label configs kept from /setup (least recently used dropped first) ...
MAX_PROJECT_CONFIG_CHARS = 4_000_000  # ... and their XML's characters together (~2.6 bytes each once parsed)
MAX_LOGGED_CHARS = 100  # a client's string in the log (project, hostname, label, region) is cut to this
MAX_LOGGED_ERROR_CHARS = 300
CLIENT_CLOSED = 499  # nginx's "client closed request": logged at INFO, never a server fault
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side settings of the backend."""

    model_version: str
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024  # interactive bodies carry the task's earlier RLE predictions
    max_webhook_bytes: int = 1 << 20  # /webhook needs no credentials and logs two fields of its body
    large_body_concurrency: int = 2  # bodies over LARGE_BODY_BYTES read and parsed at once (memory bound)
    body_timeout_s: float = 10.0  # a body must arrive within this ...
    min_body_rate: int = 64 * 1024  # ... plus 1 s per this many bytes received (else 408, slot released)
    batch_concurrency: int = 4  # regions of a batch /predict in flight at once
    max_clicks: int = 100  # clicks of one region per request: each is an interact step and a kept state
    max_batch_items: int = 1000  # saved prompt regions of a batch /predict (bounds its model steps); more: 413

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_user)


class ConfigCache:
    """Label configs from /setup by project id, weighed by their XML's length; the least recently used are
    dropped beyond `max_entries` or `max_chars` (so many or large /setup calls cannot grow memory)."""

    def __init__(self, max_entries: int = MAX_PROJECT_CONFIGS, max_chars: int = MAX_PROJECT_CONFIG_CHARS) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self._d: OrderedDict[str, tuple[LabelConfig, int]] = OrderedDict()
        self.chars = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, pid: str) -> LabelConfig | None:
        hit = self._d.get(pid)
        if hit is None:
            return None
        self._d.move_to_end(pid)
        return hit[0]

    def put(self, pid: str, config: LabelConfig, chars: int) -> None:
        old = self._d.pop(pid, None)
        self.chars -= old[1] if old else 0
        self._d[pid] = (config, chars)
        self.chars += chars
        while len(self._d) > self.max_entries or self.chars > self.max_chars:
            _, (_, dropped) = self._d.popitem(last=False)
            self.chars -= dropped


@dataclass
class _State:
    settings: ServerSettings
    segmenter: Segmenter
    label_configs: ConfigCache = field(default_factory=ConfigCache)  # project id -> config from /setup
    large_bodies: asyncio.Semaphore | None = None


def create_app(settings: ServerSettings, segmenter: Segmenter) -> FastAPI:
    """Build the FastAPI app around a segmenter (started and stopped by the caller)."""
    if settings.basic_auth_user and not settings.basic_auth_pass:
        raise ValueError("basic auth needs a password as well as a user")
    app = FastAPI(title="InterFormer Label Studio ML backend", docs_url=None, redoc_url=None)
    if settings.large_body_concurrency < 1:
        raise ValueError("large_body_concurrency must be at least 1")
    if settings.body_timeout_s <= 0 or settings.min_body_rate <= 0:
        raise ValueError("body_timeout_s and min_body_rate must be positive")
    state = _State(settings, segmenter, large_bodies=asyncio.Semaphore(settings.large_body_concurrency))
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
                request.state.fields["error"] = f"{type(e).__name__}: {e}"[:MAX_LOGGED_ERROR_CHARS]
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
        status = response.status_code
        level = logging.INFO if status < 400 or status == CLIENT_CLOSED else logging.WARNING
        if request.url.path == "/health" and response.status_code == 200:
            level = logging.DEBUG
        log_event(log, "request", level, request_id=request_id, method=request.method, path=_loggable(request.url.path),
                  status=response.status_code, total_ms=round(total, 2), **fields)
        return response

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        request.state.fields["error"] = exc.message[:MAX_LOGGED_ERROR_CHARS]
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(SegmentError)
    async def _segment_error(request: Request, exc: SegmentError):
        request.state.fields["error"] = exc.message[:MAX_LOGGED_ERROR_CHARS]
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/health")
    @app.get("/")
    async def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "InterFormer", "model_version": settings.model_version,
                "actors_ready": segmenter.ready()}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        body, pid, config = await _read_json(request, settings, settings.max_body_bytes, state.large_bodies,
                                             _setup_body)
        if config is not None and pid:
            state.label_configs.put(pid, config, len(body.label_config or ""))
        request.state.fields.update(project=_loggable(pid), hostname=_loggable(body.hostname))
        return {"model_version": settings.model_version}

    @app.post("/webhook")
    async def webhook(request: Request) -> dict[str, Any]:
        body = await _read_json(request, settings, settings.max_webhook_bytes, state.large_bodies)
        action = body.get("action") if isinstance(body, dict) else None
        project = body.get("project") if isinstance(body, dict) else None
        project = project.get("id") if isinstance(project, dict) else project
        request.state.fields.update(action=_loggable(action), project=_loggable(project))
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        body, pid, config = await _read_json(request, settings, settings.max_body_bytes, state.large_bodies,
                                             lambda value: _predict_body(state, value))
        context = body.params.context if body.params else None
        parse_ms = (time.perf_counter() - t0) * 1e3
        request.state.fields.update(project=_loggable(pid), parse_ms=round(parse_ms, 2))
        if context is not None:
            answer = await _interactive(state, body, config, request.state.fields)
        else:
            answer = await _batch(state, body, config, request.state.fields, request)
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


def _declared_length(request: Request, limit: int) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    try:
        length = int(declared)
    except ValueError:
        raise ProtocolError(400, f"invalid Content-Length {declared[:40]!r}") from None
    if length > limit:
        raise ProtocolError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
    return length


async def _read_json(request: Request, settings: ServerSettings, limit: int, large: asyncio.Semaphore,
                     interpret: Callable[[Any], T] | None = None) -> Any:
    """The request body as JSON (then `interpret`ed), refusing bodies over `limit` bytes before reading them
    whole. Parsing and interpreting run in a worker thread; once more than LARGE_BODY_BYTES have arrived the
    body takes a slot of `large`, held until it is parsed (a declared length alone takes none, so clients that
    announce a large body and send nothing hold no slot). The read has a deadline (408) and a client that
    leaves mid-body is answered 499."""
    _declared_length(request, limit)
    async with AsyncExitStack() as slot:
        raw = await _read_body(request, settings, limit, large, slot)
        return await run_in_threadpool(_parse, raw, interpret)


async def _read_body(request: Request, settings: ServerSettings, limit: int, large: asyncio.Semaphore,
                     slot: AsyncExitStack) -> bytes:
    """The body's bytes, within `settings.body_timeout_s` plus one second per `settings.min_body_rate` bytes
    received (time spent waiting for a large-body slot not counted)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    chunks: list[bytes] = []
    size = 0
    holding = False
    try:
        async with asyncio.timeout(started + settings.body_timeout_s) as deadline:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ProtocolError(413, f"request body is over the limit of {limit} bytes")
                if size > LARGE_BODY_BYTES and not holding:
                    deadline.reschedule(None)
                    waited = loop.time()
                    await slot.enter_async_context(large)
                    started += loop.time() - waited
                    holding = True
                chunks.append(chunk)
                deadline.reschedule(started + settings.body_timeout_s + size / settings.min_body_rate)
    except TimeoutError:
        raise ProtocolError(408, f"the request body did not arrive in time ({size} bytes read); send it within "
                                 f"{settings.body_timeout_s:g} s plus 1 s per {settings.min_body_rate} bytes") \
            from None
    except ClientDisconnect:
        raise ProtocolError(CLIENT_CLOSED, f"the client disconnected after sending {size} bytes of its body") \
            from None
    raw = b"".join(chunks)
    chunks.clear()
    return raw


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancelled (499) as soon as the client disconnects. Starlette does not cancel a handler
    whose client has gone, and `request.is_disconnected()` does not see it through the logging middleware, so
    the body having been read, the next ASGI message, which is the disconnect, is awaited alongside."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and gone.done() and not gone.cancelled() and gone.exception() is None \
                and gone.result().get("type") == "http.disconnect":
            raise ProtocolError(CLIENT_CLOSED, "the client disconnected; the rest of its batch was not run")
        return await task
    finally:
        task.cancel()
        gone.cancel()


def _parse(raw: bytes, interpret: Callable[[Any], T] | None) -> Any:
    value = parse_json(raw)
    return value if interpret is None else interpret(value)


def _setup_body(value: Any) -> tuple[SetupRequest, str | None, LabelConfig | None]:
    with _client_input("the /setup body"):
        body = parse_body(SetupRequest, value)
        config = parse_label_config(body.label_config) if body.label_config else None
        return body, project_id(body.project), config


def _predict_body(state: _State, value: Any) -> tuple[PredictRequest, str | None, LabelConfig]:
    with _client_input("the /predict body"):
        body = parse_body(PredictRequest, value)
        pid = project_id(body.project)
        return body, pid, _label_config(state, body.label_config, pid)


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
    """A client's value for the log: short scalars only (strings cut to MAX_LOGGED_CHARS, integers to 18 digits)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if abs(value) < 10**18 else None
    return value[:MAX_LOGGED_CHARS] if isinstance(value, str) else None


def _label_config(state: _State, xml: str | None, pid: str | None) -> LabelConfig:
    if xml:
        return parse_label_config(xml)
    config = state.label_configs.get(pid) if pid else None
    if config is not None:
        return config
    raise ProtocolError(422, "request has no label_config and /setup was not called for this project")


def _segment_request(task, prompt: Prompt, config: LabelConfig, max_clicks: int) -> SegmentRequest:
    """The request of a prompt: its clicks, on the image of the Image tag it was drawn on (`task_image`)."""
    if len(prompt.clicks) > max_clicks:
        raise ProtocolError(413, f"the region has {len(prompt.clicks)} clicks; at most {max_clicks} are served "
                                 "per request")
    image_id, image_ref = task_image(task.data, config, prompt.image_name, f"task {task.id}")
    return SegmentRequest(
        clicks=prompt.clicks,
        original_size=prompt.original_size,
        image_id=image_id,
        image_ref=image_ref,
        task_id=task.id,
        box=prompt.box,
        region_key=prompt.region_key,
        output=prompt.output_type,
    )


def _interactive_request(state: _State, body: PredictRequest, config: LabelConfig) -> tuple[Prompt, SegmentRequest | None]:
    """The prompt of an interactive call and its request (None for negative clicks only), with the on-screen
    regions it may start from: everything read from the client's body, so every fault is a 4xx."""
    if len(body.tasks) != 1:
        raise ProtocolError(422, f"an interactive request (with context) must carry one task, got {len(body.tasks)}")
    task = body.tasks[0]
    with _client_input("the interactive context"):
        prompt = prompt_from_items(body.params.context.result, config)
        if not prompt.has_positive:
            return prompt, None
        req = _segment_request(task, prompt, config, state.settings.max_clicks)
        return prompt, dataclasses.replace(req, start=onscreen_candidates(task, prompt))


async def _interactive(state: _State, body: PredictRequest, config: LabelConfig, fields: dict) -> dict:
    prompt, req = await run_in_threadpool(_interactive_request, state, body, config)
    fields.update(task=_loggable(body.tasks[0].id), clicks=len(prompt.clicks), label=_loggable(prompt.label),
                  mode="interactive")
    mv = state.settings.model_version
    if req is None:
        fields.update(outcome="negative_only")
        return {"results": [prediction([], mv)]}
    res = await state.segmenter.segment(req)
    fields.update(image_id=res.image_id, session=res.path, steps=res.steps, actor=res.actor, area=res.area,
                  encoded_on_demand=res.encoded_on_demand, start=_loggable(res.start), start_kind=res.start_kind,
                  polygon_iou=res.polygon_iou,
                  **{f"{k}_ms": round(v, 2) for k, v in res.timings_ms.items()})
    regions = mask_results(prompt, res.score, res.rle, res.polygons, interactive_region_id())
    return {"results": [prediction(regions, mv)]}


def _batch_plan(state: _State, body: PredictRequest, config: LabelConfig) -> list[tuple[Any, list, list[str]]]:
    """Per task: the (prompt, request) pairs of its stored prompts, and why each object that gets no mask was
    refused (one refused object never costs the task its other objects)."""
    items = sum(len(stored_prompt_items(task)) for task in body.tasks)
    if items > state.settings.max_batch_items:
        raise ProtocolError(413, f"the {len(body.tasks)} tasks hold {items} saved keypoints and rectangles; at most "
                                 f"{state.settings.max_batch_items} are served per request: select fewer tasks")
    plan = []
    for task in body.tasks:
        pairs, reasons = [], []
        try:
            with _client_input(f"task {_loggable(task.id)}'s stored prompts"):
                prompts, refused = stored_prompts(task, config)
                reasons.extend(refused)
                for p in prompts:
                    if not p.has_positive:
                        continue
                    try:
                        pairs.append((p, _segment_request(task, p, config, state.settings.max_clicks)))
                    except ProtocolError as e:
                        reasons.append(e.message)
        except ProtocolError as e:
            reasons.append(e.message)
        plan.append((task, pairs, [f"task {_loggable(task.id)}: {r}"[:MAX_LOGGED_ERROR_CHARS] for r in reasons]))
    return plan


async def _batch(state: _State, body: PredictRequest, config: LabelConfig, fields: dict, request: Request) -> dict:
    """One prediction per task, from the keypoints/boxes saved in it (none: an empty prediction). A client
    that disconnects stops the batch: no more of its regions are sent to the segmenter."""
    mv = state.settings.model_version
    gate = asyncio.Semaphore(state.settings.batch_concurrency)
    plan = await run_in_threadpool(_batch_plan, state, body, config)
    failures: list[str] = [reason for _, _, reasons in plan for reason in reasons]

    async def one_task(task, reqs) -> dict:
        results = []
        for prompt, req in reqs:
            try:
                async with gate:
                    res = await state.segmenter.segment(req)
            except SegmentError as e:
                failures.append(f"task {_loggable(task.id)}: {e.message}"[:MAX_LOGGED_ERROR_CHARS])
                continue
            results.extend(mask_results(prompt, res.score, res.rle, res.polygons))
        return prediction(results, mv)

    predictions = await _unless_disconnected(request, asyncio.gather(*(one_task(task, reqs) for task, reqs, _ in plan)))
    fields.update(mode="batch", tasks=len(body.tasks), regions=sum(len(p["result"]) for p in predictions))
    if failures:
        fields.update(task_errors=failures[:20])
    return {"results": list(predictions)}
