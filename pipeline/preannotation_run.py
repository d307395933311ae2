"""A bulk pre-annotation run: prompts -> masks on Ray workers -> a ledger -> COCO file and/or Label Studio.

`run(cfg, label_studio)` reads the prompts (a COCO file, or a Label Studio project), refuses at the start
whatever could only fail at the end (an output that cannot be written), spreads the images over CPU Ray
workers (`pipeline.preannotation.PreannotateWorker`) and appends every finished image to
RUN_DIR/ledger.jsonl, so a killed run resumes where it stopped. RUN_DIR/report.csv lists every object.

Label Studio is reached only through the `LabelStudioLink` the caller passes in
(`connectors.label_studio_preannotation.ProjectLink`): the pipeline layer never imports `connectors`, and a
run with COCO prompts and a COCO output needs no Label Studio at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from interformer.checkpoint import model_version as weights_version
from interformer.click_engine import ClickEngineConfig
from interformer.training.run_lock import LOCK_FILE, RunFolderBusy, RunFolderLock

from .actor_pool import ClusterStalled, WorkerStartError, live_workers, map_unordered_surviving
from .coco_output import FORMATS, coco_annotations, coco_results
from .encoding import EncoderSpec, build_predictor
from .feature_store import DEFAULT_ROOT, DEFAULT_TABLE
from .files import write_json_atomic
from .ledger import Ledger
from .placement import actors_that_fit, describe, pool_size
from .polygons import DEFAULT_TOLERANCE
from .preannotation import ClickPolicy, ImageResult, MaskFormat, PreannotateWorker, WorkerSpec, lost_image
from .preannotation_report import REPORT, SUMMARY, PreannotateSummary, tally, write_report
from .prompts import USE_CHOICES, ImageJob, Problem, PromptFileError, PromptSet, coco_prompts, read_coco_file
from .ray_runtime import init_ray, live_node_resources
from .run_info import RunInfoError, changed_settings, record_settings
from .stall import DEFAULT_STALL_TIMEOUT_S

RUN_INFO = "run.json"
LEDGER = "ledger.jsonl"
DEFAULT_IMAGE_URL = "/data/local-files/?d={file_name}"


@dataclass
class PreannotateConfig:
    """Every setting of a run (the command line's options); inconsistent combinations raise ValueError."""

    coco: str | None = None
    image_root: str | None = None
    coco_id: str = "file_name"
    use: str = "auto"
    ls_project: int | None = None
    ls_url: str | None = None
    ls_prompts: str = "annotations"
    ls_prompt_model_version: str | None = None
    ls_brush: str | None = None
    ls_polygon: str | None = None
    push: bool = False
    push_batch: int = 50
    image_url: str = DEFAULT_IMAGE_URL
    coco_out: str | None = None
    coco_format: str = "annotations"
    db: str = DEFAULT_ROOT
    table: str = DEFAULT_TABLE
    storage_options: dict = field(default_factory=dict)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    model_version: str | None = None
    policy: ClickPolicy = field(default_factory=ClickPolicy)
    output: MaskFormat = field(default_factory=MaskFormat)
    encode_missing: bool = False
    image_access: Any = None  # pipeline.image_access.ImageAccess: where task images may be read from
    engine: ClickEngineConfig = field(default_factory=ClickEngineConfig)  # what runs the clicks
    run_dir: str | None = None
    fresh: bool = False
    workers: int | None = None
    cpus_per_worker: float = 1.0
    address: str | None = None
    num_cpus: int | None = None
    limit: int | None = None
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # s with no result and no node for a worker: the run stops

    def __post_init__(self) -> None:
        if self.coco is None and self.ls_project is None:
            raise ValueError("give the prompts: --coco FILE or --ls-project ID")
        if self.coco is not None and self.ls_project is not None and not self.push:
            raise ValueError("--coco with --ls-project: add --push to push the COCO prompts' masks into that project")
        if not self.coco_out and not self.push:
            raise ValueError("nothing to write: give --coco-out FILE and/or --push")
        if self.push and self.ls_project is None:
            raise ValueError("--push needs --ls-project")
        if self.coco_format not in FORMATS:
            raise ValueError(f"--coco-format must be one of {FORMATS}")
        if self.coco_format == "results" and self.coco is None:
            raise ValueError("--coco-format results needs COCO prompts (--coco): Label Studio tasks have no COCO ids")
        if self.coco_out and self.coco_format == "results" and self.output.kind == "polygon":
            raise ValueError("--coco-format results holds RLE segmentations only (pycocotools' COCO.loadRes, which "
                             "reads results files, cannot read polygons): write polygons with --coco-format "
                             "annotations, or results with --mask-format rle")
        if self.coco_out and "://" in self.coco_out:
            raise ValueError("--coco-out must be a local file")
        if self.use not in USE_CHOICES:
            raise ValueError(f"--use must be one of {USE_CHOICES}")
        if self.ls_prompt_model_version and self.ls_prompts != "predictions":
            raise ValueError("--ls-prompt-model-version goes with --ls-prompts predictions")
        if self.ls_polygon is not None and self.output.kind != "polygon":
            raise ValueError("--ls-polygon names the PolygonLabels tag of --mask-format polygon")
        if self.ls_brush is not None and self.output.kind != "rle":
            raise ValueError("--ls-brush names the BrushLabels tag of --mask-format rle; with --mask-format polygon "
                             "name the PolygonLabels tag with --ls-polygon")
        if self.push_batch < 1:
            raise ValueError("--push-batch must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError("--workers must be 0 or more")
        if self.model_version is not None and ("," in self.model_version or not self.model_version.strip()):
            raise ValueError("--model-version must be non-empty and contain no comma")


@dataclass
class TaskAttachment:
    """Jobs matched to their Label Studio tasks, and what the project already holds."""

    jobs: list[ImageJob]
    delivered: set[str]  # ImageJob.key of the jobs whose task has a prediction of this model version
    tasks_created: int = 0
    duplicate_tasks: list[dict] = field(default_factory=list)
    lost: list[dict] = field(default_factory=list)  # {"image_id", "task"} of jobs whose task was deleted meanwhile
    no_task: list[dict] = field(default_factory=list)  # {"image_id", "reason"}: no task, and none can be created
    tasks_removed: int = 0  # tasks this run created and deleted again: another run's older task shows the image


class PredictionPusher(Protocol):
    """Buffers finished images as Label Studio predictions and imports them in batches."""

    pushed: int
    already_there: int  # not pushed: another run had pushed this model version to the task meanwhile
    failures: list[dict]  # {"task", "error"}: refused by Label Studio, or not pushed
    in_doubt: list[dict]  # {"task", "error"}: sent without a definite answer, not found in the project since

    def add(self, result: ImageResult) -> None: ...

    def finish(self) -> None:
        """Push what is buffered; settle what was sent without a definite answer."""


class LabelStudioLink(Protocol):
    """What a run needs from a Label Studio project (connectors.label_studio_preannotation.ProjectLink)."""

    source: str  # "URL#project", the run's prompt source name
    image_access: Any  # where workers may fetch task images from (--encode-missing)

    def prompts(self, model_version: str) -> PromptSet: ...

    def keep_project_labels(self, jobs: list[ImageJob]) -> tuple[list[ImageJob], list[Problem]]: ...

    def attach_tasks(self, jobs: list[ImageJob], model_version: str) -> TaskAttachment: ...

    def pusher(self, model_version: str, task_of: dict[str, int], fingerprint: str,
               leave_out: frozenset[str] = frozenset()) -> PredictionPusher: ...


class OutputError(ValueError):
    """An output the run could not write at its end; refused before any work."""


class RunDirError(ValueError):
    """The run folder holds a run of other settings, is used by another run now, or cannot be created/read."""


class WorkerDied(RuntimeError):
    """The run lost its workers (none alive and no live node could hold one for the stall timeout); what finished
    is in the ledger."""


def run(cfg: PreannotateConfig, label_studio: LabelStudioLink | None = None) -> PreannotateSummary:
    """Prompts -> jobs -> masks on Ray workers (ledger after each image) -> Label Studio and/or COCO."""
    if cfg.ls_project is not None and label_studio is None:
        raise ValueError("a run with --ls-project needs its LabelStudioLink")
    if cfg.encoder.checkpoint is None:
        _loud(f"WARNING: no --checkpoint given: the {cfg.encoder.variant} model is RANDOMLY INITIALISED "
              f"(seed {cfg.encoder.seed}).\nIts masks are useless for labelling; use it to try the pipeline only.")
    predictor = build_predictor(cfg.encoder, device="cpu")  # fails fast on a bad checkpoint; gives the fingerprint
    fingerprint, variant = predictor.fingerprint, predictor.model.config.name
    del predictor
    model_version = cfg.model_version or weights_version(cfg.encoder.checkpoint, variant, cfg.encoder.seed)
    prompts = (coco_prompts(read_coco_file(cfg.coco), cfg.image_root, cfg.coco_id, cfg.use) if cfg.coco
               else label_studio.prompts(model_version))
    jobs, problems = prompts.images, list(prompts.problems)
    unpushable: list[Problem] = []
    if cfg.push:
        pushable, dropped = label_studio.keep_project_labels(jobs)
        if cfg.coco_out:  # the COCO file takes every object; the push leaves out what the project cannot hold
            unpushable = dropped
        else:
            jobs = pushable
            problems.extend(dropped)
    if cfg.limit is not None:
        jobs = jobs[: cfg.limit]
    check_unique_keys(jobs)
    check_outputs(cfg, jobs)
    source = source_name(cfg, label_studio)
    run_dir, lock = prepare_run_dir(cfg, run_info(cfg, source, fingerprint, model_version))
    try:
        return _run_in(cfg, label_studio, run_dir, prompts, jobs, problems, fingerprint, model_version, source,
                       unpushable)
    finally:
        lock.release()


def _run_in(cfg: PreannotateConfig, label_studio: LabelStudioLink | None, run_dir: Path, prompts: PromptSet,
            jobs: list[ImageJob], problems: list[Problem], fingerprint: str, model_version: str,
            source: str, unpushable: Sequence[Problem] = ()) -> PreannotateSummary:
    """The run proper, with the run folder locked: resume from the ledger, segment, push, write the outputs.
    `unpushable`: objects segmented for --coco-out whose label the Label Studio project cannot hold."""
    summary = PreannotateSummary(fingerprint, model_version, cfg.encoder.checkpoint is None, source, str(run_dir),
                                 images=len(jobs), objects=sum(len(j.objects) for j in jobs),
                                 not_usable=len(problems), mask_format=cfg.output.kind,
                                 not_pushed_labels=[{"key": p.key, "label": p.label} for p in unpushable])
    (run_dir / SUMMARY).unlink(missing_ok=True)  # an earlier run's, which a run ending in an error would leave
    ledger = Ledger(run_dir / LEDGER)
    done = latest_results(ledger)

    delivered: set[str] = set()
    if cfg.push:
        attached = label_studio.attach_tasks(jobs, model_version)
        jobs, delivered = attached.jobs, attached.delivered
        summary.tasks_created, summary.duplicate_tasks = attached.tasks_created, attached.duplicate_tasks
        summary.tasks_gone, summary.no_task = attached.lost, attached.no_task
        summary.duplicate_tasks_removed = attached.tasks_removed
    by_key = {j.key: j for j in jobs}
    finished = {k for k, j in by_key.items() if k in done and done[k].final and done[k].digest == j.digest()}
    changed = features_changed(cfg, fingerprint, [done[k] for k in sorted(finished)])
    finished -= {r.key for r in changed}
    summary.features_changed = [{"image_id": r.image_id, "key": r.key} for r in changed]
    needs_mask = [j for j in jobs if j.key not in finished and (cfg.coco_out or j.key not in delivered)]
    summary.done_before = len(finished)
    summary.delivered_before = len(delivered)
    print(f"preannotate: {summary.objects} objects on {summary.images} images ({summary.not_usable} prompts not "
          f"usable); {len(finished)} images done in an earlier run"
          + (f" ({len(changed)} more segmented again: their features were encoded again since)" if changed else "")
          + f", {len(delivered)} already predicted by "
          f"{model_version}; {len(needs_mask)} images to segment", flush=True)

    pusher = None
    if cfg.push:
        pusher = label_studio.pusher(model_version, {j.key: j.task_id for j in jobs}, fingerprint,
                                     frozenset(p.key for p in unpushable))
        for key in sorted(finished - delivered):
            pusher.add(done[key])
    image_access = label_studio.image_access if label_studio is not None else None
    t0 = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        try:
            for result in segment_all(cfg, needs_mask, summary, image_access):
                ledger.append({"type": "image", "result": result.to_dict()})
                done[result.key] = result
                summary.count(result)
                if pusher is not None and result.key not in delivered and result.final:
                    pusher.add(result)
        except (KeyboardInterrupt, WorkerDied) as e:
            _stopped(summary, str(e))
        summary.seconds = time.monotonic() - t0
        if pusher is not None:
            try:
                pusher.finish()
            except KeyboardInterrupt:  # a second stop while the last predictions were on their way
                _stopped(summary, "", "while the last predictions were pushed (those sent are listed as in doubt)")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pusher is not None:
            summary.pushed, summary.push_failures = pusher.pushed, list(pusher.failures)
            summary.push_in_doubt = list(pusher.in_doubt)
            summary.pushed_by_another_run = pusher.already_there
            summary.push_stopped = pusher.stopped
            summary.duplicates_removed = pusher.duplicates_removed

    current = [done[j.key] for j in jobs if j.key in done and done[j.key].digest == j.digest()]
    if cfg.coco_out and not summary.interrupted:
        write_coco(cfg, prompts, by_key, current, model_version, summary)
    tally(summary, current, problems, cfg.policy)
    write_report(run_dir / REPORT, problems, current)
    return summary


def _stopped(summary: PreannotateSummary, error: str, when: str = "") -> None:
    """Record (and say) that the run was stopped or lost its workers: its outputs are still written."""
    summary.interrupted = True
    summary.error = summary.error or error or None
    said = f"stopped: {error}" if error else "interrupted" + (f" {when}" if when else "")
    print(f"\npreannotate: {said}; the finished images are in the ledger, run again to resume", file=sys.stderr,
          flush=True)


def check_unique_keys(jobs: Sequence[ImageJob]) -> None:
    """Refuse jobs that share a key: the ledger, the resume and the push all count an image once by its key,
    so two jobs of one key would overwrite each other's results and push one of them twice."""
    seen: dict[str, ImageJob] = {}
    for j in jobs:
        if j.key in seen:
            raise PromptFileError(f"two images of the prompts have the same key {j.key!r} (image ids "
                                  f"{seen[j.key].image_id!r} and {j.image_id!r}): give each image one entry")
        seen[j.key] = j


def check_outputs(cfg: PreannotateConfig, jobs: Sequence[ImageJob]) -> None:
    """Refuse, before any work, an output that could only fail when it is written at the end."""
    if not cfg.coco_out:
        return
    if cfg.coco_format == "results":
        no_id = [j.image_id for j in jobs if j.source_image_id is None]
        if no_id:
            raise OutputError(f"--coco-format results needs integer COCO image ids, and {len(no_id)} of the "
                              f"{len(jobs)} images of {cfg.coco} have none (e.g. {no_id[0]!r}); write "
                              "--coco-format annotations instead")
    out = Path(cfg.coco_out)
    if cfg.coco and "://" not in cfg.coco and out.resolve() == Path(cfg.coco).resolve():
        raise OutputError(f"--coco-out {cfg.coco_out!r} is the prompt file itself; write the masks elsewhere")
    if out.is_dir():
        raise OutputError(f"--coco-out {cfg.coco_out!r} is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--coco-out {cfg.coco_out!r}: cannot create its folder ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OutputError(f"--coco-out {cfg.coco_out!r} is not writable")


def source_name(cfg: PreannotateConfig, label_studio: LabelStudioLink | None) -> str:
    """The prompt source: the COCO file (absolute path or URI), or Label Studio URL#project."""
    if cfg.coco:
        return cfg.coco if "://" in cfg.coco else os.path.abspath(cfg.coco)
    return label_studio.source


def run_info(cfg: PreannotateConfig, source: str, fingerprint: str, model_version: str) -> dict:
    """What decides the masks of a run; a run folder holds the results of one such setting only.

    The ledger holds masks in the run's format, so the format and the click engine are part of the setting;
    the defaults (RLE, the exact torch engine) are recorded by the absence of `mask_format` / `click_engine`,
    as in the folders of runs made before those options existed, which therefore still resume."""
    info = {"source": source, "fingerprint": fingerprint, "model_version": model_version, "use": cfg.use,
            "coco_id": cfg.coco_id, "ls_prompts": cfg.ls_prompts, "ls_prompt_model_version": cfg.ls_prompt_model_version,
            "policy": asdict(cfg.policy)}
    if cfg.output.kind != "rle":
        info.update(mask_format=cfg.output.kind, polygon_tolerance=cfg.output.tolerance)
    if cfg.engine.engine != "torch":
        info.update(click_engine=cfg.engine.engine)
    return info


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "run"


_IDENTITY = ("source", "fingerprint", "model_version")  # named by the folder's stem and model version
_CONFIG_DEFAULTS = {f.name: f.default for f in fields(PreannotateConfig)}
_DEFAULT_SETTINGS = {**{k: _CONFIG_DEFAULTS[k] for k in ("use", "coco_id", "ls_prompts", "ls_prompt_model_version")},
                     "policy": asdict(ClickPolicy()), "mask_format": None, "polygon_tolerance": DEFAULT_TOLERANCE,
                     "click_engine": None}  # run_info's settings as a run of the defaults records them


def _setting_parts(key: str, value: Any) -> list[str]:
    """Name parts of one non-default setting of `run_info`."""
    if key in ("mask_format", "click_engine", "ls_prompts"):
        return [str(value)]
    if key == "polygon_tolerance":
        return [f"tol{value:g}"]
    if key == "policy" and isinstance(value, dict):
        default = _DEFAULT_SETTINGS["policy"]
        names = {"target_iou": "iou", "max_clicks": "clicks"}
        return [f"{names.get(k, k)}{v:g}" if isinstance(v, (int, float)) else f"{k}-{v}"
                for k, v in sorted(value.items()) if default.get(k) != v]
    if key == "ls_prompt_model_version":
        return [f"from-{value}"]
    return [f"{key.replace('_', '-')}-{value}"]


def run_name_suffix(info: dict) -> str:
    """The settings of `run_info` that differ from their defaults, as a readable run-folder name suffix
    ("-polygon-tol2", "-fast", "-use-box-clicks5"); "" for the defaults, so folders made before settings
    were named still resolve. Runs of different settings get different default folders (a folder holds one
    setting): a suffix with free text (a model version), one that cannot be spelt exactly in a folder name, or
    a long one ends in a hash of the settings."""
    changed = {k: v for k, v in sorted(info.items()) if k not in _IDENTITY and _DEFAULT_SETTINGS.get(k, ...) != v}
    parts = [part for k, v in changed.items() for part in _setting_parts(k, v)]
    if not parts:
        return ""
    text = "-".join(parts)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    free_text = any(k == "ls_prompt_model_version" or k not in _DEFAULT_SETTINGS for k in changed)
    if free_text or name != text or len(name) > 60:  # free text could spell another setting's parts
        digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:40].strip('-')}-{digest}"
    return f"-{name}"


def default_run_dir(cfg: PreannotateConfig, info: dict) -> Path:
    """runs/preannotate/<prompt source>-<model version>[-<settings that differ from the defaults>]."""
    stem = Path(cfg.coco).stem if cfg.coco else f"ls-project-{cfg.ls_project}"
    return Path("runs") / "preannotate" / (_slug(f"{stem}-{info['model_version']}") + run_name_suffix(info))


def prepare_run_dir(cfg: PreannotateConfig, info: dict) -> tuple[Path, RunFolderLock]:
    """Create and lock the run folder, and check that it holds a run of the same setting (--fresh starts over).

    The lock (an flock on RUN_DIR/writer.lock, dropped by the kernel however the process ends) is held for
    the whole run: a second run on the same folder would read the same ledger and push the same predictions,
    so it is refused. The caller releases the returned lock."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        run_dir = default_run_dir(cfg, info)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run folder {run_dir}: {e.strerror or e}") from None
    lock = lock_run_dir(run_dir)
    try:
        check_settings(cfg, run_dir, info)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def lock_run_dir(run_dir: Path) -> RunFolderLock:
    """Take the run folder's writer lock, or raise RunDirError naming the run that holds it."""
    lock = RunFolderLock(run_dir)
    try:
        lock.acquire()
    except RunFolderBusy:
        raise RunDirError(f"{run_dir} is in use by another pre-annotation run ({_holder(run_dir / LOCK_FILE)}). "
                          "A run folder takes one run at a time: wait for that run to end (it resumes nothing "
                          "this one would not) or stop it, then run again; or give this run another --run-dir"
                          ) from None
    except OSError as e:
        raise RunDirError(f"cannot lock the run folder {run_dir}: {e.strerror or e}") from None
    return lock


def _holder(path: Path) -> str:
    """Who holds a writer lock, from what the holder wrote into it."""
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not isinstance(who, dict) or not who:
        return "process unknown"
    return f"process {who.get('pid')} on {who.get('host')}, since {who.get('since')}"


def check_settings(cfg: PreannotateConfig, run_dir: Path, info: dict) -> None:
    """Refuse a folder holding a run of other settings (or an unreadable run.json); --fresh starts over."""
    info_path = run_dir / RUN_INFO
    if cfg.fresh:
        Ledger(run_dir / LEDGER).clear()
    else:
        try:
            changed = changed_settings(info_path, info)
        except RunInfoError as e:
            raise RunDirError(f"{e}; or use --fresh to start over in it") from None
        if changed:
            raise RunDirError(f"{run_dir} holds a run with other settings (differs in: {', '.join(changed)}); "
                              "use another --run-dir, or --fresh to start over there")
    record_settings(info_path, info)


def latest_results(ledger: Ledger) -> dict[str, ImageResult]:
    """The newest ledger record of each image job (by ImageJob.key)."""
    out: dict[str, ImageResult] = {}
    for rec in ledger.read(repair=True):
        if rec.get("type") == "image":
            r = ImageResult.from_dict(rec["result"])
            out[r.key] = r
    return out


def features_changed(cfg: PreannotateConfig, fingerprint: str, results: Sequence[ImageResult]) -> list[ImageResult]:
    """The results whose feature row is no longer the one stored under its id: the image was encoded again
    (`jobs/encode.py --reencode-changed`, perhaps while the earlier run was reading) or its row is gone. Their
    masks no longer match the image, so a resumed run segments them again, as a fresh run would."""
    rows = [r for r in results if r.feature_row]
    if not rows:
        return []
    from .feature_store import FeatureReader, FeatureStoreError

    reader = FeatureReader(cfg.db, fingerprint, table=cfg.table, storage_options=cfg.storage_options or None)
    try:
        now = reader.identities(r.feature_row[0] for r in rows)
    except FeatureStoreError as e:  # kept as they are: segmenting them again now could only fail
        print(f"preannotate: WARNING: cannot check whether the features of the {len(rows)} images done in an "
              f"earlier run were encoded again since ({e}); their masks are kept", file=sys.stderr, flush=True)
        return []
    return [r for r in rows if r.features_changed(now)]


def worker_spec(cfg: PreannotateConfig, threads: int, image_access: Any) -> WorkerSpec:
    return WorkerSpec(encoder=cfg.encoder, db=cfg.db, table=cfg.table, policy=cfg.policy,
                      encode_missing=cfg.encode_missing, threads=threads, image_access=image_access,
                      storage_options=cfg.storage_options or None, engine=cfg.engine, output=cfg.output)


def segment_all(cfg: PreannotateConfig, jobs: list[ImageJob], summary: PreannotateSummary,
                image_access: Any = None) -> Iterator[ImageResult]:
    """Yield an ImageResult per job as workers finish them (unordered), with a progress bar over objects.

    Workers keep Ray's batch priority (niceness 15, RAY_worker_niceness) so that on shared nodes the
    interactive backend's actors (niceness 0) win."""
    from tqdm import tqdm

    if not jobs:
        return
    t0 = time.monotonic()
    threads = max(1, int(cfg.cpus_per_worker))
    spec = worker_spec(cfg, threads, image_access)
    bar = tqdm(total=sum(len(j.objects) for j in jobs), unit="obj", desc="preannotate", disable=None)
    try:
        if cfg.workers == 0:
            summary.workers = 0
            worker = PreannotateWorker(spec)
            summary.startup_s = time.monotonic() - t0
            for job in jobs:
                result = worker.run(job)
                bar.update(len(job.objects))
                yield result
            return
        import ray

        init_ray(cfg.address, num_cpus=cfg.num_cpus, log_to_driver=True, job="preannotate")
        try:
            nodes = live_node_resources()
            n = pool_size(cfg.workers, nodes, cfg.cpus_per_worker, items=len(jobs))
            if n == 0:
                raise WorkerStartError(f"--cpus-per-worker {cfg.cpus_per_worker:g}: no live node of the cluster can "
                                       f"hold a worker ({describe(nodes)})")
            if cfg.workers and n < min(cfg.workers, len(jobs)):
                print(f"preannotate: {n} workers, not {cfg.workers}: the live nodes hold no more at once "
                      f"({describe(nodes)})", file=sys.stderr, flush=True)
            summary.workers = n
            actor = ray.remote(PreannotateWorker).options(num_cpus=cfg.cpus_per_worker, max_restarts=0)
            # model loaded, table opened: the rest is throughput; a worker whose node was lost meanwhile is dropped
            actors = live_workers([actor.remote(spec) for _ in range(n)], lambda a: a.ping.remote())
            summary.startup_s = time.monotonic() - t0
            bar.set_description(f"preannotate ({max(1, len(actors))} workers)")

            def placeable() -> bool:
                return actors_that_fit(live_node_resources(),
                                       cfg.cpus_per_worker) > 0

            try:
                for result in map_unordered_surviving(actors or [actor.remote(spec)], lambda a, job: a.run.remote(job),
                                                      jobs, lambda: actor.remote(spec), on_lost=lost_image,
                                                      placeable=placeable, stall_timeout_s=cfg.stall_timeout):
                    bar.update(len(result.objects))
                    yield result
            except ClusterStalled as e:
                raise WorkerDied(f"the cluster stalled: {e}") from None
        finally:
            ray.shutdown()
    finally:
        bar.close()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _loud(message: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n{message}\n{bar}\n\n")
    sys.stderr.flush()


def write_coco(cfg: PreannotateConfig, prompts: PromptSet, by_key: dict[str, ImageJob], results: list[ImageResult],
               model_version: str, summary: PreannotateSummary) -> None:
    if cfg.coco_format == "results":
        doc = coco_results(results, by_key, model_version)
        count = len(doc)
    else:
        doc = coco_annotations(results, by_key, model_version, prompts.categories or None,
                               prompts.image_entries or None)
        count = len(doc["annotations"])
    write_json_atomic(cfg.coco_out, doc)
    summary.coco_out = str(cfg.coco_out)
    summary.coco_annotations = count
