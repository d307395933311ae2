"""Encode an image collection once into the LanceDB feature store (the product's main job).

Locally (starts a private Ray on this machine, writes ./lancedb):
    python jobs/encode.py samples/

On a Ray cluster (the table must be on storage every node reaches: a shared path or s3://...):
    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \
        /path/to/venv/bin/python jobs/encode.py s3://bucket/images/ --db s3://bucket/features \
        --checkpoint /shared/interformer_tiny.pth

Ray Data pipeline: (image_id, uri) -> decode/resize on CPU tasks -> encode on an actor pool (one GPU per
actor when the cluster has GPUs) -> uncommitted Lance fragments written by CPU tasks -> committed by this
driver every few seconds. Images already stored for the same encoder fingerprint are skipped, so a run
that was killed at any point can simply be run again: every image ends up in the table exactly once.
Bad inputs go to the errors table (<table>_errors) and the job goes on.
"""
from __future__ import annotations

import os
import sys


def _use_ray_auth_token() -> None:
    """Ray 2.60 clusters require an auth token by default, but a client sends one only with
    RAY_AUTH_MODE=token ("Authentication token is missing or incorrect" otherwise), and Ray reads that
    variable when it is imported. Turn it on when a token is at hand; clusters without auth accept it too."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(token_file):
        os.environ["RAY_AUTH_MODE"] = "token"


_use_ray_auth_token()

try:
    import argparse
    import json
    import math
    import signal
    import time
    import warnings
    from collections import Counter
    from dataclasses import asdict, dataclass, field, replace
    from pathlib import Path

    _REPO_ROOT = Path(__file__).resolve().parents[1]
    if str(_REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(_REPO_ROOT))  # so that a checkout runs without `pip install -e .`

    import ray
    from tqdm import tqdm

    from interformer.config import CONFIGS, PreprocessConfig
    from pipeline.encoding import (
        EncoderSpec,
        EncoderStage,
        build_predictor,
        decode_stage,
        plan_resources,
        write_stage,
    )
    from pipeline.feature_store import DEFAULT_ROOT, DEFAULT_TABLE, FeatureStore, error_rows
    from pipeline.images import DEFAULT_MAX_PIXELS, UNREADABLE
    from pipeline.sources import Listing, SourceError, list_images
except ImportError as _e:  # the usual cause: `ray job submit -- python ...` ran the head's system python
    sys.stderr.write(
        f"error: {_e}.\nThis interpreter ({sys.executable}) lacks the project's packages. With `ray job submit`, "
        "the entrypoint runs in the head node's environment: start the head from the project's virtual "
        "environment, or name its python explicitly (`-- /path/to/.venv/bin/python jobs/encode.py ...`).\n"
    )
    raise SystemExit(3)


_DECODE_BATCH = 8
_DECODE_TASK_MEMORY = 512 * 1024**2
_INDEX_INTERVAL_S = 300.0


@dataclass
class JobConfig:
    """Everything the job needs, filled from the command line."""

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
    summary_json: str | None = None
    ray_progress: bool = False


@dataclass
class JobSummary:
    fingerprint: str
    table: str
    random_weights: bool
    listed: int = 0
    ignored_files: int = 0
    skipped: int = 0
    known_failures: int = 0
    pending: int = 0
    encoded: int = 0
    failed: list[dict] = field(default_factory=list)
    bytes_written: int = 0
    commits: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def images_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(
        prog="jobs/encode.py",
        description=(
            "Encode every image of a collection once with InterFormer's ViT and store the features in a "
            "LanceDB table keyed by image id. Idempotent and resumable: images already stored for the same "
            "encoder are skipped, so re-running a killed or finished job is always safe."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input",
        help="what to encode: a folder (recursive; ids are paths relative to it), a glob such as "
        "'data/**/*.jpg', a .txt/.lst file with one path or URI per line, a COCO annotation .json "
        "(with --image-root), or one image file. Local paths or object-store URIs (s3://, gs://, ...).",
    )
    p.add_argument("--image-root", help="folder of the images of a COCO file; for a list file, the root ids are relative to")
    p.add_argument("--coco-id", choices=("file_name", "id"), default="file_name",
                   help="for COCO inputs, use the image's file_name or its numeric id as the image id")
    p.add_argument("--db", default=DEFAULT_ROOT,
                   help="LanceDB database folder or object-store URI holding the table (relative paths are under "
                   "the current directory; with `ray job submit` give a path every node can reach)")
    p.add_argument("--table", default=DEFAULT_TABLE, help="feature table name; errors go to <table>_errors")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="storage option passed to LanceDB/Lance for object stores (e.g. region=us-east-1); repeatable")
    p.add_argument("--checkpoint", help="InterFormer weights (official .pth or one of ours); without it the "
                   "encoder is RANDOMLY INITIALISED (for trying the pipeline only) and its rows are marked so")
    p.add_argument("--variant", choices=sorted(CONFIGS),
                   help="model variant; detected from the checkpoint when given (then it must match), "
                   "'light' by default with random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (no --checkpoint)")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize images so that their longest side is at most this many pixels (default: native "
                   "size, as in the paper); part of the encoder fingerprint")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels than this are refused and recorded as errors")
    p.add_argument("--dtype", choices=("float16", "float32", "bfloat16", "int8"), default="float16",
                   help="storage dtype of the features: float16 halves the table, int8 (per-channel scale and "
                   "offset) halves it again; the model computes in float32 (see interformer/features.py)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="encoder arithmetic: bf16 autocast (CPUs with AMX / AVX512-BF16, or CUDA) is faster with "
                   "a pyramid within ~1%% RMS of fp32 (bench/bench_feature_precision.py) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="images per encoder forward pass")
    p.add_argument("--write-batch", type=int, default=32, help="feature rows per written Lance fragment")
    p.add_argument("--num-encoders", type=int, default=None,
                   help="encoder actors (default: one per GPU; on CPU-only clusters one per 4 CPUs left after the "
                   "quarter kept for decode/write tasks)")
    p.add_argument("--cpus-per-encoder", type=float, default=None,
                   help="CPUs reserved by each encoder actor (default: 1 with GPUs, otherwise an equal share)")
    p.add_argument("--address", default=None,
                   help="Ray address to connect to (e.g. auto, ray://host:10001). Default: the cluster of a "
                   "`ray job submit` (RAY_ADDRESS), else a new private local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started when no cluster is given")
    p.add_argument("--commit-interval", type=float, default=5.0,
                   help="seconds between commits of written fragments (the most work a kill can lose)")
    p.add_argument("--limit", type=int, default=None, help="encode at most this many of the missing images")
    p.add_argument("--retry-failed", action="store_true",
                   help="try again the inputs recorded as bad by an earlier run (after fixing the files or raising "
                   "--max-pixels); unreadable ones, possibly a transient storage error, are always retried")
    p.add_argument("--summary-json", default=None, help="also write the final summary to this JSON file")
    p.add_argument("--ray-progress", action="store_true",
                   help="show Ray Data's per-stage progress bars instead of one tqdm bar")
    a = p.parse_args(argv)
    for name in ("batch_size", "write_batch", "max_pixels"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.max_side is not None and a.max_side < 32:
        p.error("--max-side must be at least 32")
    options = {}
    for item in a.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--storage-option expects KEY=VALUE, got {item!r}")
        options[key] = value
    if a.checkpoint is not None and not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint!r} is not a file")
    variant = a.variant or (None if a.checkpoint else "light")
    preprocess = PreprocessConfig(max_side=a.max_side, max_pixels=a.max_pixels)
    encoder = EncoderSpec(checkpoint=a.checkpoint, variant=variant, preprocess=preprocess, dtype=a.dtype, seed=a.seed,
                          precision=a.precision)
    return JobConfig(
        input=a.input, image_root=a.image_root, coco_id=a.coco_id, db=a.db, table=a.table,
        storage_options=options, encoder=encoder, batch_size=a.batch_size, write_batch=a.write_batch,
        num_encoders=a.num_encoders, cpus_per_encoder=a.cpus_per_encoder, address=a.address,
        num_cpus=a.num_cpus, commit_interval=a.commit_interval, limit=a.limit, retry_failed=a.retry_failed,
        summary_json=a.summary_json, ray_progress=a.ray_progress,
    )


def _loud(message: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\n{message}\n{bar}\n\n")
    sys.stderr.flush()


def start_ray(cfg: JobConfig) -> None:
    """Join the given cluster, the one of a `ray job submit` (RAY_ADDRESS), or start a private local Ray.
    `address="local"` never attaches to another cluster on this machine, nor to a stale one left behind
    by a killed head (Ray's ray_current_cluster file)."""
    # Ray starts its processes with fork+exec; lance/lancedb warn about fork in general, which does not
    # apply to a child that execs at once.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )


def list_inputs(cfg: JobConfig) -> Listing:
    listing = list_images(cfg.input, image_root=cfg.image_root, coco_id=cfg.coco_id)
    if not listing.sources:
        raise SourceError(f"no images found in {cfg.input!r}")
    return listing


def run(cfg: JobConfig) -> JobSummary:
    """List, skip what is stored, encode the rest on Ray, commit as fragments arrive; returns the summary."""
    if cfg.encoder.checkpoint is None:
        _loud(
            f"WARNING: no --checkpoint given: the {cfg.encoder.variant} encoder is RANDOMLY INITIALISED "
            f"(seed {cfg.encoder.seed}).\nIts features are useless for labelling; they are stored under a "
            "fingerprint marked 'random-init'. Pass --checkpoint for real features."
        )
    predictor = build_predictor(cfg.encoder, device="cpu")  # fail fast on a bad checkpoint; gives the fingerprint
    fingerprint = predictor.fingerprint
    del predictor

    if "://" not in cfg.db and not os.path.isabs(cfg.db) and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        _loud(
            f"WARNING: --db {cfg.db!r} is relative: under `ray job submit` it resolves to {os.path.abspath(cfg.db)}, "
            "inside the job's temporary copy of the working directory.\nGive an absolute path every node reaches, "
            "or an object-store URI, to keep the table."
        )
    store = FeatureStore(cfg.db, cfg.table, storage_options=cfg.storage_options or None)
    summary = JobSummary(fingerprint=fingerprint, table=store.features_uri, random_weights=cfg.encoder.checkpoint is None)
    listing = list_inputs(cfg)
    summary.listed = len(listing.sources)
    summary.ignored_files = len(listing.ignored)
    for first, other in listing.duplicates:
        summary.failed.append(
            {"image_id": other.image_id, "uri": other.uri, "reason": "duplicate_id",
             "detail": f"the id is also used by {first.uri}, which is the one encoded"}
        )
    done = store.existing_ids(fingerprint)
    known_bad = set() if cfg.retry_failed else {
        e["image_id"] for e in store.errors(fingerprint).to_pylist() if e["reason"] != UNREADABLE
    }
    pending = []
    for source in listing.sources:
        if source.image_id in done:
            summary.skipped += 1
        elif source.image_id in known_bad:
            summary.known_failures += 1
        else:
            pending.append(source)
    if cfg.limit is not None:
        pending = pending[: cfg.limit]
    summary.pending = len(pending)
    print(
        f"encode: {summary.listed} images listed, {summary.skipped} already stored for {fingerprint}, "
        f"{summary.known_failures} known bad, {len(pending)} to encode into {store.features_uri}",
        flush=True,
    )
    if listing.ignored:
        print(f"encode: ignored {len(listing.ignored)} files with non-image extensions, e.g. {listing.ignored[:3]}")
    if not pending:
        return summary

    start_ray(cfg)
    try:
        _run_pipeline(cfg, store, fingerprint, pending, summary)
    finally:
        ray.shutdown()
    return summary


def _run_pipeline(cfg: JobConfig, store: FeatureStore, fingerprint: str, pending: list, summary: JobSummary) -> None:
    resources = ray.cluster_resources()
    plan = plan_resources(resources.get("CPU", 0), resources.get("GPU", 0), cfg.num_encoders, cfg.cpus_per_encoder)
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
        memory=_DECODE_TASK_MEMORY, fn_kwargs={"preprocess": spec.preprocess},
    )
    ds = ds.map_batches(
        EncoderStage, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.num_encoders),
        num_cpus=plan.cpus_per_encoder, num_gpus=plan.gpus_per_encoder,
        fn_constructor_kwargs={"spec": spec, "fingerprint": fingerprint},
    )
    ds = ds.map_batches(
        write_stage, batch_size=cfg.write_batch, batch_format="pyarrow", num_cpus=min(0.5, plan.cpus_per_task),
        fn_kwargs={"uri": store.features_uri, "storage_options": cfg.storage_options or None},
    )

    committer = _Committer(store, fingerprint, summary)
    t0 = time.monotonic()
    interactive = sys.stderr.isatty()  # a bar on a terminal; a line every 30 s in `ray job logs` and files
    bar = tqdm(total=len(pending), unit="img", desc="encode", disable=not interactive)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        last = logged = time.monotonic()
        done = 0
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            n = committer.collect(block)
            done += n
            bar.update(n)
            now = time.monotonic()
            if now - last >= cfg.commit_interval:
                committer.flush()
                last = now
            if not interactive and now - logged >= 30:
                print(f"encode: {done}/{len(pending)} images processed, {done / (now - t0):.2f} images/s", flush=True)
                logged = now
    except KeyboardInterrupt:
        summary.interrupted = True
        print("\nencode: interrupted; committing the fragments already written", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        committer.flush()
        bar.close()
        summary.seconds = time.monotonic() - t0
    if summary.encoded:
        store.optimize_index()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class _Committer:
    """Collects results from the write stage and commits their fragments and errors together."""

    def __init__(self, store: FeatureStore, fingerprint: str, summary: JobSummary):
        self.store = store
        self.fingerprint = fingerprint
        self.summary = summary
        self.fragments: list[str] = []
        self.encoded_ids: list[str] = []
        self.errors: list[tuple[str, str, str, str]] = []
        self.nbytes = 0
        self.had_errors = set(store.errors(fingerprint).column("image_id").to_pylist())
        self.indexed_at = time.monotonic()

    def collect(self, block) -> int:
        rows = block.to_pylist()
        for row in rows:
            self.fragments.extend(row["fragments"] or [])
            self.nbytes += row["nbytes"] or 0
            if row["reason"] is None:
                self.encoded_ids.append(row["image_id"])
            else:
                self.errors.append((row["image_id"], row["uri"], row["reason"], row["detail"] or ""))
        return len(rows)

    def flush(self) -> None:
        if self.fragments:
            self.store.commit_fragments(self.fragments)
            self.summary.commits += 1
        self.summary.encoded += len(self.encoded_ids)
        self.summary.bytes_written += self.nbytes
        if self.errors:
            self.store.record_errors(error_rows(self.errors, self.fingerprint))
            self.summary.failed.extend(
                {"image_id": e[0], "uri": e[1], "reason": e[2], "detail": e[3]} for e in self.errors
            )
        fixed = self.had_errors.intersection(self.encoded_ids)
        if fixed:
            self.store.clear_errors(fixed, self.fingerprint)
        self.fragments, self.encoded_ids, self.errors, self.nbytes = [], [], [], 0
        if time.monotonic() - self.indexed_at >= _INDEX_INTERVAL_S:  # keep fetches by id indexed on long runs
            self.store.optimize_index()
            self.indexed_at = time.monotonic()


def format_summary(s: JobSummary) -> str:
    lines = ["", "encode summary"]
    lines.append(f"  encoder      {s.fingerprint}" + ("   <-- RANDOM WEIGHTS, not for labelling" if s.random_weights else ""))
    lines.append(f"  table        {s.table}")
    lines.append(f"  listed       {s.listed}" + (f" ({s.ignored_files} non-image files ignored)" if s.ignored_files else ""))
    lines.append(f"  skipped      {s.skipped} (already stored for this encoder)")
    if s.known_failures:
        lines.append(f"  known bad    {s.known_failures} (failed in an earlier run, see the errors table; --retry-failed)")
    lines.append(f"  encoded      {s.encoded} of {s.pending} to do" + ("  (INTERRUPTED: run again to finish)" if s.interrupted else ""))
    reasons = Counter(f["reason"] for f in s.failed)
    lines.append(f"  failed       {len(s.failed)}" + (" (" + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) + ")" if s.failed else ""))
    for f in s.failed[:20]:
        lines.append(f"      {f['image_id']}: {f['reason']}: {f['detail']}")
    if len(s.failed) > 20:
        lines.append(f"      ... and {len(s.failed) - 20} more in the errors table")
    lines.append(f"  time         {s.seconds:.1f} s, {s.images_per_s:.2f} images/s")
    per_image = f", {s.bytes_written / s.encoded / 1e6:.2f} MB per image" if s.encoded else ""
    lines.append(f"  written      {s.bytes_written / 1e6:.1f} MB in {s.commits} commits{per_image}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run(cfg)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    if cfg.summary_json:
        Path(cfg.summary_json).write_text(json.dumps({**asdict(summary), "images_per_s": summary.images_per_s}, indent=2))
    if summary.interrupted:
        return 130
    if summary.pending and summary.encoded == 0:  # not for a re-run with nothing left to do
        print("error: nothing could be encoded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
