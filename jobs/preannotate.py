"""Pre-annotate a collection with InterFormer: prompts (boxes, coarse masks or polygons, points) -> masks.

Examples:
  # COCO prompts -> COCO file of masks (features stored earlier by jobs/encode.py)
  python jobs/preannotate.py --coco coarse.json --image-root images/ --coco-out masks.json --checkpoint light.pth

  # COCO prompts -> predictions in Label Studio project 3 (tasks are created for images without one)
  LABEL_STUDIO_URL=http://ls:8080 LABEL_STUDIO_API_KEY=... python jobs/preannotate.py --coco coarse.json \\
      --image-root images/ --ls-project 3 --push --checkpoint light.pth

  # the boxes/keypoints annotators drew in project 3 -> brush predictions in the same project
  python jobs/preannotate.py --ls-project 3 --push --checkpoint light.pth

Per object: a box becomes the backend's centre click + region; a coarse mask or polygon drives RITM's click
simulator until --target-iou against it or --max-clicks; points are clicked as given. Images are spread
over CPU Ray workers that read the stored features by image id. Every finished image is appended to
RUN_DIR/ledger.jsonl, so a killed run resumes where it stopped; Label Studio tasks that already hold a
prediction of this model version are never given a second one. RUN_DIR/report.csv lists every object
(clicks, IoU against the coarse label, score, or why it was not segmented).
"""
from __future__ import annotations

import sys

try:
    import argparse
    import csv
    import json
    import os
    import re
    import signal
    import socket
    import time
    import warnings
    from collections import Counter
    from dataclasses import asdict, dataclass, field, replace
    from pathlib import Path

    _REPO_ROOT = Path(__file__).resolve().parents[1]
    if str(_REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(_REPO_ROOT))  # so that a checkout runs without `pip install -e .`

    from tqdm import tqdm

    from interformer.config import CONFIGS, PreprocessConfig
    from pipeline.coco_output import FORMATS, coco_annotations, coco_results, write_json_atomic
    from pipeline.encoding import EncoderSpec, build_predictor
    from pipeline.feature_store import DEFAULT_ROOT, DEFAULT_TABLE
    from pipeline.ledger import Ledger, LedgerError
    from pipeline.preannotation import ClickPolicy, ImageResult, PreannotateWorker, WorkerSpec
    from pipeline.prompts import (
        USE_CHOICES,
        ImageJob,
        Problem,
        PromptFileError,
        PromptSet,
        coco_prompts,
        filter_labels,
        read_coco_file,
    )
except ImportError as _e:  # the usual cause: `ray job submit -- python ...` ran the head's system python
    sys.stderr.write(
        f"error: {_e}.\nThis interpreter ({sys.executable}) lacks the project's packages. With `ray job submit`, "
        "name the project environment's python explicitly (`-- /path/to/.venv/bin/python jobs/preannotate.py ...`).\n"
    )
    raise SystemExit(3)

RUN_INFO = "run.json"
LEDGER = "ledger.jsonl"
REPORT = "report.csv"
SUMMARY = "summary.json"
DEFAULT_IMAGE_URL = "/data/local-files/?d={file_name}"


@dataclass
class JobConfig:
    """Everything the job needs, filled from the command line."""

    coco: str | None = None
    image_root: str | None = None
    coco_id: str = "file_name"
    use: str = "auto"
    ls_project: int | None = None
    ls_url: str | None = None
    ls_prompts: str = "annotations"
    ls_prompt_model_version: str | None = None
    ls_brush: str | None = None
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
    encode_missing: bool = False
    allowed_roots: tuple[str, ...] = ()
    run_dir: str | None = None
    fresh: bool = False
    workers: int | None = None
    cpus_per_worker: float = 1.0
    address: str | None = None
    num_cpus: int | None = None
    limit: int | None = None


