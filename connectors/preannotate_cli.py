"""The pre-annotation command line: its options and the `PreannotateConfig` they make.

Defined here, beside the Label Studio client, because the options name both prompt sources and both
outputs; `jobs/preannotate.py` parses them and runs `pipeline.preannotation_run.run`.
"""
from __future__ import annotations

import argparse
import os

from interformer.cli_types import COUNT, FRACTION, POSITIVE, SEED, integer, real
from interformer.click_engine import add_click_engine_arguments, click_engine_config
from interformer.config import CONFIGS, DEFAULT_MAX_ENCODE_MEMORY_GIB, PreprocessConfig
from interformer.encode_engine import add_encode_engine_argument
from pipeline.coco_output import FORMATS
from pipeline.encoding import EncoderSpec
from pipeline.feature_store import DEFAULT_ROOT, DEFAULT_TABLE, check_table_name, parse_storage_options
from pipeline.image_access import ImageAccess, ImageAccessError, add_image_access_arguments
from pipeline.polygons import DEFAULT_MIN_IOU, DEFAULT_TOLERANCE
from pipeline.preannotation import MASK_FORMATS, ClickPolicy, MaskFormat
from pipeline.preannotation_run import DEFAULT_IMAGE_URL, PreannotateConfig
from pipeline.prompts import USE_CHOICES
from pipeline.stall import add_stall_timeout_argument

