"""A Label Studio project seen by a bulk job, through label-studio-sdk (shared/spec/integrations.md §2).

Reads the labelling config and the tasks (only the fields needed), creates tasks for images that
have none (with the image's id in their data under the key the interactive backend reads: `image_id`, or
`image_id_<Image tag>` in a config with several Image tags), and pushes
predictions with `projects.import_predictions` in batches. Which tasks already hold a prediction of a
model version is read from Label Studio itself (the predictions' own `model_version`, compared exactly),
which is what makes a re-run add nothing twice even when the job was killed between a push and its own
bookkeeping.

Imports are never retried by the SDK: an import whose answer is lost may have been committed, and a second
send would add everything twice. Such an import raises `ImportInDoubt`; only a definite answer is acted on
(400/413/422: some items are bad, the batch is halved to find them; 429: wait and send again; 401/403 and
the other refusals: `LabelStudioError`).
"""
from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass, field
import time
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import parse_qsl, quote, unquote

from .protocol import ControlTag, LabelConfig, ProtocolError, image_id_keys, parse_label_config, task_image


class LabelStudioError(RuntimeError):
    """Label Studio cannot be reached, refuses the credentials, or the project cannot be used."""


class ImportInDoubt(LabelStudioError):
    """An import got no definite answer (a dropped connection, a timeout, a 5xx): it may have been committed."""


@dataclass(frozen=True)
class TaskRef:
    """What a bulk job needs to know about a task."""

    id: int
    image_id: str | None  # the output tag's image as protocol.task_image reads it: its id, else its URL (the id
    # the backend's on-demand encoder uses); None for a task whose data the backend refuses
    url: str | None = None  # the output tag's image URL/path in the task's data


_TITLES = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}
_FORMAT_OF = {"brushlabels": "rle", "polygonlabels": "polygon"}


NO_RETRY = {"max_retries": 0}  # an import is sent once: see the module docstring
SPLIT_STATUSES = (400, 413, 422)  # definite refusals of some items of a batch
MAX_THROTTLE_WAITS = 5
MAX_THROTTLE_WAIT_S = 60.0


