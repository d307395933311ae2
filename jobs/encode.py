"""Encode an image collection once into the LanceDB feature store (the product's main job).

Locally (starts a private Ray on this machine, writes ./lancedb):
    python -m jobs.encode samples/

On a Ray cluster (the table must be on storage every node reaches: a shared path or s3://...):
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        /path/to/venv/bin/python -m jobs.encode s3://bucket/images/ --db s3://bucket/features \\
        --checkpoint /shared/interformer_tiny.pth
(prefix RAY_AUTH_MODE=token only for a cluster started with token authentication.)
The run itself is pipeline.encode_run.
"""
from __future__ import annotations

import sys

from pipeline.ray_runtime import RayStartError, prepare_job_process

prepare_job_process("jobs/encode.py")  # before the imports that need the project's packages

import argparse  # noqa: E402
import os  # noqa: E402
from dataclasses import asdict  # noqa: E402

from interformer.checkpoint import CheckpointError  # noqa: E402
from interformer.cli_types import COUNT, POSITIVE, SEED, absolute_folder, integer  # noqa: E402
from interformer.config import CONFIGS, DEFAULT_MAX_ENCODE_MEMORY_GIB, PreprocessConfig  # noqa: E402
from interformer.encode_engine import ENCODE_PRECISIONS, add_encode_engine_argument  # noqa: E402
from interformer.features import STORAGE_DTYPES  # noqa: E402
from interformer.runtime import CACHE_ENV  # noqa: E402
from pipeline.encode_run import (  # noqa: E402
    EXIT_CODES_HELP, EXIT_ENVIRONMENT, EXIT_STOPPED, EXIT_USAGE, EncodeConfig, TableError, exit_code, format_summary,
    run,
)
from pipeline.encoding import EncoderSpec, ResourcePlanError  # noqa: E402
from pipeline.feature_store import DEFAULT_ROOT, DEFAULT_TABLE, check_table_name, parse_storage_options  # noqa: E402
from pipeline.files import write_json_atomic  # noqa: E402
from pipeline.images import DEFAULT_MAX_PIXELS  # noqa: E402
from pipeline.sources import SourceError, missing_local_input  # noqa: E402
from pipeline.stall import add_stall_timeout_argument  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The encode job's options."""
    p = argparse.ArgumentParser(
        prog="python -m jobs.encode",
        description=(
            "Encode every image of a collection once with InterFormer's ViT and store the features in a "
            "LanceDB table keyed by image id. Exactly once and resumable: images already stored for the same "
            "encoder are skipped, so re-running a stopped, killed or finished job is always safe."
        ),
        epilog=EXIT_CODES_HELP,
        formatter_class=type("Formatter", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {}),
    )
    add = p.add_argument
    add("input", help="what to encode: a folder (recursive; ids are paths relative to it), a glob such as "
        "'data/**/*.jpg', a .txt/.lst file with one path or URI per line, a COCO annotation .json "
        "(with --image-root), or one image file. Local paths or object-store URIs (s3://, gs://, ...). Every path "
        "named like an image is an input: one that cannot be read (a dangling link, a folder) is recorded as unreadable.")
    add("--image-root", help="folder of the images of a COCO file; for a list file, the root ids are relative to")
    add("--coco-id", choices=("file_name", "id"), default="file_name",
        help="for COCO inputs, use the image's file_name or its numeric id as the image id")
    add("--db", default=DEFAULT_ROOT, help="LanceDB database folder or object-store URI holding the table (relative "
        "paths are under the current directory; with `ray job submit` give a path every node can reach)")
    add("--table", default=DEFAULT_TABLE, help="feature table name; errors go to <table>_errors")
    add("--storage-option", action="append", default=[], metavar="KEY=VALUE",
        help="storage option passed to LanceDB/Lance for object stores (e.g. region=us-east-1); repeatable")
    add("--checkpoint", help="InterFormer weights (official .pth or one of ours); without it the encoder is "
        "RANDOMLY INITIALISED (for trying the pipeline only) and its rows are marked so")
    add("--variant", choices=sorted(CONFIGS), help="model variant; detected from the checkpoint when given (then "
        "it must match), 'light' by default with random weights")
    add("--seed", type=SEED, default=0, help="seed of the random initialisation (no --checkpoint); part of the "
        "encoder fingerprint")
    add("--max-side", type=integer(32), default=None, help="resize images so that their longest side is at most "
        "this many pixels (default: native size, as in the paper); part of the encoder fingerprint")
    add("--max-pixels", type=COUNT, default=DEFAULT_MAX_PIXELS,
        help="images with more pixels than this are refused and recorded as errors")
    add("--max-encode-memory", type=POSITIVE, default=DEFAULT_MAX_ENCODE_MEMORY_GIB, metavar="GIB",
        help="GiB of memory the encoder's global attention may take per image (it grows with the square of the "
        "token count, (H/16)*(W/16)): larger images are refused as too_large, naming the --max-side that fits")
    add("--dtype", choices=sorted(STORAGE_DTYPES), default="float16",
        help="storage dtype of the features: float16 halves the table, int8 / int8sqrt (8-bit codes, per-channel "
        "scale and offset; int8sqrt companded, closer to fp32 where the values crowd) halve it again; the model "
        "computes in float32 (see interformer/features.py)")
    add("--precision", choices=ENCODE_PRECISIONS, default="fp32",
        help="encoder arithmetic: bf16 (CPUs with AMX / AVX512-BF16, or CUDA) is faster with a pyramid within ~1%% "
        "RMS of fp32 (bench/bench_feature_precision.py)")
    add_encode_engine_argument(p)
    add("--engine-cache", type=absolute_folder, default=None, metavar="DIR",
        help=f"folder for the runtime's converted models (default: ${CACHE_ENV}, else "
        "~/.cache/interformer/click-engine)")
    add("--batch-size", type=COUNT, default=4, help="images per encoder forward pass")
    add("--write-batch", type=COUNT, default=32, help="feature rows per written Lance fragment")
    add("--num-encoders", type=COUNT, default=None, help="encoder actors (default: one per GPU; on CPU-only clusters "
        "one per 4 CPUs left after the quarter kept for decode/write tasks)")
    add("--cpus-per-encoder", type=POSITIVE, default=None,
        help="CPUs reserved by each encoder actor (default: 1 with GPUs, otherwise an equal share)")
    add("--address", default=None, help="Ray address to connect to (e.g. auto, ray://host:10001). Default: the "
        "cluster of a `ray job submit` (RAY_ADDRESS), else a new private local Ray")
    add("--num-cpus", type=COUNT, default=None, help="CPUs of the local Ray started when no cluster is given")
    add("--commit-interval", type=POSITIVE, default=5.0, help="seconds between commits of written work, whatever the "
        "pace of the pipeline (a stop commits everything written; a kill -9 leaves it for the next run to commit)")
    add_stall_timeout_argument(p, "image", "an encoder", "the job commits what was written and exits 1")
    add("--limit", type=COUNT, default=None, help="encode at most this many of the missing images")
    add("--retry-failed", action="store_true", help="try again the inputs recorded as bad by an earlier run (after "
        "fixing the files or raising --max-pixels); unreadable ones, possibly a transient storage error, are always retried")
    add("--check-content", action="store_true", help="read every stored image of the listing again and compare "
        "its bytes with the sha256 its features were computed from (without it, only images listed under another "
        "uri than the one they were encoded from are read)")
    add("--reencode-changed", action="store_true", help="encode again the stored images whose source has other "
        "bytes now, and the stale ones (stored by an older feature version that computed other features at their "
        "size, or at bf16 when this run asks for fp32); a row is removed only for an image this run can read, "
        "decode and encode now within --limit, the others keep theirs (listed as kept); without it they are "
        "reported and kept")
    add("--strict", action="store_true", help="exit 1 unless every listed image is stored, from the bytes it has now, "
        "by this feature version (and not at bf16 when fp32 is asked)")
    add("--summary-json", default=None, help="also write the final summary to this JSON file")
    add("--ray-progress", action="store_true", help="show Ray Data's per-stage progress bars instead of one tqdm bar")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[EncodeConfig, str | None]:
    """The command line -> (the run's config, --summary-json)."""
    p = build_parser()
    a = p.parse_args(argv)
    try:
        options = parse_storage_options(a.storage_option)
    except ValueError as e:
        p.error(str(e))
    try:
        check_table_name(a.table)
    except ValueError as e:
        p.error(f"--table: {e}")
    problem = missing_local_input(a.input, a.image_root)
    if problem:
        p.error(problem)
    if a.checkpoint is not None and not os.path.isfile(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint!r} is not a file")
    if a.summary_json is not None:
        problem = _unwritable(a.summary_json)
        if problem:
            p.error(f"--summary-json {a.summary_json!r}: {problem}")
    if "://" not in a.db and os.path.exists(a.db) and not os.path.isdir(a.db):
        p.error(f"--db {a.db!r} is a file, not a LanceDB folder")
    encoder = EncoderSpec(checkpoint=a.checkpoint, variant=a.variant or (None if a.checkpoint else "light"),
                          preprocess=PreprocessConfig(max_side=a.max_side, max_pixels=a.max_pixels,
                                                       max_encode_memory_gib=a.max_encode_memory),
                          dtype=a.dtype, seed=a.seed, precision=a.precision, engine=a.encode_engine,
                          engine_cache=a.engine_cache)
    cfg = EncodeConfig(
        input=a.input, image_root=a.image_root, coco_id=a.coco_id, db=a.db, table=a.table, storage_options=options,
        encoder=encoder, batch_size=a.batch_size, write_batch=a.write_batch, num_encoders=a.num_encoders,
        cpus_per_encoder=a.cpus_per_encoder, address=a.address, num_cpus=a.num_cpus,
        commit_interval=a.commit_interval, limit=a.limit, retry_failed=a.retry_failed,
        check_content=a.check_content, reencode_changed=a.reencode_changed, strict=a.strict,
        ray_progress=a.ray_progress, stall_timeout=a.stall_timeout,
    )
    return cfg, a.summary_json


