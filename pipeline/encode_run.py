"""One run of the encode job: list the inputs, skip what is stored, encode the rest on Ray Data, commit
exactly once, and say what happened.

Ray Data pipeline: (image_id, uri) -> decode/resize on CPU tasks -> encode on an actor pool (one GPU per
actor when the cluster has GPUs) -> write tasks stage uncommitted Lance fragments -> the driver commits
the staged work every `commit_interval` seconds (pipeline.staged_commits). Images already stored for
the same encoder fingerprint are skipped, so a run stopped or killed at any point can simply be run
again: every image ends up in the table exactly once. Bad inputs go to the errors table.

Stored rows this run would compute differently are reported (and encoded again with `reencode_changed`): a
source with other bytes now (pipeline.changed_sources), or a row an older feature version computed differently
at its geometry, or a bf16 row when this run asks for fp32 ("stale").

Exit codes (`exit_code`): 0 the run finished (failed inputs are in the errors table and the summary),
1 `strict` and some listed input is not stored, or stored from other bytes or by another feature version or
precision than this run's, or the run itself failed (the pipeline failed: the summary still says what was
committed, `EncodeSummary.error` why it failed; a cluster that stalled, `EncodeSummary.stalled`, is one: no
image came back while no live node could hold an encoder for `stall_timeout` seconds),
2 the input or an option cannot be used (the --db/--table included: not a feature table of ours, unreadable or
not writable, `TableError`), 3 Ray cannot be reached or the interpreter lacks the project,
130 stopped (SIGINT/SIGTERM) after committing what was written: run again to finish.
"""
from __future__ import annotations

import builtins
import math
import os
import re
import signal
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

import ray
from tqdm import tqdm

from interformer.config import ViTConfig

from .changed_sources import (capped_read, check_content, plan_replacements, reencode_problems, sources_to_check,
                              stale_rows)
from .encoding import (
    EncoderSpec, EncoderStage, ResourcePlan, build_predictor, decode_stage, plan_resources, write_stage,
)
from .faults import fault_point
from .feature_store import DEFAULT_ROOT, DEFAULT_TABLE, FeatureStore, FeatureStoreError, error_rows
from .images import UNREADABLE
from .placement import actors_that_fit
from .ray_runtime import init_ray, live_node_resources
from .sources import Listing, SourceError, list_images
from .staged_commits import CommitTimer, StagedCommitter, read_staged
from .stall import DEFAULT_STALL_TIMEOUT_S, ClusterStalled, StallWatchdog

_DECODE_BATCH = 8
_DECODE_TASK_MEMORY = 512 * 1024**2

PIPELINE_ATTEMPTS = 3
_RETRY_WAIT_S = 120.0
# Failures of the cluster, not of our code: the pipeline is worth running again on what is left.
_CLUSTER_FAILURES = tuple(
    getattr(ray.exceptions, name)
    for name in ("RayActorError", "ObjectLostError", "WorkerCrashedError", "NodeDiedError", "OwnerDiedError",
                 "LocalRayletDiedError", "RaySystemError")
    if hasattr(ray.exceptions, name)
)

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_STOPPED = 0, 1, 2, 3, 130

DUPLICATE_ID = "duplicate_id"  # the reason of a listed file dropped because an earlier file has its image id

EXIT_CODES_HELP = """exit codes:
  0    the run finished: every listed image is stored, or recorded in the errors table with its reason
       (bad inputs are not a failure of the job; re-running a finished collection exits 0)
  1    --strict and some listed image is not stored, or stored from other bytes than its source has now, or
       stored by an older feature version that differs at its size, or at bf16 under --precision fp32 (see
       --reencode-changed); or the job itself failed (a storage failure such as a full disk: the summary of what
       was committed, then `error: ...`; run again to finish), or the cluster stalled: no image came back while
       no live node could hold an encoder for --stall-timeout seconds (every worker node lost): what was written
       is committed, then `error: ...`; run again to finish once the cluster has such a node
  2    the input cannot be listed or an option is wrong (the encoder pool options checked against the cluster,
       before anything changes; a --db/--table that is not a feature table, cannot be read or is not writable)
  3    Ray cannot be reached (address, authentication) or this python lacks the project's packages
  130  stopped (Ctrl-C, SIGTERM, `ray job stop`) after committing what was written: run again to finish
"""


