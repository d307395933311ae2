"""What a pre-annotation run tells its user: the summary (printed and saved), the per-object CSV report."""
from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .files import write_text_atomic
from .preannotation import ClickPolicy, ImageResult
from .prompts import Problem

REPORT = "report.csv"
SUMMARY = "summary.json"


@dataclass
class PreannotateSummary:
    """What a run did; printed at the end and written to RUN_DIR/summary.json."""

    fingerprint: str
    model_version: str
    random_weights: bool
    source: str
    run_dir: str
    images: int = 0
    objects: int = 0
    not_usable: int = 0
    done_before: int = 0
    delivered_before: int = 0
    computed_images: int = 0
    computed_objects: int = 0
    computed_steps: int = 0  # interact steps (clicks) run by this run's workers
    worker_cpu_s: float = 0.0  # CPU seconds the workers spent on them (independent of other load)
    segmented: int = 0
    failed: int = 0
    reasons: dict = field(default_factory=dict)
    mean_clicks: dict = field(default_factory=dict)
    mean_iou: float | None = None
    reached_target: str = ""
    mask_format: str = "rle"
    polygon_iou_mean: float | None = None  # IoU of the delivered polygons against their masks
    polygon_iou_min: float | None = None
    encoded_on_the_fly: int = 0
    tasks_created: int = 0
    pushed: int = 0
    pushed_by_another_run: int = 0  # finished here, but another run had pushed this model version meanwhile
    push_failures: list = field(default_factory=list)  # {"task", "error"}: refused, or not pushed
    push_in_doubt: list = field(default_factory=list)  # {"task", "error"}: sent, no answer, not in the project
    not_pushed_labels: list = field(default_factory=list)  # {"key", "label"}: in --coco-out, label not in the project
    duplicates_removed: int = 0  # predictions pushed twice onto one task by two runs at once, the younger deleted
    push_stopped: str | None = None  # why pushing stopped early (Label Studio refused or could not be reached)
    tasks_gone: list = field(default_factory=list)  # {"image_id", "task"}: the task was deleted during the run
    no_task: list = field(default_factory=list)  # {"image_id", "reason"}: no task, and the run cannot create one
    duplicate_tasks: list = field(default_factory=list)
    features_changed: list = field(default_factory=list)  # {"image_id", "key"}: done in an earlier run from a
    # feature row encoded again since, so segmented again
    duplicate_tasks_removed: int = 0  # tasks this run created and deleted again (another run's older task won)
    coco_out: str | None = None
    coco_annotations: int = 0
    workers: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0
    interrupted: bool = False
    error: str | None = None  # why the run stopped early (a worker died), when it did

    def count(self, result: ImageResult) -> None:
        """Add an image this run's workers computed."""
        self.computed_images += 1
        self.computed_objects += len(result.objects)
        self.computed_steps += sum(o.steps for o in result.objects)
        self.worker_cpu_s += result.cpu_ms / 1e3
        self.encoded_on_the_fly += int(result.encoded_on_the_fly)

    @property
    def objects_per_s(self) -> float:
        """Objects segmented per second once the workers were up (Ray and model start-up excluded)."""
        busy = self.seconds - self.startup_s
        return self.computed_objects / busy if busy > 0 else 0.0

    @property
    def steps_per_s(self) -> float:
        busy = self.seconds - self.startup_s
        return self.computed_steps / busy if busy > 0 else 0.0