def _unwritable(path: str) -> str | None:
    """Why a file could not be written at `path` at the end of the run (found now, before any work), or None."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return "is a folder; give a file name"
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        return "is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    cfg, summary_json = parse_args(argv)
    try:
        summary = run(cfg)
    except (SourceError, CheckpointError, ResourcePlanError, TableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the run began (loading the model): nothing was changed
        print("\nencode: stopped before it began; nothing was changed", file=sys.stderr)
        return EXIT_STOPPED
    except RayStartError as e:  # a cluster that cannot be joined, or a local Ray that would not start
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    print(format_summary(summary), flush=True)
    if summary_json:
        write_json_atomic(summary_json, {**asdict(summary), "images_per_s": summary.images_per_s}, indent=2)
    if summary.stalled:
        print(f"error: the cluster stalled: {summary.error.partition(': ')[2]}; the {summary.encoded} images encoded "
              "before are committed (see the summary): run again once the cluster has a node for an encoder, it "
              "resumes where this run stopped", file=sys.stderr, flush=True)
    elif summary.error:
        print(f"error: the run failed: {summary.error}; what was committed stays (see the summary): fix the cause "
              "and run again to finish", file=sys.stderr, flush=True)
    return exit_code(summary, cfg.strict)


if __name__ == "__main__":
    sys.exit(main())