class LabelStudioProject:
    """One project: its output tag (BrushLabels, or PolygonLabels for polygons), its tasks, prediction pushes."""

    def __init__(self, url: str, api_key: str, project_id: int, brush_name: str | None = None,
                 timeout_s: float = 120.0, output: str = "brushlabels", read_only: bool = False) -> None:
        """`output`: the kind of tag that receives the masks, "brushlabels" or "polygonlabels"; `brush_name`
        names it when the config has several. A `read_only` project (prompts only, no pushes) may have the
        other kind instead: the tag only tells which image the prompts are on."""
        from label_studio_sdk import LabelStudio

        if not url or not api_key:
            raise LabelStudioError("Label Studio URL and API key are required (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")
        self.client = LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout_s)
        self.sleep: Callable[[float], None] = time.sleep  # waits after a 429 (a test replaces it)
        self.project_id = int(project_id)
        try:
            project = self.client.projects.get(id=self.project_id)
        except Exception as e:  # the SDK raises httpx errors and its own ApiError subclasses
            raise LabelStudioError(f"cannot read project {project_id} from {url}: {_describe(e)}") from None
        try:
            self.config: LabelConfig = parse_label_config(project.label_config or "")
        except ProtocolError as e:
            raise LabelStudioError(f"project {project_id}'s labelling config cannot hold masks: {e.message}") from None
        if read_only and not (self.config.brushes if output == "brushlabels" else self.config.polygons):
            output = None
        self.brush: ControlTag = self._pick_output(output, brush_name)  # the output tag, brush or polygon
        self.image_key = self.config.image_key(self.brush.to_name)

    def _pick_output(self, kind: str | None, name: str | None) -> ControlTag:
        """The tag of `kind` named `name`, or the only one; a config without one is refused with what it has."""
        tags = {k: self.config.outputs_of(k) for k in ("brushlabels", "polygonlabels")}
        candidates = tags[kind] if kind else tags["brushlabels"] + tags["polygonlabels"]
        title = _TITLES.get(kind, "BrushLabels/PolygonLabels")
        if not candidates:
            other = "polygonlabels" if kind == "brushlabels" else "brushlabels"
            has = ", ".join(repr(t.name) for t in tags[other])
            raise LabelStudioError(
                f"project {self.project_id}'s labelling config has no {title} tag for --mask-format "
                f"{_FORMAT_OF[kind]} (it has {_TITLES[other]} {has}): use --mask-format {_FORMAT_OF[other]}, or "
                f"add a <{title}> tag to the config")
        if name is not None:
            named = [t for t in candidates if t.name == name]
            if len(named) == 1:
                return named[0]
            if named:
                raise LabelStudioError(f"project {self.project_id} has {len(named)} {title} tags named {name!r}: "
                                       "give each tag of the labelling config its own name")
            raise LabelStudioError(f"project {self.project_id} has no {title} named {name!r} "
                                   f"(it has {[t.name for t in candidates]})")
        if len(candidates) != 1:
            option = "--ls-polygon" if kind == "polygonlabels" else "--ls-brush"
            raise LabelStudioError(f"project {self.project_id} has several {title} {[t.name for t in candidates]}: "
                                   f"name the one to fill ({option})")
        return candidates[0]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.brush.labels

    def _pages(self, include: str | None, filters: Sequence[dict] = (), page_size: int = 200) -> Iterator[dict]:
        """The project's tasks (filtered by data manager `filters`) in id order, read by id ranges.

        Each request asks for the tasks after the last id seen, never for a page number: a task deleted (or
        created) while the list is read then cannot shift another task past a page boundary, and a shorter
        list cannot end the read early (the SDK's pager takes a 404 on a vanished page for the end)."""
        after = 0
        while True:
            items = [*filters, {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": after}]
            query = json.dumps({"filters": {"conjunction": "and", "items": items}, "ordering": ["tasks:id"]})
            kwargs = {"include": include} if include else {}
            try:
                page = self.client.tasks.list(project=self.project_id, query=query, page=1, page_size=page_size,
                                              **kwargs).items or []
                tasks = [t.model_dump(exclude_none=True) for t in page]
            except Exception as e:
                raise LabelStudioError(f"cannot list the tasks of project {self.project_id}: {_describe(e)}") from None
            ids = [_task_id(t) for t in tasks]
            if any(i is None or i <= after for i in ids):
                raise LabelStudioError(f"project {self.project_id}: Label Studio listed tasks out of id order; "
                                       "its task list cannot be read reliably")
            yield from tasks
            if len(tasks) < page_size:
                return
            after = ids[-1]

    def task_refs(self) -> list[TaskRef]:
        """Every task's id and the identity of the output tag's image in it (no result payloads)."""
        return [TaskRef(_task_id(t), *self.task_identity(t.get("data"))) for t in self._pages("id,data", page_size=500)]

    def task_identity(self, data: Any) -> tuple[str | None, str | None]:
        """(identity, URL) of the output tag's image in a task's `data`: the identity by the backend's one rule
        (`task_image`), its feature-table id, else its URL; (None, None) when the backend would refuse the data."""
        try:
            image_id, image_ref = task_image(data if isinstance(data, dict) else {}, self.config, self.brush.to_name)
        except ProtocolError:
            return None, None
        return (image_id if image_id is not None else image_ref), image_ref

    @property
    def several_images(self) -> bool:
        """Whether the config has several Image tags: Label Studio then refuses a task that names only one."""
        return len(self.config.images) > 1

    @property
    def image_id_key(self) -> str:
        """The task data key a created task names its image's id by: plain `image_id` with one Image tag, else
        `image_id_<output tag's image>` (the backend never reads a plain `image_id` with several)."""
        return image_id_keys(self.config, self.brush.to_name)[-1]

    def tasks_holding(self, model_version: str, task_ids: Iterable[int] | None = None,
                      chunk: int = 200) -> set[int]:
        """The tasks (of `task_ids`, else of the project) holding a prediction whose model_version is exactly
        `model_version` and which has at least one region of this run's output tag, read now. An empty
        prediction holds no mask: the backend's batch answer for a task with nothing to segment is one (Label
        Studio's "Retrieve predictions" stores it under the same version), and a run must still deliver masks
        to such a task. Nor does a prediction of another output tag (a run filling `people`, then one filling
        `cars` of the same project, or the right image's brush after the left one's): each tag is delivered
        once, by its own prediction.

        The data manager narrows the tasks first (its `contains` filter runs on the stored predictions: every
        task holding the version is among its answer, perhaps with others holding a longer or differently
        cased one); each candidate's predictions are then read and compared exactly. The task field
        `predictions_model_versions` is never used: it is a display string cut at 500 characters."""
        narrow = [{"filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List",
                   "value": [model_version]}]
        candidates: list[int] = []
        if task_ids is None:
            candidates = [_task_id(t) for t in self._pages("id", narrow, page_size=500)]
        else:
            ids = sorted({int(t) for t in task_ids})
            for start in range(0, len(ids), chunk):
                query = json.dumps({"filters": {"conjunction": "and", "items": narrow},
                                    "selectedItems": {"all": False, "included": ids[start : start + chunk]}})
                try:
                    page = self.client.tasks.list(project=self.project_id, query=query, include="id", page=1,
                                                  page_size=chunk).items or []
                except Exception as e:
                    raise LabelStudioError(f"cannot read the predictions of {len(ids)} tasks of project "
                                           f"{self.project_id}: {_describe(e)}") from None
                candidates += [_task_id(t.model_dump(exclude_none=True)) for t in page]
        return {t for t, versions in self._prediction_versions(candidates).items() if model_version in versions}

    def _prediction_versions(self, task_ids: Sequence[int], per_task_max: int = 50) -> dict[int, set[str]]:
        """task id -> the exact model versions of its predictions that hold at least one region of the output
        tag; one request per task for a few tasks, else one request for the project's predictions."""
        wanted = set(task_ids)
        if not wanted:
            return {}
        try:
            if len(wanted) <= per_task_max:
                predictions = [p for t in sorted(wanted) for p in self.client.predictions.list(task=t)]
            else:
                predictions = self.client.predictions.list(project=self.project_id)
        except Exception as e:
            raise LabelStudioError(f"cannot read the predictions of {len(wanted)} tasks of project "
                                   f"{self.project_id}: {_describe(e)}") from None
        out: dict[int, set[str]] = {}
        for p in predictions:
            if p.task in wanted and isinstance(p.model_version, str) and self._holds_output(p.result):
                out.setdefault(p.task, set()).add(p.model_version)
        return out

    def _holds_output(self, result: Any) -> bool:
        """Whether a prediction's result has a region of this project's output tag."""
        regions = result if isinstance(result, list) else []
        return any((r.get("from_name") if isinstance(r, dict) else getattr(r, "from_name", None)) == self.brush.name
                   for r in regions)

    def remove_duplicate_predictions(self, model_version: str, task_ids: Iterable[int]) -> int:
        """Delete all but the oldest (lowest id) prediction of exactly `model_version` with regions of the output
        tag on each of `task_ids`; returns how many were deleted.

        Two runs pushing one task can both import it when each re-reads it before the other's import lands.
        Each run calls this after its own import: whichever order the calls come in, the oldest prediction is
        the one left, so the task ends with exactly one (a prediction the other run deleted first is a 404)."""
        wanted = sorted({int(t) for t in task_ids})
        try:
            predictions = [p for t in wanted for p in self.client.predictions.list(task=t)]
        except Exception as e:
            raise LabelStudioError(f"cannot read the predictions of {len(wanted)} tasks of project "
                                   f"{self.project_id}: {_describe(e)}") from None
        ours: dict[int, list[int]] = {}
        for p in predictions:
            if p.model_version == model_version and isinstance(p.id, int) and self._holds_output(p.result):
                ours.setdefault(p.task, []).append(p.id)
        removed = 0
        for ids in ours.values():
            for prediction_id in sorted(ids)[1:]:
                try:
                    self.client.predictions.delete(id=prediction_id)
                except Exception as e:
                    if _status(e) == 404:
                        continue
                    raise LabelStudioError(f"cannot delete the duplicate prediction {prediction_id} of project "
                                           f"{self.project_id}: {_describe(e)}") from None
                removed += 1
        return removed

    def tasks_with_regions(self) -> list[dict[str, Any]]:
        """Tasks with their full annotations and predictions (`include` would return annotation ids only)."""
        return list(self._pages(None, page_size=100))

    def create_tasks(self, items: Sequence[tuple[str, str]], batch: int = 500) -> CreatedTasks:
        """Create one task per (image_id, image URL) with data {image key: URL, `image_id_key`: id}; returns the
        count and, where Label Studio says them (`return_task_ids`: a synchronous import), the new tasks' ids.

        Each import is sent once; one without a definite answer raises `ImportInDoubt` (look the images up
        before creating any of them again)."""
        created, ids = 0, []
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            request = [{"data": {self.image_key: url, self.image_id_key: image_id}} for image_id, url in chunk]
            what = f"creating {len(chunk)} tasks in project {self.project_id}"
            try:
                response = self._send(lambda: self.client.projects.import_tasks(
                    id=self.project_id, request=request, return_task_ids=True, request_options=NO_RETRY), what)
            except _Refused as e:
                raise LabelStudioError(f"{what} was refused: {e}") from None
            created += len(chunk)
            said = getattr(response, "task_ids", None)
            if ids is not None and isinstance(said, list) and all(isinstance(t, int) for t in said):
                ids += said
            else:
                ids = None  # an asynchronous import (Label Studio Enterprise) does not name its tasks
        return CreatedTasks(created, frozenset(ids) if ids is not None else None)

    def remove_own_duplicate_tasks(self, refs: Sequence[TaskRef], own: Iterable[int]) -> set[int]:
        """Delete each task of `own` (tasks this run just created) for whose image a lower-id task exists in
        `refs` (the project read after the creation); returns the ids deleted (or found gone).

        Two runs creating tasks for the same images at the same moment both see none before they create. Each
        run calls this after its own creation: whichever order the calls come in, the lowest-id task of an
        image is never deleted, so the image ends with one task. A lower task names the same image by its id
        (`index_tasks`' rule), or by its URL alone (a storage sync's task). Only `own` tasks are ever deleted,
        and only while they hold no annotation, skipped annotation or prediction (a person or another run
        may have used one already): such a task is kept and stays reported as a duplicate."""
        own = set(own)
        by_id: set[str] = set()
        by_url: set[str] = set()
        doomed: list[int] = []
        for ref in sorted(refs, key=lambda r: r.id):
            url = canonical_url(ref.url) if ref.url is not None else None
            if ref.id in own and ref.image_id is not None and (ref.image_id in by_id or url in by_url):
                doomed.append(ref.id)
                continue
            if ref.image_id is not None:
                by_id.add(ref.image_id)
            if url is not None and ref.image_id == ref.url:  # a task naming its image by URL only
                by_url.add(url)
        return {t for t in doomed if self._delete_unused_task(t)}

    def _delete_unused_task(self, task_id: int) -> bool:
        """Delete a task unless it holds an annotation (also a skipped one) or a prediction; True when it is
        gone."""
        try:
            task = self.client.tasks.get(id=task_id)
            if any(getattr(task, k, None) for k in ("total_annotations", "cancelled_annotations",
                                                     "total_predictions", "annotations", "predictions")):
                return False
            self.client.tasks.delete(id=task_id)
        except Exception as e:
            if _status(e) == 404:
                return True
            raise LabelStudioError(f"cannot delete the duplicate task {task_id} this run created in project "
                                   f"{self.project_id}: {_describe(e)}") from None
        return True

    def push(self, predictions: Sequence[dict[str, Any]]) -> PushResult:
        """Import predictions in one call; if Label Studio refuses some of them (400/413/422), halve the batch
        to find the bad ones, so that one bad task never stops the others. A part without a definite answer
        is returned in `in_doubt`, never sent again here."""
        if not predictions:
            return PushResult()
        what = f"pushing {len(predictions)} predictions to project {self.project_id}"
        try:
            response = self._send(lambda: self.client.projects.import_predictions(
                id=self.project_id, request=list(predictions), request_options=NO_RETRY), what)
        except ImportInDoubt as e:
            return PushResult(in_doubt=list(predictions), error=str(e))
        except _Refused as e:
            if len(predictions) == 1:
                return PushResult(refused=[(int(predictions[0]["task"]), str(e))])
            half = len(predictions) // 2
            return self.push(predictions[:half]) + self.push(predictions[half:])
        created = getattr(response, "created", None)
        return PushResult(created=int(created) if isinstance(created, int) else len(predictions))

    def _send(self, call: Callable[[], Any], what: str) -> Any:
        """`call()` once, or again after a 429 (Retry-After honoured, bounded); a definite refusal of some
        items raises `_Refused`, any other refusal `LabelStudioError`, no definite answer `ImportInDoubt`."""
        for attempt in range(MAX_THROTTLE_WAITS + 1):
            try:
                return call()
            except Exception as e:
                status = _status(e)
                if status == 429 and attempt < MAX_THROTTLE_WAITS:
                    self.sleep(throttle_wait(getattr(e, "headers", None), attempt))
                    continue
                if status in SPLIT_STATUSES:
                    raise _Refused(_describe(e)) from None
                if status in (401, 403):
                    raise LabelStudioError(f"{what}: Label Studio refuses the API key ({_describe(e)}); check "
                                           "LABEL_STUDIO_API_KEY and the key's access to the project") from None
                if status == 429:
                    raise LabelStudioError(f"{what}: Label Studio still answers 429 (too many requests) after "
                                           f"{MAX_THROTTLE_WAITS} waits; run again later") from None
                if status is not None and 400 <= status < 500 and status != 408:
                    raise LabelStudioError(f"{what} was refused: {_describe(e)}") from None
                raise ImportInDoubt(f"{what}: no definite answer ({_describe(e)})") from None
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class CreatedTasks:
    """What `create_tasks` did: how many tasks it created, and their ids when Label Studio named them."""

    count: int
    ids: frozenset[int] | None = None


@dataclass
class PushResult:
    """What one push did: predictions created, (task id, error) refused, and those sent without a definite
    answer (perhaps created: see `LabelStudioProject.tasks_holding`)."""

    created: int = 0
    refused: list[tuple[int, str]] = field(default_factory=list)
    in_doubt: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # why the in-doubt part has no answer

    def __add__(self, other: "PushResult") -> "PushResult":
        return PushResult(self.created + other.created, self.refused + other.refused,
                          self.in_doubt + other.in_doubt, self.error or other.error)


class _Refused(Exception):
    """Label Studio answered 400/413/422: nothing of the request was stored."""


def throttle_wait(headers: Any, attempt: int) -> float:
    """Seconds to wait after a 429: its Retry-After (seconds or an HTTP date), else 1, 2, 4... seconds;
    at most MAX_THROTTLE_WAIT_S."""
    value = None
    if isinstance(headers, dict):
        value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    seconds = 2.0 ** attempt
    if isinstance(value, str) and value.strip():
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                pass
    if seconds != seconds:  # NaN
        seconds = 1.0
    return min(max(seconds, 0.0), MAX_THROTTLE_WAIT_S)


def index_tasks(refs: Iterable[TaskRef]) -> tuple[dict[str, TaskRef], list[tuple[str, int]]]:
    """image_id -> its task (the lowest id wins) and the (image_id, task id) of other tasks of the same image."""
    index: dict[str, TaskRef] = {}
    extra: list[tuple[str, int]] = []
    for ref in sorted(refs, key=lambda r: r.id):
        if ref.image_id is None:
            continue
        if ref.image_id in index:
            extra.append((ref.image_id, ref.id))
        else:
            index[ref.image_id] = ref
    return index, extra


def index_urls(refs: Iterable[TaskRef]) -> dict[str, TaskRef]:
    """Canonical image URL (`canonical_url`) -> the lowest-id task showing it (a task found by URL is the
    image's task, whatever id it names: a storage sync creates tasks with a URL only)."""
    found: dict[str, TaskRef] = {}
    for ref in sorted(refs, key=lambda r: r.id):
        if ref.url is not None:
            found.setdefault(canonical_url(ref.url), ref)
    return found


def _served_by_label_studio(url: str) -> bool:
    """A URL Label Studio serves or fetches over HTTP (a path on it, or http(s)), whose parts are decoded
    as a web server decodes them; cloud-storage URIs (s3://, gs://, ...) name their keys raw."""
    return url.startswith("/") or url.lower().startswith(("http://", "https://"))


_PATH_KEEP = "/:@!$'()*,;=~"  # what a path segment may hold unescaped (RFC 3986 pchar, less '&' and '+')


def canonical_url(url: str) -> str:
    """One spelling of an image URL per file Label Studio would read for it, so that a task created by a run
    matches the task a storage sync made: the path percent-decoded and re-encoded, each query value decoded
    as Django decodes it ('+' is a space) and re-encoded as Label Studio's storages encode it (`quote`, '/'
    kept); a fragment is dropped (never sent to a server). Other URIs are returned unchanged."""
    if not _served_by_label_studio(url):
        return url
    url = url.partition("#")[0]
    head, sep, query = url.partition("?")
    scheme, slashes, rest = head.partition("://")
    if slashes:
        host, slash, path = rest.partition("/")
        head = f"{scheme.lower()}://{host.lower()}{slash}{quote(unquote(path), safe=_PATH_KEEP)}"
    else:
        head = quote(unquote(head), safe=_PATH_KEEP)
    if not sep:
        return head
    pairs = parse_qsl(query, keep_blank_values=True)
    return head + "?" + "&".join(f"{quote(k, safe='/')}={quote(v, safe='/')}" for k, v in pairs)


def url_template(template: str) -> Callable[[str, str | None, str | None], str]:
    """`template` with {image_id}, {file_name} and {uri} -> a function making a task's image URL.

    In a URL Label Studio serves (a path such as the default `/data/local-files/?d={file_name}`, or
    http(s)://) each value is percent-encoded as Label Studio's own storage sync encodes file names (`quote`,
    '/' kept), so that a name with a space, '+', '#', '&' or '%' reaches the right file; in other URIs
    (s3://bucket/{file_name}) values go in raw, as those storages write keys."""
    try:
        template.format(image_id="", file_name="", uri="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"image URL template {template!r} may use only {{image_id}}, {{file_name}}, {{uri}}: {e}") from None
    encode = (lambda v: quote(v, safe="/")) if _served_by_label_studio(template) else (lambda v: v)

    def make(image_id: str, file_name: str | None, uri: str | None) -> str:
        return template.format(image_id=encode(image_id), file_name=encode(file_name or image_id),
                               uri=encode(uri or image_id))

    return make


def _status(e: Exception) -> int | None:
    status = getattr(e, "status_code", None)
    return status if isinstance(status, int) else None


def _task_id(task: dict) -> int | None:
    tid = task.get("id")
    return tid if isinstance(tid, int) and not isinstance(tid, bool) else None


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    if status is not None:
        return f"HTTP {status}: {str(body)[:300]}"
    return f"{type(e).__name__}: {str(e)[:300]}"
