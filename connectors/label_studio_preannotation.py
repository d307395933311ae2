"""The Label Studio side of a bulk pre-annotation run (`pipeline.preannotation_run.LabelStudioLink`).

`ProjectLink` reads prompt regions from a project's tasks, keeps the objects whose label the project's
output tag knows (BrushLabels, or PolygonLabels with --mask-format polygon), gives every image its task
(creating tasks for images that have none), and pushes the finished masks as predictions in batches. The project is opened on first use, so a run fails on a bad
checkpoint before it contacts Label Studio.
"""
from __future__ import annotations

import os
from dataclasses import replace
from functools import cached_property

from pipeline.image_access import ImageAccess
from pipeline.preannotation import ImageResult
from pipeline.preannotation_run import PreannotateConfig, TaskAttachment
from pipeline.prompts import ImageJob, Problem, PromptSet, filter_labels

from .label_studio_client import LabelStudioProject, index_tasks, url_template
from .label_studio_prompts import prediction_for, task_prompts



def label_studio_url(cfg: PreannotateConfig) -> str | None:
    """--ls-url, else LABEL_STUDIO_URL (or LABEL_STUDIO_HOST), as label-studio-sdk reads it."""
    return cfg.ls_url or os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST")


class ProjectLink:
    """One Label Studio project as the prompt source and/or the target of a pre-annotation run."""

    def __init__(self, cfg: PreannotateConfig) -> None:
        self.cfg = cfg
        self.source = f"{cfg.ls_url or os.environ.get('LABEL_STUDIO_URL')}#{cfg.ls_project}"

    @cached_property
    def project(self) -> LabelStudioProject:
        key = os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN")
        output = "polygonlabels" if self.cfg.output.kind == "polygon" else "brushlabels"
        return LabelStudioProject(label_studio_url(self.cfg) or "", key or "", self.cfg.ls_project,
                                  self.cfg.ls_polygon or self.cfg.ls_brush, output=output, read_only=not self.cfg.push)

    @cached_property
    def image_access(self) -> ImageAccess:
        access = self.cfg.image_access or ImageAccess.from_env()
        if self.cfg.ls_url:
            access = replace(access, label_studio_url=self.cfg.ls_url.rstrip("/"))
        return access

    def prompts(self, model_version: str) -> PromptSet:
        """Prompt regions of the project's tasks, never those of the predictions this run writes."""
        p = self.project
        return task_prompts(p.tasks_with_regions(), p.config, p.brush, self.cfg.ls_prompts,
                            self.cfg.ls_prompt_model_version, skip_model_version=model_version)

    def keep_project_labels(self, jobs: list[ImageJob]) -> tuple[list[ImageJob], list[Problem]]:
        p = self.project
        title = "PolygonLabels" if p.brush.type == "polygonlabels" else "BrushLabels"
        return filter_labels(jobs, p.labels, f"project {self.cfg.ls_project} {title} {p.brush.name!r}")

    def attach_tasks(self, jobs: list[ImageJob], model_version: str) -> TaskAttachment:
        """Give every job its task (creating tasks for images that have none); jobs read from tasks keep their
        own task. `delivered` holds the jobs whose task already has a prediction of `model_version`."""
        project = self.project
        refs = project.task_refs()
        index, extra = index_tasks(refs)
        missing = [j for j in jobs if j.task_id is None and j.image_id not in index]
        created = 0
        if missing:
            make_url = url_template(self.cfg.image_url)
            created = project.create_tasks([(j.image_id, make_url(j.image_id, j.file_name, j.uri)) for j in missing])
            refs = project.task_refs()
            index, extra = index_tasks(refs)
        by_task = {r.id: r for r in refs}
        out, delivered = [], set()
        for j in jobs:
            ref = by_task.get(j.task_id) if j.task_id is not None else index.get(j.image_id)
            if ref is None:  # a task deleted while the job runs
                continue
            j = replace(j, task_id=ref.id)
            out.append(j)
            if model_version in ref.model_versions:
                delivered.add(j.key)
        return TaskAttachment(out, delivered, created, [{"image_id": i, "task": t} for i, t in extra])

    def pusher(self, model_version: str, task_of: dict[str, int], fingerprint: str) -> "Pusher":
        return Pusher(self.project, model_version, self.cfg.push_batch, task_of, fingerprint)


class Pusher:
    """Buffers predictions and imports them into Label Studio `batch` at a time; each region carries the
    clicks that made it, keyed by the model's `fingerprint` (connectors/region_meta.py).

    Just before each import the batch's tasks are read again, and a task that already holds a prediction of
    this model version (another run pushed it since this one read the project) is left out and counted in
    `already_there`. Two runs can then push the same task twice only if both re-read it inside the same
    batch window, between one's re-read and its import."""

    def __init__(self, project: LabelStudioProject, model_version: str, batch: int, task_of: dict[str, int],
                 fingerprint: str) -> None:
        self.project = project
        self.model_version = model_version
        self.fingerprint = fingerprint
        self.batch = batch
        self.task_of = task_of  # ImageJob.key -> task id
        self.buffer: list[dict] = []
        self.pushed = 0
        self.already_there = 0
        self.failures: list[dict] = []

    def add(self, result: ImageResult) -> None:
        task_id = self.task_of.get(result.key)
        if task_id is None:
            return
        prediction = prediction_for(result, task_id, self.project.brush, self.model_version, self.fingerprint)
        if prediction is not None:
            self.buffer.append(prediction)
        if len(self.buffer) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        versions = self.project.model_versions_of(p["task"] for p in self.buffer)
        fresh = not_yet_delivered(self.buffer, versions, self.model_version)
        created, failures = self.project.push(fresh)
        self.already_there += len(self.buffer) - len(fresh)
        self.pushed += created
        self.failures.extend({"task": t, "error": e} for t, e in failures)
        self.buffer = []


def not_yet_delivered(predictions: list[dict], versions: dict[int, frozenset[str]], model_version: str) -> list[dict]:
    """The predictions whose task holds no prediction of `model_version` yet (a task that is gone is kept: its
    import fails and is reported as a push failure, as before)."""
    return [p for p in predictions if model_version not in versions.get(int(p["task"]), frozenset())]
