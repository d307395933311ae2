"""The Label Studio side of a bulk pre-annotation run (`pipeline.preannotation_run.LabelStudioLink`).

`ProjectLink` reads prompt regions from a project's tasks, keeps the objects whose label the project's
output tag knows (BrushLabels, or PolygonLabels with --mask-format polygon), gives every image its task
(creating tasks for images that have none), and pushes the finished masks as predictions in batches. The project is opened on first use, so a run fails on a bad
checkpoint before it contacts Label Studio.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property

from pipeline.image_access import ImageAccess
from pipeline.preannotation import ImageResult
from pipeline.preannotation_run import PreannotateConfig, TaskAttachment
from pipeline.prompts import ImageJob, Problem, PromptSet, filter_labels

from .label_studio_client import (
    ImportInDoubt,
    LabelStudioError,
    LabelStudioProject,
    TaskRef,
    canonical_url,
    index_tasks,
    index_urls,
    url_template,
)
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
        own task. An image's task is the one naming its id (by the backend's rule), else the one showing the
        URL this run would give it (a task a storage sync created names its image by URL only). `delivered`
        holds the jobs whose task already has a prediction of `model_version`; `lost` the jobs whose task was
        deleted meanwhile; `no_task` the images left without a task because the config has several Image tags
        (Label Studio refuses a task naming only one of them): they are segmented, not pushed.

        An image is given a new task only when two reads of the project agree that it has none, and a task
        import without a definite answer is never sent again: the run stops, and the next run looks the
        images up before creating anything. Two runs that both find an image without a task both create one:
        after creating, a run reads the project again and deletes the tasks it just created wherever a
        lower-id task shows the same image (`remove_own_duplicate_tasks`), so the lowest id survives and both
        runs push onto it; `tasks_created` counts the created tasks kept, `tasks_removed` those deleted."""
        project = self.project
        make_url = url_template(self.cfg.image_url)

        def finder(refs: list[TaskRef]) -> Callable[[ImageJob], TaskRef | None]:
            by_id, (index, _), by_url = {r.id: r for r in refs}, index_tasks(refs), index_urls(refs)

            def task_of(j: ImageJob) -> TaskRef | None:
                if j.task_id is not None:
                    return by_id.get(j.task_id)
                return index.get(j.image_id) or by_url.get(canonical_url(make_url(j.image_id, j.file_name, j.uri)))
            return task_of

        refs = project.task_refs()
        task_of = finder(refs)
        created, removed, no_task = 0, set(), set()
        missing = [j for j in jobs if j.task_id is None and task_of(j) is None]
        if missing:
            refs = project.task_refs()
            task_of = finder(refs)
            missing = [j for j in missing if task_of(j) is None]
        if missing and project.several_images:
            no_task = {j.image_id for j in missing}
        elif missing:
            unique = {j.image_id: make_url(j.image_id, j.file_name, j.uri) for j in missing}
            try:
                made = project.create_tasks(list(unique.items()))
            except ImportInDoubt as e:
                raise LabelStudioError(f"{e}. Its tasks may exist now: run again, the next run looks every image "
                                       "up before it creates a task") from None
            refs = project.task_refs()
            if made.ids:  # another run may have created the same images' tasks at the same moment
                removed = project.remove_own_duplicate_tasks(refs, made.ids)
                refs = [r for r in refs if r.id not in removed]
            created = made.count - len(removed)
            task_of = finder(refs)
        _, extra = index_tasks(refs)
        holding = project.tasks_holding(model_version)
        several = ("the project's config has several Image tags: Label Studio refuses a task naming one image; "
                   "import tasks naming all of them")
        unplaced = {i: several for i in no_task}
        out, delivered, lost, claimed = [], set(), [], {}
        for j in jobs:
            if j.image_id in no_task:
                out.append(j)
                continue
            ref = task_of(j)
            if ref is None:  # a task deleted while the job runs
                lost.append({"image_id": j.image_id, "task": j.task_id})
                continue
            if claimed.setdefault(ref.id, j.image_id) != j.image_id:  # one task holds one prediction per version
                unplaced[j.image_id] = (f"its task {ref.id} (found by the image's URL) is the task of image "
                                        f"{claimed[ref.id]!r} of this run, which shows the same file")
                out.append(j)
                continue
            j = replace(j, task_id=ref.id)
            out.append(j)
            if ref.id in holding:
                delivered.add(j.key)
        return TaskAttachment(out, delivered, created, [{"image_id": i, "task": t} for i, t in extra], lost,
                              [{"image_id": i, "reason": r} for i, r in sorted(unplaced.items())], len(removed))

    def pusher(self, model_version: str, task_of: dict[str, int], fingerprint: str,
               leave_out: frozenset[str] = frozenset()) -> "Pusher":
        return Pusher(self.project, model_version, self.cfg.push_batch, task_of, fingerprint, leave_out)


