"""An evaluation run: samples of named datasets -> simulated clicks on Ray workers -> a resumable results folder.

Results are appended to OUTPUT/results.jsonl as workers finish them, so an interrupted run resumes where
it stopped; OUTPUT/run.json names the segmenter and protocol, and a folder holds the results of one such
setting only. `write_reports` turns summary rows into results.csv, summary.md, summary.json and miou.png.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .datasets import DatasetError, SampleRef, dataset_sources, default_data_root, resolve
from .evaluation import EvalConfig, SampleResult, append_results, pending, read_results
from .evaluation_report import Row, format_table, plot_miou, summarize_run, unique_results, write_csv
from .files import write_text_atomic
from .ray_runtime import init_ray, live_node_resources
from .segmenters import SegmenterSpec
from .stall import DEFAULT_STALL_TIMEOUT_S

RESULTS = "results.jsonl"
RUN_INFO = "run.json"
LOCK_FILE = "writer.lock"
REPORTS = ("results.csv", "summary.md", "summary.json", "miou.png")  # what `write_reports` writes


class RunFolderError(ValueError):
    """The output folder holds another run's results, or a folder to compare holds none."""


class PlacementError(ValueError):
    """Worker options no node of the cluster can take: Ray would queue the workers forever, without a word."""


@dataclass(frozen=True)
class DatasetSelection:
    """Which samples: dataset names/folders/COCO files, how to read them, and at most `limit` per dataset."""

    specs: Sequence[str]
    data_root: Path | None = None  # benchmark names are looked up here; None: `default_data_root()`
    coco_images: Path | None = None
    ignore_value: int | None = None
    coco_min_area: float = 0.0
    coco_include_crowd: bool = False
    limit: int | None = None


@dataclass(frozen=True)
class WorkerPlacement:
    """Where samples run: `workers` Ray actors (default: CPUs / cpus_per_worker) on the cluster at `address`."""

    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None
    num_cpus: int | None = None
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # s with no result and no node for a worker: ClusterStalled


def placement_problem(placement: "WorkerPlacement", nodes: list[dict[str, float]]) -> str | None:
    """Why no node (the resources of each live node) can hold one worker of `placement`, or None."""
    if placement.gpus_per_worker > 0 and not any(n.get("GPU", 0.0) >= placement.gpus_per_worker for n in nodes):
        most = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        return (f"--gpus-per-worker {placement.gpus_per_worker:g}: no node of the cluster has that many GPUs "
                f"(the most on one node: {most:g})")
    if not any(n.get("CPU", 0.0) >= placement.cpus_per_worker for n in nodes):
        most = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        return (f"--cpus-per-worker {placement.cpus_per_worker:g}: no node of the cluster has that many CPUs "
                f"(the most on one node: {most:g})")
    return None


@dataclass
class EvalOutcome:
    """What a run left in its folder: every wanted result there is, and the samples that failed this time."""

    name: str
    out: Path
    total: int
    already_done: int
    results: list[SampleResult] = field(default_factory=list)
    failures: list[tuple[tuple[str, str], str]] = field(default_factory=list)


def collect_samples(selection: DatasetSelection) -> list[SampleRef]:
    """The samples of every dataset of `selection`; each dataset name must be given once."""
    refs: list[SampleRef] = []
    given: dict[str, str] = {}
    root = selection.data_root or default_data_root()
    for spec in selection.specs:
        found = resolve(spec, root, selection.coco_images, selection.ignore_value, selection.coco_min_area,
                        selection.coco_include_crowd)
        if not found:
            raise DatasetError(f"dataset {spec} has no samples")
        name = found[0].dataset
        if name in given:
            raise DatasetError(f"datasets {given[name]} and {spec} are both named {name!r}: give each dataset once, "
                               "and distinct folders distinct names")
        given[name] = spec
        refs.extend(found[: selection.limit] if selection.limit else found)
    dataset_sources(refs)
    return refs


