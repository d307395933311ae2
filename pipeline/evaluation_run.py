"""An evaluation run: samples of named datasets -> simulated clicks on Ray workers -> a resumable results folder.

Results are appended to OUTPUT/results.jsonl as workers finish them, so an interrupted run resumes where
it stopped; OUTPUT/run.json names the segmenter and protocol, and a folder holds the results of one such
setting only. `write_reports` turns summary rows into results.csv, summary.md, summary.json and miou.png.
"""
from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .datasets import DatasetError, SampleRef, dataset_sources, default_data_root, resolve
from .evaluation import EvalConfig, SampleResult, append_results, pending, read_results
from .ray_runtime import init_ray
from .evaluation_report import Row, format_table, plot_miou, summarize_run, write_csv
from .run_info import changed_settings, record_settings
from .segmenters import SegmenterSpec

RESULTS = "results.jsonl"
RUN_INFO = "run.json"


class RunFolderError(ValueError):
    """The output folder holds another run's results, or a folder to compare holds none."""


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


def prepare_output(out: Path, info: dict[str, Any], overwrite: bool) -> list[SampleResult]:
    """Create the output folder, check it belongs to the same run, and return the results already there."""
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / RUN_INFO
    results_path = out / RESULTS
    if overwrite:
        results_path.unlink(missing_ok=True)
    elif changed := changed_settings(info_path, info):
        raise RunFolderError(f"{out} holds results of a different run (differs in: {', '.join(changed)}); "
                             "use another --output or --overwrite")
    record_settings(info_path, info)
    return read_results(results_path, repair=True)


def run_evaluation(name: str, spec: SegmenterSpec, config: EvalConfig, refs: list[SampleRef], out: Path,
                   placement: WorkerPlacement, overwrite: bool = False) -> EvalOutcome:
    """Evaluate the samples of `refs` not yet in `out` and return every result of `refs` found there."""
    done = prepare_output(out, {"name": name, "segmenter": spec.to_dict(), "eval": config.to_dict()}, overwrite)
    todo = list(pending(refs, (r.key for r in done)))
    outcome = EvalOutcome(name, out, len(refs), len(refs) - len(todo))
    print(f"{name}: {len(refs)} samples, {outcome.already_done} already in {out / RESULTS}, {len(todo)} to run")
    if todo:
        outcome.failures = evaluate_on_ray(spec, config, todo, out / RESULTS, placement)
    wanted = {r.key for r in refs}
    outcome.results = [r for r in read_results(out / RESULTS) if r.key in wanted]
    return outcome


def evaluate_on_ray(spec: SegmenterSpec, config: EvalConfig, todo: list[SampleRef], results_path: Path,
                    placement: WorkerPlacement) -> list[tuple[tuple[str, str], str]]:
    """Evaluate `todo` on Ray workers, appending each result to `results_path`; returns the failures."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    init_ray(placement.address, num_cpus=placement.num_cpus, log_to_driver=False, job="evaluate")
    try:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        n = placement.workers or max(1, int(cpus // max(placement.cpus_per_worker, 1e-3)))
        n = max(1, min(n, len(todo)))
        worker_cls = ray.remote(EvalWorker).options(num_cpus=placement.cpus_per_worker,
                                                    num_gpus=placement.gpus_per_worker)
        threads = max(1, int(placement.cpus_per_worker))
        pool = ActorPool([worker_cls.remote(spec, config, threads) for _ in range(n)])
        failures = []
        with tqdm(total=len(todo), desc=f"evaluating on {n} workers", unit="sample") as bar:
            for status, key, payload in pool.map_unordered(lambda a, ref: a.run.remote(ref), todo):
                if status == "ok":
                    append_results(results_path, [payload])
                else:
                    failures.append((key, payload))
                    bar.write(f"FAILED {key[0]}/{key[1]}: {payload.splitlines()[-1]}")
                bar.update(1)
        return failures
    finally:
        ray.shutdown()


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
    results = read_results(file)
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
    """results.csv (when there are per-sample results), summary.md, summary.json and miou.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if results:
        write_csv(results, out / "results.csv")
        written.append(out / "results.csv")
    (out / "summary.md").write_text(format_table(rows, markdown=True) + "\n")
    (out / "summary.json").write_text(json.dumps(
        [{"run": r.run, "dataset": r.dataset, **r.summary.to_dict()} for r in rows], indent=2) + "\n")
    plot_miou(rows, out / "miou.png")
    return written + [out / "summary.md", out / "summary.json", out / "miou.png"]