from .label_studio_client import url_template


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """Every option, grouped; `doc` gives the description (first paragraph) and the examples."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[1:]) + "\n\nLabel Studio credentials come from the environment: "
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
    src.add_argument("--ls-project", type=COUNT, metavar="ID",
                     help="Label Studio project: the prompt source when no --coco is given (its tasks' rectangles "
                     "and keypoints), and the target of --push")
    src.add_argument("--ls-url", default=None, help="Label Studio base URL (default: $LABEL_STUDIO_URL)")
    src.add_argument("--ls-prompts", choices=("annotations", "predictions"), default="annotations",
                     help="read prompt regions from each task's newest annotation or prediction (default: %(default)s)")
    src.add_argument("--ls-prompt-model-version", metavar="VERSION",
                     help="with --ls-prompts predictions: only predictions of this model version (e.g. a detector's)")
    src.add_argument("--ls-brush", metavar="NAME", help="BrushLabels tag to fill when the config has several")
    src.add_argument("--ls-polygon", metavar="NAME",
                     help="with --mask-format polygon: PolygonLabels tag to fill when the config has several")
    out = p.add_argument_group("outputs (at least one)")
    out.add_argument("--coco-out", metavar="FILE", help="write the masks as a COCO file (RLE or polygon "
                     "segmentations, see --mask-format)")
    out.add_argument("--coco-format", choices=FORMATS, default="annotations",
                     help="'annotations': a self-contained COCO dataset; 'results': a results list for "
                     "COCO.loadRes against the --coco file, RLE only: loadRes cannot read polygons "
                     "(default: %(default)s)")
    out.add_argument("--mask-format", choices=MASK_FORMATS, default="rle",
                     help="'rle': COCO RLE and Label Studio brush (BrushLabels) regions; 'polygon': COCO polygon "
                     "segmentations and Label Studio polygonlabels regions (the project needs a PolygonLabels "
                     "tag); each object's polygon IoU against its mask is in the report (default: %(default)s)")
    out.add_argument("--polygon-tolerance", type=real(0), default=DEFAULT_TOLERANCE, metavar="PX",
                     help="with --mask-format polygon: simplify outlines by at most this many pixels "
                     f"(Douglas-Peucker); halved for a mask whose polygons would fall below IoU {DEFAULT_MIN_IOU} "
                     "(default: %(default)s)")
    out.add_argument("--push", action="store_true",
                     help="push the masks as predictions (brush RLE or polygons, model_version, score) into "
                     "--ls-project; "
                     "tasks are created, with image_id in their data, for images that have none")
    out.add_argument("--push-batch", type=COUNT, default=50, help="predictions per import call (default: %(default)s)")
    out.add_argument("--image-url", default=DEFAULT_IMAGE_URL,
                     help="image URL of new tasks, from {file_name}, {image_id} and {uri} (default: %(default)s). "
                     "Label Studio serves /data/local-files/?d=PATH (PATH relative to its LOCAL_FILES_DOCUMENT_ROOT) "
                     "only when the project has a Local Storage whose folder holds the file, and that folder must "
                     "be a subfolder of the root, never the root itself: e.g. LOCAL_FILES_DOCUMENT_ROOT=/data, "
                     "--image-root /data/images, --image-url '/data/local-files/?d=images/{file_name}' and a "
                     "Local Storage on /data/images. Values are percent-encoded in paths and http(s) URLs, raw in "
                     "s3:// or gs:// ones")
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
    model.add_argument("--seed", type=SEED, default=0, help="seed of the random initialisation (default: %(default)s)")
    model.add_argument("--max-side", type=integer(32), default=None, help="the --max-side jobs/encode.py used (part of "
                       "the feature fingerprint; default: native size)")
    model.add_argument("--max-encode-memory", type=POSITIVE, default=DEFAULT_MAX_ENCODE_MEMORY_GIB, metavar="GIB",
                       help="GiB of attention memory encoding an image on demand (--encode-missing) may take, as "
                       "jobs/encode.py: a larger image fails as too_large (default: %(default)s)")
    model.add_argument("--model-version", help="model_version written with predictions and COCO entries (default: "
                       "the backend's, interformer-<variant>-<checkpoint>-<sha256[:8]>); a re-run with the same one "
                       "adds no duplicates")
    model.add_argument("--encode-missing", action="store_true",
                       help="encode images that have no stored features on the workers' CPUs (and store them); "
                       "without it their objects are reported as no_features")
    add_encode_engine_argument(model, "what encodes them (--encode-missing)")
    add_image_access_arguments(p.add_argument_group(
        "image access (--encode-missing on Label Studio tasks: where their images may be read from)"))
    add_click_engine_arguments(p.add_argument_group("click engine"))
    sim = p.add_argument_group("click simulation (coarse masks and polygons)")
    sim.add_argument("--target-iou", type=FRACTION, default=0.9,
                     help="stop clicking when the mask reaches this IoU against the coarse label (default: %(default)s)")
    sim.add_argument("--max-clicks", type=COUNT, default=10,
                     help="at most this many simulated clicks per object; the best mask is kept (default: %(default)s)")
    run = p.add_argument_group("running")
    run.add_argument("--run-dir", help="folder of the ledger, report and summary (default: "
                     "runs/preannotate/<source>-<model version>, then the settings that differ from their "
                     "defaults, e.g. -polygon, -fast: a folder holds one setting's run)")
    run.add_argument("--fresh", action="store_true", help="forget an earlier run in --run-dir and start over")
    run.add_argument("--workers", type=integer(0), default=None,
                     help="Ray workers (default: the cluster's CPUs / --cpus-per-worker); 0 runs in this process")
    run.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0,
                     help="CPUs reserved per worker; its torch threads (default: %(default)s)")
    add_stall_timeout_argument(run, "image", "a worker", "the run stops (the finished images are in the ledger: "
                               "nothing is pushed twice) and exits 1")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (e.g. auto, ray://head:10001); default: the cluster of a `ray job "
                     "submit` (RAY_ADDRESS), else a private local Ray")
    run.add_argument("--num-cpus", type=COUNT, default=None, help="CPUs of the private local Ray (default: all)")
    run.add_argument("--limit", type=COUNT, default=None, help="process at most this many images (quick trials)")
    return p


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> PreannotateConfig:
    """The run's settings from the command line; a bad value or combination exits with the parser's error."""
    a = parser.parse_args(argv)
    if a.checkpoint is not None and not os.path.isfile(a.checkpoint):
        parser.error(f"--checkpoint {a.checkpoint!r} is not a file")
    if a.coco is not None and "://" not in a.coco and not os.path.isfile(a.coco):
        parser.error(f"--coco {a.coco!r} is not a file")
    try:
        check_table_name(a.table)
    except ValueError as e:
        parser.error(f"--table: {e}")
    if "://" not in a.db and os.path.exists(a.db) and not os.path.isdir(a.db):
        parser.error(f"--db {a.db!r} is a file, not a LanceDB folder")
    try:
        url_template(a.image_url)
    except ValueError as e:
        parser.error(f"--image-url: {e}")
    try:
        options = parse_storage_options(a.storage_option)
    except ValueError as e:
        parser.error(str(e))
    try:
        access = ImageAccess.from_args(a)
    except (ImageAccessError, ValueError) as e:
        parser.error(f"image access: {e}")
    if a.polygon_tolerance != DEFAULT_TOLERANCE and a.mask_format != "polygon":
        parser.error("--polygon-tolerance goes with --mask-format polygon")
    variant = a.variant or (None if a.checkpoint else "light")
    encoder = EncoderSpec(checkpoint=os.path.abspath(a.checkpoint) if a.checkpoint else None, variant=variant,
                          preprocess=PreprocessConfig(max_side=a.max_side, max_encode_memory_gib=a.max_encode_memory), seed=a.seed, engine=a.encode_engine,
                          engine_cache=a.engine_cache)
    try:
        return PreannotateConfig(
            coco=a.coco, image_root=a.image_root, coco_id=a.coco_id, use=a.use, ls_project=a.ls_project,
            ls_url=a.ls_url, ls_prompts=a.ls_prompts, ls_prompt_model_version=a.ls_prompt_model_version,
            ls_brush=a.ls_brush, ls_polygon=a.ls_polygon, push=a.push, push_batch=a.push_batch,
            image_url=a.image_url, coco_out=a.coco_out,
            coco_format=a.coco_format, db=a.db if "://" in a.db else os.path.abspath(a.db), table=a.table,
            storage_options=options, encoder=encoder, model_version=a.model_version,
            policy=ClickPolicy(a.target_iou, a.max_clicks),
            output=MaskFormat(a.mask_format, a.polygon_tolerance), encode_missing=a.encode_missing,
            image_access=access, engine=click_engine_config(a), run_dir=a.run_dir, fresh=a.fresh, workers=a.workers,
            cpus_per_worker=a.cpus_per_worker, address=a.address, num_cpus=a.num_cpus, limit=a.limit,
            stall_timeout=a.stall_timeout,
        )
    except ValueError as e:
        parser.error(str(e))