class OutputLock:
    """The exclusive right to write one output folder: an flock on OUTPUT/writer.lock for a run's life.

    A second run on the folder is refused (RunFolderError naming the holder's pid and host) instead of
    appending every result a second time. The kernel drops an flock when its process ends, however it ends,
    so a killed run leaves no stale lock; the pid/host/start time in the file only explain who holds it."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot use {self.path.parent} as the output folder: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise RunFolderError(f"{self.path.parent} is in use by {holder}: one run at a time writes an output "
                                 "folder; wait for that run to end (or stop it), or use another --output") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file releases the flock
            self._fd = None


def _lock_holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # the holder has not written its details yet
        h = {}
    return f"another run (process {h.get('pid')} on {h.get('host')}, since {h.get('since')})" if h else "another run"


def run_settings(name: str, spec: SegmenterSpec, config: EvalConfig, refs: list[SampleRef]) -> dict[str, Any]:
    """What decides a run's results: its name, the segmenter (a checkpoint by content, `spec` pinned), the
    protocol, and where and how each dataset was read."""
    return {"name": name, "segmenter": spec.to_dict(), "eval": config.to_dict(), "datasets": dataset_sources(refs)}


def _recorded_settings(info_path: Path) -> dict[str, Any] | None:
    if not info_path.exists():
        return None
    try:
        old = json.loads(info_path.read_bytes())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"cannot read {info_path} ({e}); use another --output or --overwrite") from None
    if not isinstance(old, dict):
        raise RunFolderError(f"{info_path} is not a run's settings; use another --output or --overwrite")
    return old


def settings_conflicts(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between recorded and new settings: top-level keys, and `datasets.NAME` for a dataset
    recorded with another source. Datasets only one side has do not conflict: a folder may gain datasets."""
    changed = sorted(k for k in (set(old) | set(new)) - {"datasets"} if old.get(k) != new.get(k))
    old_sets, new_sets = old.get("datasets"), new.get("datasets", {})
    if not isinstance(old_sets, dict):
        return changed + ["datasets (not recorded: a run from before datasets were recorded)"]
    return changed + [f"datasets.{n}" for n in sorted(set(old_sets) & set(new_sets)) if old_sets[n] != new_sets[n]]