@dataclass
class Summary:
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
    encoded_on_the_fly: int = 0
    tasks_created: int = 0
    pushed: int = 0
    push_failures: list = field(default_factory=list)
    duplicate_tasks: list = field(default_factory=list)
    coco_out: str | None = None
    coco_annotations: int = 0
    workers: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0
    interrupted: bool = False
    error: str | None = None  # why the run stopped early (a worker died), when it did

    @property
    def objects_per_s(self) -> float:
        """Objects segmented per second once the workers were up (Ray and model start-up excluded)."""
        busy = self.seconds - self.startup_s
        return self.computed_objects / busy if busy > 0 else 0.0

    @property
    def steps_per_s(self) -> float:
        busy = self.seconds - self.startup_s
        return self.computed_steps / busy if busy > 0 else 0.0


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(
        prog="jobs/preannotate.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\nLabel Studio credentials come from the environment: "
        "LABEL_STUDIO_URL (or --ls-url) and LABEL_STUDIO_API_KEY.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("prompts (one source)")
    src.add_argument("--coco", metavar="FILE",
                     help="COCO annotation file of prompts: per annotation 'bbox', 'segmentation' (polygons or RLE: "
                     "a coarse mask) and/or points ('keypoints' triplets, or 'points' [[x, y], ...] with optional "
                     "'point_labels' 1/0); its categories are the labels")
    src.add_argument("--image-root", help="folder (or URI prefix) of the COCO file's images: needed to encode "
                     "missing images and for the {uri} of new Label Studio tasks")
    src.add_argument("--coco-id", choices=("file_name", "id"), default="file_name",
                     help="feature-table id of a COCO image: its file_name (as jobs/encode.py lists a COCO file) or "
                     "its numeric id (default: %(default)s)")
    src.add_argument("--use", choices=USE_CHOICES, default="auto",
                     help="which prompt of an annotation to use: auto = points if given, else the segmentation, "
                     "else the box; or force one kind (default: %(default)s)")
    src.add_argument("--ls-project", type=int, metavar="ID",
                     help="Label Studio project: the prompt source when no --coco is given (its tasks' rectangles "
                     "and keypoints), and the target of --push")
    src.add_argument("--ls-url", default=None, help="Label Studio base URL (default: $LABEL_STUDIO_URL)")
    src.add_argument("--ls-prompts", choices=("annotations", "predictions"), default="annotations",
                     help="read prompt regions from each task's newest annotation or prediction (default: %(default)s)")
    src.add_argument("--ls-prompt-model-version", metavar="VERSION",
                     help="with --ls-prompts predictions: only predictions of this model version (e.g. a detector's)")
    src.add_argument("--ls-brush", metavar="NAME", help="BrushLabels tag to fill when the config has several")
    out = p.add_argument_group("outputs (at least one)")
    out.add_argument("--coco-out", metavar="FILE", help="write the masks as a COCO file (RLE segmentations)")
    out.add_argument("--coco-format", choices=FORMATS, default="annotations",
                     help="'annotations': a self-contained COCO dataset; 'results': a results list for "
                     "COCO.loadRes against the --coco file (default: %(default)s)")
    out.add_argument("--push", action="store_true",
                     help="push the masks as predictions (brush RLE, model_version, score) into --ls-project; "
                     "tasks are created, with image_id in their data, for images that have none")
    out.add_argument("--push-batch", type=int, default=50, help="predictions per import call (default: %(default)s)")
    out.add_argument("--image-url", default=DEFAULT_IMAGE_URL,
                     help="image URL of new tasks, from {file_name}, {image_id} and {uri} (default: %(default)s, "
                     "i.e. Label Studio's local files with LOCAL_FILES_DOCUMENT_ROOT = --image-root)")
    model = p.add_argument_group("model and features")
    model.add_argument("--db", default=DEFAULT_ROOT, help="LanceDB root of the feature table (default: %(default)s)")
    model.add_argument("--table", default=DEFAULT_TABLE, help="feature table name (default: %(default)s)")
    model.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="storage option for Lance on object stores (e.g. region=us-east-1), as given to "
                       "jobs/encode.py; repeatable")
    model.add_argument("--checkpoint", help="InterFormer weights, the same file jobs/encode.py used; without it the "
                       "seeded RANDOM initialisation of jobs/encode.py (for trying the pipeline only)")
    model.add_argument("--variant", choices=sorted(CONFIGS),
                       help="model variant (read from the checkpoint; default 'light' with random weights)")
    model.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: %(default)s)")
    model.add_argument("--max-side", type=int, default=None, help="the --max-side jobs/encode.py used (part of the "
                       "feature fingerprint; default: native size)")
    model.add_argument("--model-version", help="model_version written with predictions and COCO entries (default: "
                       "the backend's, interformer-<variant>-<checkpoint>-<sha256[:8]>); a re-run with the same one "
                       "adds no duplicates")
    model.add_argument("--encode-missing", action="store_true",
                       help="encode images that have no stored features on the workers' CPUs (and store them); "
                       "without it their objects are reported as no_features")
    model.add_argument("--allowed-root", action="append", default=[], metavar="DIR",
                       help="local folder Label Studio tasks' image paths may point into, for --encode-missing "
                       "(repeatable)")
    sim = p.add_argument_group("click simulation (coarse masks and polygons)")
    sim.add_argument("--target-iou", type=float, default=0.9,
                     help="stop clicking when the mask reaches this IoU against the coarse label (default: %(default)s)")
    sim.add_argument("--max-clicks", type=int, default=10,
                     help="at most this many simulated clicks per object; the best mask is kept (default: %(default)s)")
    run = p.add_argument_group("running")
    run.add_argument("--run-dir", help="folder of the ledger, report and summary (default: "
                     "runs/preannotate/<source>-<model version>)")
    run.add_argument("--fresh", action="store_true", help="forget an earlier run in --run-dir and start over")
    run.add_argument("--workers", type=int, default=None,
                     help="Ray workers (default: the cluster's CPUs / --cpus-per-worker); 0 runs in this process")
    run.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs reserved per worker; its torch threads (default: %(default)s)")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (e.g. auto, ray://head:10001); default: the cluster of a `ray job "
                     "submit` (RAY_ADDRESS), else a private local Ray")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private local Ray (default: all)")
    run.add_argument("--limit", type=int, default=None, help="process at most this many images (quick trials)")
    a = p.parse_args(argv)
    if a.coco is None and a.ls_project is None:
        p.error("give the prompts: --coco FILE or --ls-project ID")
    if a.coco is not None and a.ls_project is not None and not a.push:
        p.error("--coco with --ls-project: add --push to push the COCO prompts' masks into that project")
    if not a.coco_out and not a.push:
        p.error("nothing to write: give --coco-out FILE and/or --push")
    if a.push and a.ls_project is None:
        p.error("--push needs --ls-project")
    if a.coco_format == "results" and a.coco is None:
        p.error("--coco-format results needs COCO prompts (--coco): Label Studio tasks have no COCO ids")
    if a.ls_prompt_model_version and a.ls_prompts != "predictions":
        p.error("--ls-prompt-model-version goes with --ls-prompts predictions")
    for name in ("push_batch", "max_clicks"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.workers is not None and a.workers < 0:
        p.error("--workers must be 0 or more")
    if not 0.0 < a.target_iou <= 1.0:
        p.error("--target-iou must be in (0, 1]")
    if a.checkpoint is not None and not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint!r} is not a file")
    if a.model_version is not None and ("," in a.model_version or not a.model_version.strip()):
        p.error("--model-version must be non-empty and contain no comma")
    try:
        from connectors.label_studio_client import url_template

        url_template(a.image_url)
    except ValueError as e:
        p.error(f"--image-url: {e}")
    options = {}
    for item in a.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--storage-option expects KEY=VALUE, got {item!r}")
        options[key] = value
    variant = a.variant or (None if a.checkpoint else "light")
    encoder = EncoderSpec(checkpoint=os.path.abspath(a.checkpoint) if a.checkpoint else None, variant=variant,
                          preprocess=PreprocessConfig(max_side=a.max_side), seed=a.seed)
    return JobConfig(
        coco=a.coco, image_root=a.image_root, coco_id=a.coco_id, use=a.use, ls_project=a.ls_project,
        ls_url=a.ls_url, ls_prompts=a.ls_prompts, ls_prompt_model_version=a.ls_prompt_model_version,
        ls_brush=a.ls_brush, push=a.push, push_batch=a.push_batch, image_url=a.image_url, coco_out=a.coco_out,
        coco_format=a.coco_format, db=a.db if "://" in a.db else os.path.abspath(a.db), table=a.table,
        storage_options=options,
        encoder=encoder, model_version=a.model_version, policy=ClickPolicy(a.target_iou, a.max_clicks),
        encode_missing=a.encode_missing, allowed_roots=tuple(a.allowed_root), run_dir=a.run_dir, fresh=a.fresh,
        workers=a.workers, cpus_per_worker=a.cpus_per_worker, address=a.address, num_cpus=a.num_cpus, limit=a.limit,
    )