@dataclass
class EncodeConfig:
    """Everything a run needs."""

    input: str
    image_root: str | None = None
    coco_id: str = "file_name"
    db: str = DEFAULT_ROOT
    table: str = DEFAULT_TABLE
    storage_options: dict = field(default_factory=dict)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    batch_size: int = 4
    write_batch: int = 32
    num_encoders: int | None = None
    cpus_per_encoder: float | None = None
    address: str | None = None
    num_cpus: int | None = None
    commit_interval: float = 5.0
    limit: int | None = None
    retry_failed: bool = False
    check_content: bool = False
    reencode_changed: bool = False
    strict: bool = False
    ray_progress: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S  # s with no image back and no node for an encoder: exit 1


@dataclass
class EncodeSummary:
    fingerprint: str
    table: str
    random_weights: bool
    listed: int = 0
    ignored_files: int = 0
    recovered: int = 0
    repaired_duplicates: int = 0
    skipped: int = 0
    known_failures: int = 0
    pending: int = 0
    encoded: int = 0
    failed: list[dict] = field(default_factory=list)
    same_uri: list[dict] = field(default_factory=list)  # ids naming a file another id names too (stored per id)
    other_dtypes: dict = field(default_factory=dict)  # stored rows of this encoder in another dtype than asked
    checked: int = 0  # stored images whose bytes were read to compare with the stored sha256
    changed: list[dict] = field(default_factory=list)  # stored images whose source now has other bytes
    replaced: int = 0  # of those, the images this run takes to encode again, their rows removed (--reencode-changed)
    orientation_filled: int = 0  # rows stored before the EXIF tag was recorded, given it from their source read now
    stale: list[dict] = field(default_factory=list)  # stored rows an older feature version made, or bf16 rows for fp32
    stale_replaced: int = 0  # of those, the images this run takes to encode again, their rows removed
    kept: list[dict] = field(default_factory=list)  # changed or stale rows --reencode-changed left, and why
    not_stored: int = 0
    committed_for_other_runs: int = 0  # images other runs (on this table) had staged, committed by this one
    bytes_written: int = 0
    commits: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    error: str = ""  # why the pipeline failed ("" when it did not); what was committed stays
    stalled: bool = False  # it failed because no live node could hold an encoder for the stall timeout

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


class TableError(Exception):
    """The --db/--table cannot be used (not a feature table of ours, unreadable, not writable): found when the
    table is opened, before anything is encoded or changed."""