def tally(summary: PreannotateSummary, results: list[ImageResult], problems: list[Problem],
          policy: ClickPolicy) -> None:
    """Per-object totals over this run's prompts (earlier runs' results included)."""
    reasons = Counter(p.reason for p in problems)
    clicks: dict[str, list[int]] = {}
    ious, polygon_ious = [], []
    for r in results:
        for o in r.objects:
            if o.ok:
                summary.segmented += 1
                clicks.setdefault(o.kind, []).append(len(o.clicks))
                if o.iou is not None:
                    ious.append(o.iou)
                if o.polygon_iou is not None:
                    polygon_ious.append(o.polygon_iou)
            else:
                reasons[o.reason] += 1
    summary.failed = sum(reasons.values())
    summary.reasons = dict(sorted(reasons.items()))
    summary.mean_clicks = {k: round(sum(v) / len(v), 2) for k, v in sorted(clicks.items())}
    if ious:
        summary.mean_iou = round(sum(ious) / len(ious), 4)
        summary.reached_target = f"{sum(i >= policy.target_iou for i in ious)}/{len(ious)}"
    if polygon_ious:
        summary.polygon_iou_mean = round(sum(polygon_ious) / len(polygon_ious), 4)
        summary.polygon_iou_min = round(min(polygon_ious), 4)


REPORT_COLUMNS = ["image_id", "key", "label", "prompt", "status", "reason", "clicks", "steps", "iou_prompt", "score",
                  "area", "polygon_iou", "ms", "notes", "detail"]


def write_report(path: Path, problems: list[Problem], results: list[ImageResult]) -> None:
    """One CSV row per object: how it was segmented, or why not. Written whole (pipeline/files.py), so a reader
    or a second run writing the same report never sees a torn file."""
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(REPORT_COLUMNS)
    for p in problems:
        w.writerow([p.image_id or "", p.key, p.label or "", "", "not_usable", p.reason, "", "", "", "", "", "", "",
                    "", p.detail])
    for r in sorted(results, key=lambda r: r.key):
        for o in r.objects:
            w.writerow([o.image_id, o.key, o.label, o.kind, o.status, o.reason or "", len(o.clicks) if o.ok else "",
                        o.steps if o.ok else "", "" if o.iou is None else f"{o.iou:.4f}",
                        "" if o.score is None else f"{o.score:.4f}", o.area if o.ok else "",
                        "" if o.polygon_iou is None else f"{o.polygon_iou:.4f}", f"{o.ms:.1f}",
                        "; ".join(o.notes), (o.detail or "").strip().splitlines()[-1] if o.detail else ""])
    write_text_atomic(path, f.getvalue())


def nothing_segmented(s: PreannotateSummary) -> bool:
    """Whether the run had objects to segment and none was: not one segmented (now or in an earlier run of this
    folder) while some image's task did not already hold this model version's prediction. A rerun whose
    images are all predicted in Label Studio already (by another run folder) has nothing left to do: done."""
    return bool(s.objects) and s.segmented == 0 and s.delivered_before < s.images


def push_incomplete(s: PreannotateSummary) -> int:
    """How many predictions this run could not be sure to deliver (refused, not pushed, in doubt, or for an
    image without a task that the run cannot create)."""
    return len(s.push_failures) + len(s.push_in_doubt) + len(s.no_task)