def default_model_version(encoder: EncoderSpec, variant: str) -> str:
    """The Label Studio backend's model_version for the same weights (connectors.cli.model_version)."""
    from connectors.cli import model_version

    return model_version(encoder.checkpoint, variant, encoder.seed)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:80] or "run"


def run_info(cfg: JobConfig, fingerprint: str, model_version: str) -> dict:
    """What decides the masks of a run; a run directory holds the results of one such setting only."""
    return {"source": source_name(cfg), "fingerprint": fingerprint, "model_version": model_version, "use": cfg.use,
            "coco_id": cfg.coco_id, "ls_prompts": cfg.ls_prompts, "ls_prompt_model_version": cfg.ls_prompt_model_version,
            "policy": asdict(cfg.policy)}


def source_name(cfg: JobConfig) -> str:
    """The prompt source: the COCO file (absolute path or URI), or Label Studio URL#project."""
    if cfg.coco:
        return cfg.coco if "://" in cfg.coco else os.path.abspath(cfg.coco)
    return f"{cfg.ls_url or os.environ.get('LABEL_STUDIO_URL')}#{cfg.ls_project}"


def prepare_run_dir(cfg: JobConfig, info: dict) -> Path:
    """Create the run folder, or check that it holds a run of the same setting (--fresh starts over)."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        stem = Path(cfg.coco).stem if cfg.coco else f"ls-project-{cfg.ls_project}"
        run_dir = Path("runs") / "preannotate" / _slug(f"{stem}-{info['model_version']}")
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path = run_dir / RUN_INFO
    if cfg.fresh:
        Ledger(run_dir / LEDGER).clear()
    elif info_path.exists():
        old = json.loads(info_path.read_text())
        if old != info:
            changed = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
            raise SystemExit(f"error: {run_dir} holds a run with other settings (differs in: {', '.join(changed)}); "
                             "use another --run-dir, or --fresh to start over there")
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return run_dir


def _loud(message: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n{message}\n{bar}\n\n")
    sys.stderr.flush()


def open_project(cfg: JobConfig):
    from connectors.label_studio_client import LabelStudioProject

    url = cfg.ls_url or os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST")
    key = os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN")
    return LabelStudioProject(url or "", key or "", cfg.ls_project, cfg.ls_brush)


def load_prompts(cfg: JobConfig, project, model_version: str) -> PromptSet:
    if cfg.coco:
        return coco_prompts(read_coco_file(cfg.coco), cfg.image_root, cfg.coco_id, cfg.use)
    from connectors.label_studio_prompts import task_prompts

    return task_prompts(project.tasks_with_regions(), project.config, project.brush, cfg.ls_prompts,
                        cfg.ls_prompt_model_version, skip_model_version=model_version)


def latest_results(ledger: Ledger) -> dict[str, ImageResult]:
    """The newest ledger record of each image job (by ImageJob.key)."""
    out: dict[str, ImageResult] = {}
    for rec in ledger.read(repair=True):
        if rec.get("type") == "image":
            r = ImageResult.from_dict(rec["result"])
            out[r.key] = r
    return out


def run(cfg: JobConfig) -> Summary:
    """Prompts -> jobs -> masks on Ray workers (ledger after each image) -> Label Studio and/or COCO."""
    if cfg.encoder.checkpoint is None:
        _loud(f"WARNING: no --checkpoint given: the {cfg.encoder.variant} model is RANDOMLY INITIALISED "
              f"(seed {cfg.encoder.seed}).\nIts masks are useless for labelling; use it to try the pipeline only.")
    predictor = build_predictor(cfg.encoder, device="cpu")  # fails fast on a bad checkpoint; gives the fingerprint
    fingerprint, variant = predictor.fingerprint, predictor.model.config.name
    del predictor
    model_version = cfg.model_version or default_model_version(cfg.encoder, variant)
    project = open_project(cfg) if cfg.ls_project is not None else None
    prompts = load_prompts(cfg, project, model_version)
    jobs, problems = prompts.images, list(prompts.problems)
    if cfg.push:
        jobs, dropped = filter_labels(jobs, project.labels, f"project {cfg.ls_project} BrushLabels {project.brush.name!r}")
        problems.extend(dropped)
    if cfg.limit is not None:
        jobs = jobs[: cfg.limit]
    info = run_info(cfg, fingerprint, model_version)
    run_dir = prepare_run_dir(cfg, info)
    summary = Summary(fingerprint, model_version, cfg.encoder.checkpoint is None, source_name(cfg), str(run_dir),
                      images=len(jobs), objects=sum(len(j.objects) for j in jobs), not_usable=len(problems))
    ledger = Ledger(run_dir / LEDGER)
    done = latest_results(ledger)

    delivered: set[str] = set()
    if cfg.push:
        jobs, delivered = attach_tasks(cfg, project, jobs, model_version, summary)
    by_key = {j.key: j for j in jobs}
    finished = {k for k, j in by_key.items() if k in done and done[k].final and done[k].digest == j.digest()}
    needs_mask = [j for j in jobs if j.key not in finished and (cfg.coco_out or j.key not in delivered)]
    summary.done_before = len(finished)
    summary.delivered_before = len(delivered)
    print(f"preannotate: {summary.objects} objects on {summary.images} images ({summary.not_usable} prompts not "
          f"usable); {len(finished)} images done in an earlier run, {len(delivered)} already predicted by "
          f"{model_version}; {len(needs_mask)} images to segment", flush=True)

    pusher = None
    if cfg.push:
        pusher = Pusher(project, model_version, cfg.push_batch, summary, {j.key: j.task_id for j in jobs})
        pusher.add_many(done[k] for k in sorted(finished - delivered))
    t0 = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        for result in segment_all(cfg, needs_mask, summary):
            ledger.append({"type": "image", "result": result.to_dict()})
            done[result.key] = result
            summary.computed_images += 1
            summary.computed_objects += len(result.objects)
            summary.computed_steps += sum(o.steps for o in result.objects)
            summary.worker_cpu_s += result.cpu_ms / 1e3
            summary.encoded_on_the_fly += int(result.encoded_on_the_fly)
            if pusher is not None and result.key not in delivered and result.final:
                pusher.add(result)
    except (KeyboardInterrupt, WorkerDied) as e:
        summary.interrupted = True
        summary.error = str(e) or None
        print(f"\npreannotate: {'stopped: ' + str(e) if str(e) else 'interrupted'}; the finished images are in "
              "the ledger, run again to resume", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary.seconds = time.monotonic() - t0
        if pusher is not None:
            pusher.flush()

    current = [done[j.key] for j in jobs if j.key in done and done[j.key].digest == j.digest()]
    if cfg.coco_out and not summary.interrupted:
        write_coco(cfg, prompts, by_key, current, model_version, summary)
    tally(summary, current, problems, cfg.policy)
    write_report(run_dir / REPORT, problems, current)
    return summary


class Pusher:
    """Buffers predictions and imports them into Label Studio in batches."""

    def __init__(self, project, model_version: str, batch: int, summary: Summary, task_of: dict[str, int]) -> None:
        self.project = project
        self.model_version = model_version
        self.batch = batch
        self.summary = summary
        self.task_of = task_of  # ImageJob.key -> task id
        self.buffer: list[dict] = []

    def add_many(self, results) -> None:
        for r in results:
            self.add(r)

    def add(self, result: ImageResult) -> None:
        from connectors.label_studio_prompts import prediction_for

        task_id = self.task_of.get(result.key)
        if task_id is None:
            return
        pred = prediction_for(result, task_id, self.project.brush, self.model_version)
        if pred is not None:
            self.buffer.append(pred)
        if len(self.buffer) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        created, failures = self.project.push(self.buffer)
        self.summary.pushed += created
        self.summary.push_failures.extend({"task": t, "error": e} for t, e in failures)
        self.buffer = []


def attach_tasks(cfg: JobConfig, project, jobs: list[ImageJob], model_version: str,
                 summary: Summary) -> tuple[list[ImageJob], set[str]]:
    """Give every job its task (creating tasks for images that have none) and return the keys of the jobs
    whose task already holds a prediction of `model_version`. Jobs read from tasks keep their own task."""
    from connectors.label_studio_client import index_tasks, url_template

    refs = project.task_refs()
    index, extra = index_tasks(refs)
    missing = [j for j in jobs if j.task_id is None and j.image_id not in index]
    if missing:
        make_url = url_template(cfg.image_url)
        summary.tasks_created = project.create_tasks([(j.image_id, make_url(j.image_id, j.file_name, j.uri))
                                                      for j in missing])
        refs = project.task_refs()
        index, extra = index_tasks(refs)
    summary.duplicate_tasks = [{"image_id": i, "task": t} for i, t in extra]
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
    return out, delivered


def start_ray(cfg: JobConfig) -> None:
    """Join --address or the cluster of a `ray job submit`, else start a private local Ray.

    Workers keep Ray's batch priority (niceness 15, RAY_worker_niceness) so that on shared nodes the
    interactive backend's actors (niceness 0) win; OpenMP threads wait passively instead of spinning."""
    import ray

    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    for attempt in range(1, 4):
        try:
            env = {"PYTHONPATH": path, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": env}, _metrics_export_port=_free_port())
            return
        except Exception as e:  # Ray gives its raylet a fixed 30 s to register: too short on an overloaded host
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 3:
                raise RayStartError(f"could not start a local Ray: {e}") from None
            print(f"preannotate: the local Ray did not come up in time (attempt {attempt}); trying again",
                  file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_spec(cfg: JobConfig, threads: int) -> WorkerSpec:
    from connectors.images import ImageAccess

    access = ImageAccess.from_env(cfg.allowed_roots) if cfg.ls_project is not None else None
    if cfg.ls_url and access is not None:
        access = replace(access, label_studio_url=cfg.ls_url.rstrip("/"))
    return WorkerSpec(encoder=cfg.encoder, db=cfg.db, table=cfg.table, policy=cfg.policy,
                      encode_missing=cfg.encode_missing, threads=threads, image_access=access,
                      storage_options=cfg.storage_options or None)


def segment_all(cfg: JobConfig, jobs: list[ImageJob], summary: Summary):
    """Yield an ImageResult per job as workers finish them (unordered), with a progress bar over objects."""
    if not jobs:
        return
    t0 = time.monotonic()
    bar = tqdm(total=sum(len(j.objects) for j in jobs), unit="obj", desc="preannotate", disable=None)
    try:
        if cfg.workers == 0:
            summary.workers = 0
            worker = PreannotateWorker(worker_spec(cfg, max(1, int(cfg.cpus_per_worker))))
            summary.startup_s = time.monotonic() - t0
            for job in jobs:
                result = worker.run(job)
                bar.update(len(job.objects))
                yield result
            return
        import ray

        from pipeline.actor_pool import map_unordered_surviving

        start_ray(cfg)
        try:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            n = cfg.workers or max(1, int(cpus // max(cfg.cpus_per_worker, 1e-3)))
            n = max(1, min(n, len(jobs)))
            summary.workers = n
            threads = max(1, int(cfg.cpus_per_worker))
            actor = ray.remote(PreannotateWorker).options(num_cpus=cfg.cpus_per_worker, max_restarts=0)
            spec = worker_spec(cfg, threads)
            actors = [actor.remote(spec) for _ in range(n)]
            ray.get([a.ping.remote() for a in actors])  # model loaded, table opened: the rest is throughput
            summary.startup_s = time.monotonic() - t0
            bar.set_description(f"preannotate ({n} workers)")
            try:
                for result in map_unordered_surviving(actors, lambda a, job: a.run.remote(job), jobs,
                                                      lambda: actor.remote(spec)):
                    bar.update(len(result.objects))
                    yield result
            except ray.exceptions.RayActorError as e:  # a worker process died (out of memory, node lost)
                raise WorkerDied(f"a worker died: {str(e).splitlines()[0][:300]}") from None
        finally:
            ray.shutdown()
    finally:
        bar.close()


class RayStartError(RuntimeError):
    """The private local Ray could not be started."""


class WorkerDied(RuntimeError):
    """A Ray worker process died mid-run; what finished is in the ledger."""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def write_coco(cfg: JobConfig, prompts: PromptSet, by_key: dict[str, ImageJob], results: list[ImageResult],
               model_version: str, summary: Summary) -> None:
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


def tally(summary: Summary, results: list[ImageResult], problems: list[Problem], policy: ClickPolicy) -> None:
    """Per-object totals over this run's prompts (earlier runs' results included)."""
    reasons = Counter(p.reason for p in problems)
    clicks: dict[str, list[int]] = {}
    ious = []
    for r in results:
        for o in r.objects:
            if o.ok:
                summary.segmented += 1
                clicks.setdefault(o.kind, []).append(len(o.clicks))
                if o.iou is not None:
                    ious.append(o.iou)
            else:
                reasons[o.reason] += 1
    summary.failed = sum(reasons.values())
    summary.reasons = dict(sorted(reasons.items()))
    summary.mean_clicks = {k: round(sum(v) / len(v), 2) for k, v in sorted(clicks.items())}
    if ious:
        summary.mean_iou = round(sum(ious) / len(ious), 4)
        summary.reached_target = f"{sum(i >= policy.target_iou for i in ious)}/{len(ious)}"


REPORT_COLUMNS = ["image_id", "key", "label", "prompt", "status", "reason", "clicks", "steps", "iou_prompt", "score",
                  "area", "ms", "notes", "detail"]


def write_report(path: Path, problems: list[Problem], results: list[ImageResult]) -> None:
    """One CSV row per object: how it was segmented, or why not."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLUMNS)
        for p in problems:
            w.writerow([p.image_id or "", p.key, p.label or "", "", "not_usable", p.reason, "", "", "", "", "", "", "",
                        p.detail])
        for r in sorted(results, key=lambda r: r.key):
            for o in r.objects:
                w.writerow([o.image_id, o.key, o.label, o.kind, o.status, o.reason or "", len(o.clicks) if o.ok else "",
                            o.steps if o.ok else "", "" if o.iou is None else f"{o.iou:.4f}", "" if o.score is None else f"{o.score:.4f}",
                            o.area if o.ok else "", f"{o.ms:.1f}", "; ".join(o.notes),
                            (o.detail or "").strip().splitlines()[-1] if o.detail else ""])
    os.replace(tmp, path)


def format_summary(s: Summary, problems_shown: int = 20) -> str:
    lines = ["", "preannotate summary"]
    lines.append(f"  model        {s.model_version} (features {s.fingerprint})"
                 + ("   <-- RANDOM WEIGHTS, not for labelling" if s.random_weights else ""))
    lines.append(f"  prompts      {s.objects} objects on {s.images} images from {s.source}; "
                 f"{s.not_usable} not usable")
    lines.append(f"  resumed      {s.done_before} images done in an earlier run, {s.delivered_before} already "
                 "predicted in Label Studio")
    lines.append(f"  computed     {s.computed_objects} objects on {s.computed_images} images"
                 + (f" with {s.workers} workers" if s.workers else " in this process")
                 + (f", {s.encoded_on_the_fly} images encoded on the fly" if s.encoded_on_the_fly else "")
                 + ("  (INTERRUPTED: run again to finish)" if s.interrupted else ""))
    lines.append(f"  segmented    {s.segmented} objects; clicks per object "
                 + (", ".join(f"{k} {v}" for k, v in s.mean_clicks.items()) or "-"))
    if s.mean_iou is not None:
        lines.append(f"  coarse IoU   mean {s.mean_iou:.3f}; target reached by {s.reached_target}")
    lines.append(f"  failed       {s.failed}" + (" (" + ", ".join(f"{k} {v}" for k, v in s.reasons.items()) + ")"
                                                 if s.reasons else ""))
    if s.tasks_created or s.pushed or s.push_failures or s.delivered_before:
        lines.append(f"  label studio {s.tasks_created} tasks created, {s.pushed} predictions pushed"
                     + (f", {len(s.push_failures)} refused" if s.push_failures else ""))
        for f in s.push_failures[:problems_shown]:
            lines.append(f"      task {f['task']}: {f['error']}")
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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from connectors.label_studio_client import LabelStudioError

    try:
        summary = run(cfg)
    except (PromptFileError, LabelStudioError, LedgerError, RayStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    Path(summary.run_dir, SUMMARY).write_text(json.dumps(
        {**asdict(summary), "objects_per_s": summary.objects_per_s, "steps_per_s": summary.steps_per_s}, indent=2) + "\n")
    if summary.interrupted:
        return 130
    if summary.objects and summary.segmented == 0:
        print("error: no object could be segmented (see the report)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