def _loud(message: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n{message}\n{bar}\n\n")
    sys.stderr.flush()


def list_inputs(cfg: EncodeConfig) -> Listing:
    listing = list_images(cfg.input, image_root=cfg.image_root, coco_id=cfg.coco_id)
    if not listing.sources:
        raise SourceError(f"no images found in {cfg.input!r}")
    return listing


def run(cfg: EncodeConfig) -> EncodeSummary:
    """List, skip what is stored, encode the rest on Ray, commit on a timer; returns the summary. A stop
    (Ctrl-C, SIGTERM) at any step after the table is opened ends the run with `interrupted` set; one before
    that (loading the model) raises KeyboardInterrupt, with nothing changed."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _open_and_run(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_and_run(cfg: EncodeConfig) -> EncodeSummary:
    if cfg.encoder.checkpoint is None:
        _loud(
            f"WARNING: no --checkpoint given: the {cfg.encoder.variant} encoder is RANDOMLY INITIALISED "
            f"(seed {cfg.encoder.seed}).\nIts features are useless for labelling; they are stored under a "
            "fingerprint marked 'random'. Pass --checkpoint for real features."
        )
    predictor = build_predictor(cfg.encoder, device="cpu")  # fail fast on a bad checkpoint; gives the fingerprint
    fingerprint, vit = predictor.fingerprint, predictor.model.config.vit
    del predictor

    if "://" not in cfg.db and not os.path.isabs(cfg.db) and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        _loud(
            f"WARNING: --db {cfg.db!r} is relative: under `ray job submit` it resolves to {os.path.abspath(cfg.db)}, "
            "inside the job's temporary copy of the working directory.\nGive an absolute path every node reaches, "
            "or an object-store URI, to keep the table."
        )
    try:
        store = FeatureStore(cfg.db, cfg.table, storage_options=cfg.storage_options or None)
        store.check_writable()  # a read-only or refused --db is found now, not once every image is encoded
    except FeatureStoreError as e:
        raise TableError(str(e)) from None
    summary = EncodeSummary(fingerprint=fingerprint, table=store.features_uri,
                            random_weights=cfg.encoder.checkpoint is None)
    try:
        _run(cfg, store, fingerprint, vit, summary)
    except KeyboardInterrupt:
        summary.interrupted = True
        print("\nencode: stopped; what was committed stays, nothing else was stored: run again to finish",
              file=sys.stderr, flush=True)
    return summary


def _run(cfg: EncodeConfig, store: FeatureStore, fingerprint: str, vit: ViTConfig, summary: EncodeSummary) -> None:
    listing = list_inputs(cfg)
    fault_point("listed")
    recovered = _recover(store, fingerprint, summary)
    dropped = dropped_duplicates(listing)
    summary.listed = len(listing.sources) + len(listing.unusable) + len(dropped)
    summary.ignored_files = len(listing.ignored)
    record_unusable(store, fingerprint, listing, summary)
    summary.failed.extend({"image_id": i, "uri": u, "reason": r, "detail": d} for i, u, r, d in dropped)
    done = store.existing_ids(fingerprint)
    changed = _check_changed(cfg, store, fingerprint, listing, summary)
    stale = _check_stale(cfg, store, fingerprint, listing, summary, vit)
    fault_point("sources_checked")
    known_bad = set() if cfg.retry_failed else {  # a duplicate_id row is about the other file: not this one
        e["image_id"] for e in store.errors(fingerprint).to_pylist() if e["reason"] not in (UNREADABLE, DUPLICATE_ID)
    }
    to_replace = changed | stale
    candidates, kept = [], {}
    for source in listing.sources:
        if source.image_id in to_replace and source.image_id in known_bad:
            kept[source.image_id] = "failed in an earlier run (see the errors table; --retry-failed)"
        elif source.image_id in to_replace:
            candidates.append(source)
        elif source.image_id in recovered:
            summary.recovered += 1
        elif source.image_id in done:
            summary.skipped += 1
        elif source.image_id in known_bad:
            summary.known_failures += 1
        else:
            candidates.append(source)
    pending, refused = plan_replacements(
        candidates, to_replace, cfg.limit, lambda todo: reencode_problems(todo, cfg.encoder.preprocess, vit))
    kept.update(refused)
    _report_kept(kept, listing, summary)
    summary.pending = len(pending)
    print(
        f"encode: {summary.listed} images listed, {summary.skipped} already stored for {fingerprint}, "
        f"{summary.known_failures} known bad, {len(pending)} to encode into {store.features_uri}",
        flush=True,
    )
    if listing.ignored:
        print(f"encode: ignored {len(listing.ignored)} files with non-image extensions, e.g. {listing.ignored[:3]}")
    if pending:
        try:
            _join_cluster(cfg)  # before any row is removed: a cluster or options that fail change nothing
            _remove_replaced(store, fingerprint, pending, changed, stale, summary)
            fault_point("rows_removed")
            _report_other_dtypes(cfg, store, fingerprint, summary)
            try:
                _encode(cfg, store, fingerprint, pending, summary, vit)
            except Exception as e:  # noqa: BLE001 - the run failed: the summary still says what was committed
                kind, message = original_error(e)
                summary.error = f"{kind}: {message}"[:500]
                summary.stalled = isinstance(e, ClusterStalled)
                if not _storage_failure(kind) and not summary.stalled:  # likely a bug, whose traceback is needed
                    traceback.print_exc()
        finally:
            ray.shutdown()
    else:
        _report_other_dtypes(cfg, store, fingerprint, summary)
    stored = store.existing_ids(fingerprint)
    summary.not_stored = (sum(1 for s in listing.sources if s.image_id not in stored) + len(listing.unusable)
                          + len(dropped))
    if not summary.error:
        record_duplicates(store, fingerprint, listing, dropped)


def dropped_duplicates(listing: Listing) -> list[tuple[str, str, str, str]]:
    """(image id, uri, DUPLICATE_ID, detail) of each listed file the listing dropped because an earlier file
    has its id: an input that is not stored, counted as listed and not stored like any failed input."""
    found: dict[tuple[str, str], tuple[str, str, str, str]] = {}
    for first, other in listing.duplicates:
        detail = f"the id is also used by {first.uri}, which is the one encoded"
        found.setdefault((other.image_id, other.uri), (other.image_id, other.uri, DUPLICATE_ID, detail))
    return list(found.values())


def record_duplicates(store: FeatureStore, fingerprint: str, listing: Listing,
                      dropped: list[tuple[str, str, str, str]]) -> None:
    """Record the dropped duplicates in the errors table, once the run's commits are done (a commit clears the
    error rows of the ids it stores, and a duplicate's id is its first file's). Rows are keyed by id: an id whose
    own file failed keeps that row, which says more; an id listed now without a duplicate loses its old one."""
    reasons = {e["image_id"]: e["reason"] for e in store.errors(fingerprint).select(["image_id", "reason"]).to_pylist()}
    duplicated = {d[0] for d in dropped}
    listed = {s.image_id for s in listing.sources}
    gone = {i for i, r in reasons.items() if r == DUPLICATE_ID and i in listed and i not in duplicated}
    if gone:
        store.clear_errors(gone, fingerprint)
    rows = {d[0]: d for d in reversed(dropped) if reasons.get(d[0], DUPLICATE_ID) == DUPLICATE_ID}
    if rows:
        store.record_errors(error_rows(sorted(rows.values()), fingerprint))


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what caused it, outermost first (a Ray task error's own exception included)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not c for c in chain):
        chain.append(error)
        inner = getattr(error, "cause", None)
        error = inner if isinstance(inner, BaseException) else error.__cause__
    return chain


# "OSError: [Errno 28] No space left on device": an exception line of a traceback
_EXCEPTION_LINE = re.compile(r"(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.*)")
_RAY_WRAPPERS = {"RayTaskError", "UserCodeException", "RayDataUserCodeException"}


def original_error(error: BaseException) -> tuple[str, str]:
    """(type name, message) of what first went wrong in a failed pipeline: the innermost cause. The exception a
    Ray Data task raised reaches the driver only as text (its remote traceback, wrapped in a UserCodeException),
    so for a Ray task error it is the first exception line of that text."""
    chain = _causes(error)
    for e in chain:
        if isinstance(e, ray.exceptions.RayTaskError):
            for line in str(e).splitlines():
                m = _EXCEPTION_LINE.fullmatch(line.strip())
                if m and m.group(1) not in _RAY_WRAPPERS:
                    return m.group(1), m.group(2)
    cause = chain[-1]
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    return type(cause).__name__, lines[-1] if lines else "no message"


def _storage_failure(kind: str) -> bool:
    """Whether an error of this type name is the storage's (a full disk, a read-only or vanished table)."""
    builtin = getattr(builtins, kind, None)
    return kind == FeatureStoreError.__name__ or (isinstance(builtin, type) and issubclass(builtin, OSError))


