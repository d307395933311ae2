"""A Label Studio project seen by a bulk job, through label-studio-sdk (shared/spec/integrations.md §2).

Reads the labelling config and the tasks (only the fields needed), creates tasks for images that
have none (with `image_id` in their data, so the interactive backend finds the features), and pushes
predictions with `projects.import_predictions` in batches. Which tasks already hold a prediction of a
model version is read from Label Studio itself (`predictions_model_versions`), which is what makes a
re-run add nothing twice even when the job was killed between a push and its own bookkeeping.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from .protocol import ControlTag, LabelConfig, ProtocolError, parse_label_config


class LabelStudioError(RuntimeError):
    """Label Studio cannot be reached, refuses the credentials, or the project cannot be used."""


@dataclass(frozen=True)
class TaskRef:
    """What a bulk job needs to know about a task."""

    id: int
    image_id: str | None  # data.image_id, else the image URL (the id the backend's on-demand encoder uses)
    model_versions: frozenset[str]


_TITLES = {"brushlabels": "BrushLabels", "polygonlabels": "PolygonLabels"}
_FORMAT_OF = {"brushlabels": "rle", "polygonlabels": "polygon"}


def _versions(text: str | None) -> frozenset[str]:
    return frozenset(v for v in (text or "").split(",") if v)


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
        tags = {"brushlabels": list(self.config.brushes.values()), "polygonlabels": list(self.config.polygons.values())}
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
            for t in candidates:
                if t.name == name:
                    return t
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

    def _list(self, include: str | None, page_size: int = 200) -> list[dict[str, Any]]:
        kwargs = {"include": include} if include else {}
        try:
            pager = self.client.tasks.list(project=self.project_id, page_size=page_size, **kwargs)
            return [t.model_dump(exclude_none=True) for t in pager]
        except Exception as e:
            raise LabelStudioError(f"cannot list the tasks of project {self.project_id}: {_describe(e)}") from None

    def task_refs(self) -> list[TaskRef]:
        """Every task's id, image id and the model versions of its predictions (no result payloads)."""
        refs = []
        for t in self._list("id,data,predictions_model_versions", page_size=500):
            data = t.get("data") or {}
            image_id = data.get("image_id") or data.get(self.image_key)
            refs.append(TaskRef(int(t["id"]), str(image_id) if image_id else None,
                                _versions(t.get("predictions_model_versions"))))
        return refs

    def model_versions_of(self, task_ids: Iterable[int], chunk: int = 200) -> dict[int, frozenset[str]]:
        """The model versions of the predictions each of `task_ids` holds now (a task deleted meanwhile is absent).

        Read just before a push, so that a prediction another run pushed since this run started is not pushed
        again; the data manager's `selectedItems` query lists only these tasks."""
        ids = sorted({int(t) for t in task_ids})
        out: dict[int, frozenset[str]] = {}
        for start in range(0, len(ids), chunk):
            query = json.dumps({"selectedItems": {"all": False, "included": ids[start : start + chunk]}})
            try:
                pager = self.client.tasks.list(project=self.project_id, query=query,
                                               include="id,predictions_model_versions", page_size=chunk)
                tasks = [t.model_dump(exclude_none=True) for t in pager]
            except Exception as e:
                raise LabelStudioError(f"cannot read the predictions of {len(ids)} tasks of project "
                                       f"{self.project_id}: {_describe(e)}") from None
            out.update((int(t["id"]), _versions(t.get("predictions_model_versions"))) for t in tasks)
        return out

    def tasks_with_regions(self) -> list[dict[str, Any]]:
        """Tasks with their full annotations and predictions (`include` would return annotation ids only)."""
        return self._list(None, page_size=100)

    def create_tasks(self, items: Sequence[tuple[str, str]], batch: int = 500) -> int:
        """Create one task per (image_id, image URL) with data {image key: URL, "image_id": id}; returns the count."""
        created = 0
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            request = [{"data": {self.image_key: url, "image_id": image_id}} for image_id, url in chunk]
            try:
                self.client.projects.import_tasks(id=self.project_id, request=request)
            except Exception as e:
                raise LabelStudioError(f"could not create {len(chunk)} tasks in project {self.project_id}: "
                                       f"{_describe(e)}") from None
            created += len(chunk)
        return created

    def push(self, predictions: Sequence[dict[str, Any]]) -> tuple[int, list[tuple[int, str]]]:
        """Import predictions in one call; if Label Studio refuses the batch, halve it to find the bad ones.

        Returns (created, [(task id, error)]) so that one bad task never stops the others.
        """
        if not predictions:
            return 0, []
        try:
            response = self.client.projects.import_predictions(id=self.project_id, request=list(predictions))
            return int(getattr(response, "created", len(predictions)) or 0), []
        except Exception as e:
            if len(predictions) == 1 or not _is_client_error(e):
                if _is_client_error(e):
                    return 0, [(int(predictions[0]["task"]), _describe(e))]
                raise LabelStudioError(f"pushing {len(predictions)} predictions failed: {_describe(e)}") from None
        half = len(predictions) // 2
        a = self.push(predictions[:half])
        b = self.push(predictions[half:])
        return a[0] + b[0], a[1] + b[1]


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


def url_template(template: str) -> Callable[[str, str | None, str | None], str]:
    """`template` with {image_id}, {file_name} and {uri} -> a function making a task's image URL."""
    try:
        template.format(image_id="", file_name="", uri="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"image URL template {template!r} may use only {{image_id}}, {{file_name}}, {{uri}}: {e}") from None

    def make(image_id: str, file_name: str | None, uri: str | None) -> str:
        return template.format(image_id=image_id, file_name=file_name or image_id, uri=uri or image_id)

    return make


def _is_client_error(e: Exception) -> bool:
    status = getattr(e, "status_code", None)
    return isinstance(status, int) and 400 <= status < 500


def _describe(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    if status is not None:
        return f"HTTP {status}: {str(body)[:300]}"
    return f"{type(e).__name__}: {str(e)[:300]}"