def prepare_output(out: Path, info: dict[str, Any], overwrite: bool) -> list[SampleResult]:
    """Check the output folder belongs to the same run, record the settings, and return the results already
    there (the first record of each sample). With `overwrite` the earlier results and reports are removed
    first. A malformed results record is a RunFolderError. The caller holds the folder's OutputLock."""
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / RUN_INFO
    results_path = out / RESULTS
    old = None if overwrite else _recorded_settings(info_path)
    if overwrite:  # nothing of the discarded run stays beside the new run.json, even if this one writes no report
        for stale in (RESULTS, *REPORTS):
            (out / stale).unlink(missing_ok=True)
    elif old is not None and (changed := settings_conflicts(old, info)):
        raise RunFolderError(f"{out} holds results of a different run (differs in: {', '.join(changed)}); "
                             "use another --output or --overwrite")
    if old is not None:
        info = {**info, "datasets": {**old["datasets"], **info["datasets"]}}
    try:
        done = unique_results(read_results(results_path, repair=True))
    except ValueError as e:  # a damaged record: one line, exit status 2, as for --compare
        raise RunFolderError(f"{e}; repair or remove that line, or use another --output or --overwrite") from None
    write_text_atomic(info_path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return done


def run_evaluation(name: str, spec: SegmenterSpec, config: EvalConfig, refs: list[SampleRef], out: Path,
                   placement: WorkerPlacement, overwrite: bool = False) -> EvalOutcome:
    """Evaluate the samples of `refs` not yet in `out` and return every result of `refs` found there.

    The run holds the folder's lock throughout; a checkpoint is pinned by its sha256, so a worker refuses
    weights that changed after the settings were checked."""
    spec = spec.pinned()
    with OutputLock(out):
        done = prepare_output(out, run_settings(name, spec, config, refs), overwrite)
        todo = list(pending(refs, (r.key for r in done)))
        outcome = EvalOutcome(name, out, len(refs), len(refs) - len(todo))
        print(f"{name}: {len(refs)} samples, {outcome.already_done} already in {out / RESULTS}, {len(todo)} to run")
        if todo:
            outcome.failures = evaluate_on_ray(spec, config, todo, out / RESULTS, placement)
        wanted = {r.key for r in refs}
        outcome.results = [r for r in unique_results(read_results(out / RESULTS)) if r.key in wanted]
    return outcome


def evaluate_on_ray(spec: SegmenterSpec, config: EvalConfig, todo: list[SampleRef], results_path: Path,
                    placement: WorkerPlacement) -> list[tuple[tuple[str, str], str]]:
    """Evaluate `todo` on Ray workers, appending each result to `results_path`; returns the failures.

    A worker that dies (killed for memory, its node lost) hands its sample to the others
    (`map_unordered_surviving`); a sample that kills its worker every time is that sample's failure, and the
    other samples still finish."""
    import ray
    from tqdm import tqdm

    from .actor_pool import map_unordered_surviving
    from .placement import describe, pool_size

    init_ray(placement.address, num_cpus=placement.num_cpus, log_to_driver=False, job="evaluate")
    try:
        nodes = live_node_resources()
        problem = placement_problem(placement, nodes)
        if problem:
            raise PlacementError(problem)
        n = max(1, pool_size(placement.workers, nodes, placement.cpus_per_worker, placement.gpus_per_worker,
                             len(todo)))
        if placement.workers and n < min(placement.workers, len(todo)):
            print(f"evaluate: {n} workers, not {placement.workers}: the live nodes hold no more at once "
                  f"({describe(nodes)})", flush=True)
        worker_cls = ray.remote(EvalWorker).options(num_cpus=placement.cpus_per_worker,
                                                    num_gpus=placement.gpus_per_worker)
        threads = max(1, int(placement.cpus_per_worker))
        def new_worker() -> Any:
            return worker_cls.remote(spec, config, threads)

        def placeable() -> bool:
            return placement_problem(placement, live_node_resources()) is None

        results = map_unordered_surviving([new_worker() for _ in range(n)], lambda a, ref: a.run.remote(ref), todo,
                                          new_worker, on_lost=lost_worker_failure, placeable=placeable,
                                          stall_timeout_s=placement.stall_timeout)
        failures = []
        with tqdm(total=len(todo), desc=f"evaluating on {n} workers", unit="sample") as bar:
            for status, key, payload in results:
                if status == "ok":
                    append_results(results_path, [payload])
                else:
                    failures.append((key, payload))
                    bar.write(f"FAILED {key[0]}/{key[1]}: {payload.splitlines()[-1]}")
                bar.update(1)
        return failures
    finally:
        ray.shutdown()


def lost_worker_failure(ref: SampleRef, error: Exception) -> tuple[str, tuple[str, str], str]:
    """The failure of a sample whose worker died every time it ran it (a worker's result has the same form)."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "error", ref.key, (f"the evaluation worker died while running this sample, every time it was tried "
                              f"(out of memory? {type(error).__name__}: {reason})")


class EvalWorker:
    """A Ray actor holding one segmenter; evaluates samples one at a time."""

    def __init__(self, spec: SegmenterSpec, config: EvalConfig, threads: int) -> None:
        import cv2
        import torch

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        self.segmenter = spec.build()
        self.config = config

    def run(self, ref: SampleRef) -> tuple[str, tuple[str, str], Any]:
        from .evaluation import evaluate_ref

        try:
            return "ok", ref.key, evaluate_ref(self.segmenter, ref, self.config)
        except Exception:
            return "error", ref.key, traceback.format_exc()


def load_run(path: Path) -> tuple[str, list[SampleResult], int]:
    """(name, results, max_clicks) of an earlier run given by its folder or results file."""
    folder, file = (path, path / RESULTS) if path.is_dir() else (path.parent, path)
    if not file.exists():
        raise RunFolderError(f"no results at {file}")
    info_path = folder / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    results = unique_results(read_results(file))
    if not results:
        raise RunFolderError(f"no results in {file}")
    max_clicks = info.get("eval", {}).get("max_clicks") or min(len(r.ious) for r in results)
    return info.get("name", folder.name), results, max_clicks


def compare_rows(paths: Sequence[Path], this_run: Path | None = None) -> list[Row]:
    """Summary rows of earlier runs (folders or results files), skipping `this_run` itself; read before a new
    run starts, so that a wrong path fails at once. Raises RunFolderError."""
    rows = []
    for path in paths:
        if this_run is not None and path.resolve() in (this_run.resolve(), (this_run / RESULTS).resolve()):
            continue  # summarised as this run
        try:
            rows.extend(summarize_run(*load_run(path)))
        except ValueError as e:
            raise RunFolderError(f"cannot compare with {path}: {e}") from None
    return rows


def write_reports(rows: list[Row], out: Path, results: list[SampleResult] | None) -> list[Path]:
    """results.csv (when there are per-sample results), summary.md, summary.json and miou.png (`REPORTS`)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if results:
        write_csv(results, out / "results.csv")
        written.append(out / "results.csv")
    write_text_atomic(out / "summary.md", format_table(rows, markdown=True) + "\n")
    write_text_atomic(out / "summary.json", json.dumps(
        [{"run": r.run, "dataset": r.dataset, **r.summary.to_dict()} for r in rows], indent=2) + "\n")
    plot_miou(rows, out / "miou.png")
    return written + [out / "summary.md", out / "summary.json", out / "miou.png"]