def _join_cluster(cfg: EncodeConfig) -> None:
    """Join (or start) Ray and check that the cluster takes the encoder pool options (ResourcePlanError)."""
    init_ray(cfg.address, num_cpus=cfg.num_cpus, job="encode")
    _plan(cfg)


def _plan(cfg: EncodeConfig) -> ResourcePlan:
    """The encoder pool plan for the cluster this process joined, checked against its live nodes."""
    resources = ray.cluster_resources()
    nodes = live_node_resources()
    return plan_resources(resources.get("CPU", 0), resources.get("GPU", 0), cfg.num_encoders, cfg.cpus_per_encoder,
                          nodes=nodes, task_memory=_DECODE_TASK_MEMORY)


def _report_other_dtypes(cfg: EncodeConfig, store: FeatureStore, fingerprint: str, summary: EncodeSummary) -> None:
    """Count the stored rows of this encoder in another dtype than asked (after the replaced rows are gone:
    those are encoded again in this run's dtype)."""
    summary.other_dtypes = {d: n for d, n in store.dtypes(fingerprint).items() if d != cfg.encoder.dtype}
    if summary.other_dtypes:
        print(f"encode: rows already stored keep their dtype ({_counts(summary.other_dtypes)}); this run writes "
              f"{cfg.encoder.dtype} for the images it encodes", flush=True)