class Pusher:
    """Buffers predictions and imports them into Label Studio `batch` at a time; each region carries the
    clicks that made it, keyed by the model's `fingerprint` (connectors/region_meta.py).

    Just before each import the batch's tasks are read again, and a task that already holds a prediction of
    this model version (another run pushed it since this one read the project) is left out and counted in
    `already_there`. Two runs can then push the same task twice only if both re-read it inside the same
    batch window, between one's re-read and its import.

    An import without a definite answer (a lost connection, a timeout, a 5xx, the run stopped during it) is
    never sent again by this process, since Label Studio may have stored it, perhaps only after the answer
    was lost: `finish` reads those tasks again and counts the ones that hold the prediction as pushed; the
    others stay `in_doubt`, for the next run, which reads the project before it pushes anything.

    When Label Studio refuses or cannot be reached (an outage, refused credentials), the pusher stops: the
    batch and every later prediction are listed as not pushed, nothing more is sent, and `stopped` says why;
    the run goes on segmenting and writes its outputs, and the next run pushes what is missing."""

    def __init__(self, project: LabelStudioProject, model_version: str, batch: int, task_of: dict[str, int],
                 fingerprint: str, leave_out: frozenset[str] = frozenset()) -> None:
        self.project = project
        self.leave_out = leave_out  # object keys not to push (their label is not in the project)
        self.model_version = model_version
        self.fingerprint = fingerprint
        self.batch = batch
        self.task_of = task_of  # ImageJob.key -> task id
        self.buffer: list[dict] = []
        self.pushed = 0
        self.already_there = 0
        self.failures: list[dict] = []
        self.in_doubt: list[dict] = []  # {"task", "error"} of predictions sent without a definite answer
        self.stopped: str | None = None  # why pushing stopped (Label Studio refused or could not be reached)
        self.duplicates_removed = 0  # predictions of this version found twice on a task after an import

    def add(self, result: ImageResult) -> None:
        task_id = self.task_of.get(result.key)
        if task_id is None:
            return
        if self.leave_out:
            result = replace(result, objects=[o for o in result.objects if o.key not in self.leave_out])
        prediction = prediction_for(result, task_id, self.project.brush, self.model_version, self.fingerprint)
        if prediction is None:
            return
        if self.stopped is not None:
            self.failures.append({"task": task_id, "error": f"not pushed: {self.stopped}"})
            return
        self.buffer.append(prediction)
        if len(self.buffer) >= self.batch:
            self.flush()

    def flush(self) -> None:
        """Push the buffer (emptied first: whatever happens, no prediction of it is sent twice)."""
        batch, self.buffer = self.buffer, []
        if not batch:
            return
        try:
            held = self.project.tasks_holding(self.model_version, (p["task"] for p in batch))
        except LabelStudioError as e:
            self._stop(e, batch)
            return
        fresh = [p for p in batch if int(p["task"]) not in held]
        self.already_there += len(batch) - len(fresh)
        try:
            outcome = self.project.push(fresh)
        except LabelStudioError as e:
            self._stop(e, fresh)
            return
        except BaseException:  # stopped (SIGTERM, Ctrl-C) while the import was on its way
            self.in_doubt.extend({"task": p["task"], "error": "the run stopped during the import"} for p in fresh)
            raise
        self.pushed += outcome.created
        self.failures.extend({"task": t, "error": e} for t, e in outcome.refused)
        self.in_doubt.extend({"task": p["task"], "error": outcome.error} for p in outcome.in_doubt)
        self._one_each({int(p["task"]) for p in fresh} - {int(t) for t, _ in outcome.refused})

    def _one_each(self, task_ids: set[int]) -> None:
        """After an import: a task that another run pushed in the same moment keeps only the oldest prediction."""
        if not task_ids:
            return
        try:
            self.duplicates_removed += self.project.remove_duplicate_predictions(self.model_version, task_ids)
        except LabelStudioError as e:
            self._stop(e, [])

    def _stop(self, error: LabelStudioError, batch: list[dict]) -> None:
        self.stopped = str(error)
        self.failures.extend({"task": p["task"], "error": f"not pushed: {error}"} for p in batch)

    def finish(self) -> None:
        """Push what is left, then count the in-doubt predictions that Label Studio holds as pushed."""
        try:
            self.flush()
        finally:
            self._settle()

    def _settle(self) -> None:
        if not self.in_doubt:
            return
        try:
            held = self.project.tasks_holding(self.model_version, (d["task"] for d in self.in_doubt))
        except LabelStudioError:
            return
        self.pushed += sum(int(d["task"]) in held for d in self.in_doubt)
        found = {int(d["task"]) for d in self.in_doubt if int(d["task"]) in held}
        self.in_doubt = [d for d in self.in_doubt if int(d["task"]) not in held]
        if self.stopped is None:
            self._one_each(found)