def format_summary(s: PreannotateSummary, problems_shown: int = 20) -> str:
    lines = ["", "preannotate summary"]
    lines.append(f"  model        {s.model_version} (features {s.fingerprint})"
                 + ("   <-- RANDOM WEIGHTS, not for labelling" if s.random_weights else ""))
    lines.append(f"  prompts      {s.objects} objects on {s.images} images from {s.source}; "
                 f"{s.not_usable} not usable")
    lines.append(f"  resumed      {s.done_before} images done in an earlier run, {s.delivered_before} already "
                 "predicted in Label Studio")
    if s.features_changed:
        lines.append(f"  redone       {len(s.features_changed)} images done in an earlier run were segmented again: "
                     "their features were encoded again since (" + ", ".join(
                         str(g["image_id"]) for g in s.features_changed[:problems_shown]) + ")")
    lines.append(f"  computed     {s.computed_objects} objects on {s.computed_images} images"
                 + (f" with {s.workers} workers" if s.workers else " in this process")
                 + (f", {s.encoded_on_the_fly} images encoded on the fly" if s.encoded_on_the_fly else "")
                 + ("  (INTERRUPTED: run again to finish)" if s.interrupted else ""))
    lines.append(f"  segmented    {s.segmented} objects; clicks per object "
                 + (", ".join(f"{k} {v}" for k, v in s.mean_clicks.items()) or "-"))
    if s.mean_iou is not None:
        lines.append(f"  coarse IoU   mean {s.mean_iou:.3f}; target reached by {s.reached_target}")
    if s.polygon_iou_mean is not None:
        lines.append(f"  polygons     IoU against their masks: mean {s.polygon_iou_mean:.4f}, min {s.polygon_iou_min:.4f}")
    lines.append(f"  failed       {s.failed}" + (" (" + ", ".join(f"{k} {v}" for k, v in s.reasons.items()) + ")"
                                                 if s.reasons else ""))
    if (s.tasks_created or s.pushed or s.push_failures or s.delivered_before or s.pushed_by_another_run
            or s.push_in_doubt):
        lines.append(f"  label studio {s.tasks_created} tasks created, {s.pushed} predictions pushed"
                     + (f", {s.pushed_by_another_run} not pushed (another run had pushed them meanwhile)"
                        if s.pushed_by_another_run else "")
                     + (f", {len(s.push_failures)} not pushed" if s.push_failures else "")
                     + (f", {len(s.push_in_doubt)} in doubt (sent, no answer, not found in the project since: "
                        "run again, it pushes those that are missing)" if s.push_in_doubt else ""))
        for f in (s.push_failures + s.push_in_doubt)[:problems_shown]:
            lines.append(f"      task {f['task']}: {f['error']}")
    if s.not_pushed_labels:
        labels = sorted({str(g["label"]) for g in s.not_pushed_labels})
        lines.append(f"  not pushed   {len(s.not_pushed_labels)} objects are in --coco-out but not in Label Studio: "
                     f"their labels are not in the project ({', '.join(labels[:problems_shown])})")
    if s.duplicates_removed:
        lines.append(f"  note         {s.duplicates_removed} predictions pushed onto a task at the same moment by "
                     "another run were deleted (the oldest one is kept)")
    if s.push_stopped:
        lines.append(f"  push stopped {s.push_stopped}; the masks are in the ledger (and --coco-out): run again to "
                     "push them")
    if s.tasks_gone:
        lines.append(f"  note         {len(s.tasks_gone)} images lost their task during the run (deleted in Label "
                     "Studio): " + ", ".join(str(g["image_id"]) for g in s.tasks_gone[:problems_shown]))
    if s.no_task:
        lines.append(f"  not pushed   {len(s.no_task)} images have no task of their own, and none can be created "
                     f"({s.no_task[0]['reason']}): " + ", ".join(str(g["image_id"]) for g in s.no_task[:problems_shown]))
    if s.duplicate_tasks_removed:
        lines.append(f"  note         {s.duplicate_tasks_removed} tasks this run created were deleted again: another "
                     "run created tasks for the same images at the same moment, and its older tasks are used")
    if s.duplicate_tasks:
        lines.append(f"  note         {len(s.duplicate_tasks)} images have several tasks; the lowest task id is used")
    if s.coco_out:
        lines.append(f"  coco         {s.coco_annotations} annotations in {s.coco_out}")
    lines.append(f"  time         {s.seconds:.1f} s ({s.startup_s:.1f} s starting workers); after start-up "
                 f"{s.objects_per_s:.2f} objects/s, {s.steps_per_s:.1f} clicks/s")
    if s.computed_objects:
        lines.append(f"  cpu          {s.worker_cpu_s:.1f} CPU s in the workers, "
                     f"{1e3 * s.worker_cpu_s / s.computed_objects:.0f} ms per object")
    lines.append(f"  report       {Path(s.run_dir) / REPORT} (one row per object)")
    return "\n".join(lines)


def write_summary(summary: PreannotateSummary) -> Path:
    """RUN_DIR/summary.json: the summary's fields and its two rates."""
    path = Path(summary.run_dir, SUMMARY)
    write_text_atomic(path, json.dumps({**asdict(summary), "objects_per_s": summary.objects_per_s,
                                        "steps_per_s": summary.steps_per_s}, indent=2) + "\n")
    return path