def _check_changed(cfg: EncodeConfig, store: FeatureStore, fingerprint: str, listing: Listing,
                   summary: EncodeSummary) -> set[str]:
    """Find stored images whose source now has other bytes (read when the uri differs from the stored one, or
    all with --check-content); with --reencode-changed return their ids, whose rows `_replace` may replace."""
    origins = store.origins(fingerprint)
    to_read = len(sources_to_check(listing.sources, origins, cfg.check_content))
    if to_read:
        print(f"encode: reading {to_read} stored images to compare with the bytes they were encoded from", flush=True)
    result = check_content(listing.sources, origins, cfg.check_content, capped_read(cfg.encoder.preprocess))
    changed, summary.checked = result.changed, result.read
    if result.orientations:
        summary.orientation_filled = store.fill_exif_orientation(result.orientations, fingerprint)
        print(f"encode: recorded the EXIF orientation tag of {summary.orientation_filled} stored images read now "
              "(stored before the tag was recorded)", flush=True)
    summary.changed = [{"image_id": c.image_id, "uri": c.uri, "stored_uri": c.stored_uri} for c in changed]
    if not changed:
        return set()
    if not cfg.reencode_changed:
        print(f"encode: {len(changed)} stored images differ from their source now, e.g. {changed[0].image_id!r} "
              f"({changed[0].uri}); their old features are kept: run with --reencode-changed to encode them again",
              file=sys.stderr, flush=True)
        return set()
    return {c.image_id for c in changed}


def _check_stale(cfg: EncodeConfig, store: FeatureStore, fingerprint: str, listing: Listing, summary: EncodeSummary,
                 vit: ViTConfig) -> set[str]:
    """Find listed images whose stored row this run would compute differently (an older feature version at an
    affected geometry, or a bf16 row when fp32 is asked for; images already reported as changed are left to that
    report); with --reencode-changed return their ids, whose rows `_replace` may replace."""
    reported = {c["image_id"] for c in summary.changed}
    stale = [s for s in stale_rows(listing.sources, store.provenance(fingerprint), vit, cfg.encoder.precision)
             if s.image_id not in reported]
    summary.stale = [{"image_id": s.image_id, "uri": s.uri, "reason": s.reason} for s in stale]
    if not stale:
        return set()
    if not cfg.reencode_changed:
        print(f"encode: {len(stale)} stored images were encoded differently from what this run computes, e.g. "
              f"{stale[0].image_id!r} ({stale[0].reason}); their features are kept: run with --reencode-changed to "
              "encode them again", file=sys.stderr, flush=True)
        return set()
    return {s.image_id for s in stale}


def _remove_replaced(store: FeatureStore, fingerprint: str, pending: list, changed: set[str], stale: set[str],
                     summary: EncodeSummary) -> None:
    """Remove the rows of the changed and stale images this run encodes again (those `plan_replacements` took),
    once the run is known to start (Ray joined, options accepted). Each taken image counts as replaced, even
    when another run removed its row first. An image whose encode then still fails, or a stop before its new
    row is committed, is left without a row: the next run encodes it from its source."""
    taken = {s.image_id for s in pending}
    summary.replaced, summary.stale_replaced = len(changed & taken), len(stale & taken)
    if changed & taken:
        store.remove(sorted(changed & taken), fingerprint)
    if stale & taken:
        store.remove(sorted(stale & taken), fingerprint)
    if summary.replaced or summary.stale_replaced:
        print(f"encode: {summary.replaced} changed and {summary.stale_replaced} stale stored images: their rows are "
              "removed and they are encoded again", flush=True)


def _report_kept(kept: dict[str, str], listing: Listing, summary: EncodeSummary) -> None:
    """Report the changed or stale images whose rows this run keeps, with why."""
    uris = {s.image_id: s.uri for s in listing.sources}
    summary.kept = [{"image_id": i, "uri": uris[i], "reason": r} for i, r in kept.items()]
    summary.skipped += len(kept)
    for k in summary.kept:
        print(f"encode: kept the stored row of {k['image_id']!r} ({k['uri']}): {k['reason']}", file=sys.stderr,
              flush=True)


def record_unusable(store: FeatureStore, fingerprint: str, listing: Listing, summary: EncodeSummary) -> None:
    """Record the inputs the listing set aside (a file name that is not UTF-8) in the errors table and the summary,
    like any unreadable input, and report ids that name one file several times."""
    if listing.unusable:
        store.record_errors(error_rows(listing.unusable, fingerprint))
        summary.failed.extend({"image_id": i, "uri": u, "reason": r, "detail": d} for i, u, r, d in listing.unusable)
    summary.same_uri = [{"image_id": other.image_id, "same_file_as": first.image_id, "uri": first.uri}
                        for first, other in listing.same_uri]
    if summary.same_uri:
        print(f"encode: {len(summary.same_uri)} ids name a file another id names too, e.g. "
              f"{summary.same_uri[0]['image_id']!r} and {summary.same_uri[0]['same_file_as']!r}: each id is stored "
              "(the file's features once per id); use one spelling of each file name", flush=True)


def _recover(store: FeatureStore, fingerprint: str, summary: EncodeSummary) -> set[str]:
    """Commit what an earlier, killed run staged, and delete duplicate rows an older version left; returns the
    ids of this encoder that the recovery stored."""
    committer = StagedCommitter(store)
    if read_staged(committer.uri):
        committer.commit_staged()
        print(f"encode: committed {len(committer.tally.stored)} images that an interrupted run had written",
              flush=True)
    summary.repaired_duplicates = store.remove_duplicates(fingerprint)
    if summary.repaired_duplicates:
        print(f"encode: removed {summary.repaired_duplicates} duplicate rows (left by an older version)", flush=True)
    return {i for i, fp in committer.tally.stored if fp == fingerprint}


def _encode(cfg: EncodeConfig, store: FeatureStore, fingerprint: str, pending: list, summary: EncodeSummary,
            vit: ViTConfig) -> None:
    """Run the pipeline until every pending image is stored or recorded as bad. When the cluster loses part of
    the pipeline in a way Ray Data does not recover from (an actor pool that cannot be rebuilt after a lost node),
    the written work is committed and the pipeline runs again on what is left, up to PIPELINE_ATTEMPTS times."""
    committer = StagedCommitter(store)
    t0 = time.monotonic()
    todo = pending
    try:
        for attempt in range(1, PIPELINE_ATTEMPTS + 1):
            try:
                _run_pipeline(cfg, store, fingerprint, todo, summary, committer, vit)
                break
            except _CLUSTER_FAILURES as e:
                if attempt == PIPELINE_ATTEMPTS:
                    raise
                stored = store.existing_ids(fingerprint)
                failed = committer.tally.failed
                todo = [s for s in todo if s.image_id not in stored and (s.image_id, fingerprint) not in failed]
                reason = str(e).strip().splitlines()[0][:200]
                print(f"encode: the cluster lost part of the pipeline ({type(e).__name__}: {reason}); "
                      f"{len(todo)} images left, running again (attempt {attempt + 1} of {PIPELINE_ATTEMPTS})",
                      file=sys.stderr, flush=True)
                if not todo:
                    break
                _wait_for_free_cpus(_RETRY_WAIT_S)
    finally:
        tally = committer.tally
        own = {(s.image_id, fingerprint) for s in pending}  # the committer also commits what other runs staged
        summary.seconds = time.monotonic() - t0
        summary.encoded = len(tally.stored & own)
        summary.committed_for_other_runs = len(tally.stored - own)
        summary.commits = tally.commits
        summary.bytes_written = tally.nbytes
        summary.failed.extend(v for k, v in tally.failed.items() if k in own and k not in tally.stored)
    if summary.encoded:
        store.optimize_index()


def _wait_for_free_cpus(timeout: float) -> None:
    """Before running again, give the cluster time to reclaim what the failed pass held (actors of a lost pool
    still pending on their CPUs make Ray Data cancel the new pool): until every CPU is free, or `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(1.0)


def _run_pipeline(cfg: EncodeConfig, store: FeatureStore, fingerprint: str, pending: list,
                  summary: EncodeSummary, committer: StagedCommitter, vit: ViTConfig) -> None:
    """One Ray Data pass over `pending`; the committer commits on its timer and once more at the end. `vit`
    (the encoder's) sizes the attention memory check of the decode tasks."""
    resources = ray.cluster_resources()
    plan = _plan(cfg)
    device = f"{plan.num_encoders} GPU" if plan.gpus_per_encoder else f"{plan.num_encoders} CPU"
    print(f"encode: {device} encoder actor(s), {plan.cpus_per_encoder:g} CPUs each; "
          f"{resources.get('CPU', 0):g} CPUs / {resources.get('GPU', 0):g} GPUs in the cluster", flush=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray_progress
    spec = replace(cfg.encoder, threads=None if plan.gpus_per_encoder else plan.threads_per_encoder)

    items = [{"image_id": s.image_id, "uri": s.uri} for s in pending]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(math.ceil(len(items) / 8), 2000)))
    # The memory request (room for a batch of decoded images) also makes these tasks' resources differ from
    # the encoders', which keeps Ray Data from fusing decoding into the encoder actors: decoding must run
    # as tasks on the CPUs left free, in parallel with encoding.
    ds = ds.map_batches(
        decode_stage, batch_size=_DECODE_BATCH, batch_format="pyarrow", num_cpus=plan.cpus_per_task,
        memory=_DECODE_TASK_MEMORY, fn_kwargs={"preprocess": spec.preprocess, "vit": vit},
    )
    ds = ds.map_batches(
        EncoderStage, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.num_encoders),
        num_cpus=plan.cpus_per_encoder, num_gpus=plan.gpus_per_encoder,
        fn_constructor_kwargs={"spec": spec, "fingerprint": fingerprint},
    )
    ds = ds.map_batches(
        write_stage, batch_size=cfg.write_batch, batch_format="pyarrow", num_cpus=min(0.5, plan.cpus_per_task),
        fn_kwargs={"uri": store.features_uri, "staging": committer.uri, "fingerprint": fingerprint,
                   "storage_options": cfg.storage_options or None},
    )

    t0 = time.monotonic()
    interactive = sys.stderr.isatty()  # a bar on a terminal; a line every 30 s in `ray job logs` and files
    bar = tqdm(total=len(pending), unit="img", desc="encode", disable=not interactive)
    timer = CommitTimer(committer, cfg.commit_interval).start()
    # Ray Data waits without end for encoders no live node can hold (every worker node lost): the watchdog bounds
    # that wait (its interrupt is a KeyboardInterrupt here, told from a stop by its reason)
    watchdog = StallWatchdog(_encoder_placeable(plan), cfg.stall_timeout, "encode", "image", "an encoder")
    stalled = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        try:
            watchdog.start()
            logged = time.monotonic()
            done = 0
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                watchdog.progress()
                done += block.num_rows
                bar.update(block.num_rows)
                now = time.monotonic()
                if not interactive and now - logged >= 30:
                    print(f"encode: {done}/{len(pending)} images processed, {done / (now - t0):.2f} images/s",
                          flush=True)
                    logged = now
        finally:
            watchdog.stop()  # an interrupt it sent lands by now, never in the commit below
    except KeyboardInterrupt:
        stalled = watchdog.reason
        summary.interrupted = stalled is None
        what = f"the cluster stalled: {stalled}" if stalled else "interrupted"
        print(f"\nencode: {what}; committing the fragments already written", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, _ignore_while_committing)  # a second stop must not cut the last commit
        try:
            timer.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            bar.close()
    if stalled:
        raise ClusterStalled(stalled)


def _encoder_placeable(plan: ResourcePlan) -> Callable[[], bool]:
    """Whether a live node of the cluster could hold one encoder of the plan now (the plan's placement rule)."""
    def placeable() -> bool:
        nodes = live_node_resources()
        return actors_that_fit(nodes, plan.cpus_per_encoder, plan.gpus_per_encoder) > 0
    return placeable


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ignore_while_committing(signum, frame):
    print("encode: still committing what was written; stopping right after", file=sys.stderr, flush=True)


def exit_code(summary: EncodeSummary, strict: bool = False) -> int:
    """The process exit status of a run (see EXIT_CODES_HELP)."""
    if summary.interrupted:
        return EXIT_STOPPED
    if summary.error:
        return EXIT_INCOMPLETE
    if strict and (summary.not_stored or len(summary.changed) > summary.replaced
                   or len(summary.stale) > summary.stale_replaced):
        return EXIT_INCOMPLETE
    return EXIT_OK


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))


def _replaced_or_kept(replaced: int, found: int, some_kept: bool) -> str:
    """How many of `found` rows were removed to be encoded again and how many keep their old features."""
    kept = found - replaced
    if not kept:
        return "encoded again"
    why = "see kept below" if some_kept else "--reencode-changed"
    return (f"{replaced} encoded again, " if replaced else "") + f"{kept} kept with their old features ({why})"


def format_summary(s: EncodeSummary) -> str:
    lines = ["", "encode summary"]
    lines.append(f"  encoder      {s.fingerprint}" + ("   <-- RANDOM WEIGHTS, not for labelling" if s.random_weights else ""))
    lines.append(f"  table        {s.table}")
    lines.append(f"  listed       {s.listed}" + (f" ({s.ignored_files} non-image files ignored)" if s.ignored_files else ""))
    if s.recovered:
        lines.append(f"  recovered    {s.recovered} (written by an interrupted run, committed now)")
    if s.repaired_duplicates:
        lines.append(f"  repaired     {s.repaired_duplicates} duplicate rows removed")
    lines.append(f"  skipped      {s.skipped} (already stored for this encoder)")
    if s.other_dtypes:
        lines.append(f"  other dtype  {_counts(s.other_dtypes)} stored rows keep their dtype (each row has its own)")
    if s.checked:
        lines.append(f"  checked      {s.checked} stored images read again to compare their bytes"
                     + (f" ({s.orientation_filled} given their EXIF orientation tag)" if s.orientation_filled else ""))
    if s.changed:
        lines.append(f"  changed      {len(s.changed)} stored images whose source has other bytes now: "
                     + _replaced_or_kept(s.replaced, len(s.changed), bool(s.kept)))
        for c in s.changed[:5]:
            lines.append(f"      {c['image_id']}: {c['uri']}" + (f" (encoded from {c['stored_uri']})"
                                                                  if c["stored_uri"] != c["uri"] else ""))
    if s.stale:
        lines.append(f"  stale        {len(s.stale)} stored images encoded differently from what this run computes: "
                     + _replaced_or_kept(s.stale_replaced, len(s.stale), bool(s.kept)))
        for r in s.stale[:5]:
            lines.append(f"      {r['image_id']}: {r['reason']}")
    if s.kept:
        lines.append(f"  kept         {len(s.kept)} changed or stale rows not encoded again by this run:")
        for k in s.kept[:20]:
            lines.append(f"      {k['image_id']}: kept: {k['reason']}")
    if s.known_failures:
        lines.append(f"  known bad    {s.known_failures} (failed in an earlier run, see the errors table; --retry-failed)")
    lines.append(f"  encoded      {s.encoded} of {s.pending} to do" + ("  (INTERRUPTED: run again to finish)" if s.interrupted else ""))
    if s.committed_for_other_runs:
        lines.append(f"  also         committed {s.committed_for_other_runs} images another run on this table had "
                     "written (counted there as theirs)")
    reasons = Counter(f["reason"] for f in s.failed)
    lines.append(f"  failed       {len(s.failed)}" + (" (" + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) + ")" if s.failed else ""))
    for f in s.failed[:20]:
        lines.append(f"      {f['image_id']}: {f['reason']}: {f['detail']}")
    if len(s.failed) > 20:
        lines.append(f"      ... and {len(s.failed) - 20} more in the errors table")
    if s.same_uri:
        lines.append(f"  same file    {len(s.same_uri)} ids name a file another id names too (stored once per id)")
    lines.append(f"  not stored   {s.not_stored} of {s.listed} listed (bad inputs, or left by a stop)")
    lines.append(f"  time         {s.seconds:.1f} s, {s.images_per_s:.2f} images/s")
    per_image = (f", {s.bytes_written / s.encoded / 1e6:.2f} MB per image"
                 if s.encoded and not s.committed_for_other_runs else "")
    lines.append(f"  written      {s.bytes_written / 1e6:.1f} MB in {s.commits} commits{per_image}")
    if s.error:
        lines.append(f"  FAILED       {s.error} (what was committed stays: run again to finish)")
    return "\n".join(lines)
