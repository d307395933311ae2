"""The evaluation command line (`interformer-evaluate`): its options, checked, and the segmenter they name."""
from __future__ import annotations

import argparse
from pathlib import Path

from interformer.checkpoint import CheckpointError, check_checkpoint
from interformer.cli_types import COUNT, FRACTION, POSITIVE, SEED, integer, real
from interformer.click_engine import add_click_engine_arguments
from interformer.config import CONFIGS

from .baselines import GrabCutConfig
from .datasets import default_data_root
from .feature_store import check_table_name
from .evaluation import PROTOCOLS, EvalConfig
from .segmenters import SegmenterSpec
from .stall import add_stall_timeout_argument


def build_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The evaluation options; `doc` gives the description (first paragraph) and the examples."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help="benchmark name under --data-root (GrabCut, Berkeley, DAVIS), a dataset folder "
                        "(GrabCut data_GT/boundary_GT, DAVIS img/gt, or images/masks) or a COCO annotation .json")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", type=Path, help="InterFormer checkpoint file to evaluate")
    what.add_argument("--baseline", choices=["grabcut"], help="evaluate a classical baseline instead of a model")
    what.add_argument("--random-init", metavar="VARIANT", choices=sorted(CONFIGS),
                      help="evaluate a randomly initialised model of this variant (light, tiny, small, small_refine)")
    p.add_argument("--variant", help="expected variant of --checkpoint (an error if the file holds another)")
    p.add_argument("--init-seed", type=SEED, default=0,
                   help="torch seed for --random-init weights (default 0, as jobs/encode.py --seed)")
    p.add_argument("--device", help="torch device for the model (default: CUDA when available, else CPU)")
    p.add_argument("--max-side", type=integer(32),
                   help="resize images so the longest side is at most this before the model (default: native size; "
                        "must match the encode job's --max-side when --feature-db is used)")
    p.add_argument("--feature-db", help="LanceDB root of stored features (jobs/encode.py --db) to read instead of "
                                        "encoding each image; rows must come from the same model and preprocessing")
    p.add_argument("--feature-table", default="features", help="feature table name under --feature-db (default features)")
    p.add_argument("--feature-id-prefix", default="",
                   help="prefix added to a sample's image file name to form its id in the feature table "
                        "(ids are paths relative to the folder that was encoded, e.g. 'data_GT/')")
    p.add_argument("--protocol", choices=PROTOCOLS, default="ritm",
                   help="click simulator and IoU: 'ritm' (standard, default) or 'interformer' (the InterFormer "
                        "repository's clicktest: padded canvas, random tie-break)")
    p.add_argument("--zoom-in", action="store_true",
                   help="models with refine stages (tiny): use the demo's feature zoom-in from click 3 (default: "
                        "off, as the InterFormer repository's evaluation); recorded in run.json and added to the "
                        "default run name ('-zoomin')")
    p.add_argument("--max-clicks", type=COUNT, default=20, help="clicks per sample (default 20)")
    p.add_argument("--pred-thr", type=FRACTION, default=0.49,
                   help="RITM protocol: foreground when probability > this (default 0.49, RITM's)")
    p.add_argument("--seed", type=SEED, default=0, help="InterFormer protocol: tie-break seed (default 0)")
    p.add_argument("--data-root", type=Path, default=default_data_root(),
                   help="folder holding GrabCut/, Berkeley/, DAVIS/ (default: %(default)s, the shared/data beside "
                        "the project checkout, whatever the current folder)")
    p.add_argument("--coco-images", type=Path, help="image folder of a COCO annotation file given as DATASET")
    p.add_argument("--coco-min-area", type=real(0), default=0.0, help="COCO: skip instances smaller than this (pixels)")
    p.add_argument("--coco-include-crowd", action="store_true", help="COCO: also evaluate crowd regions")
    p.add_argument("--ignore-value", type=integer(0, 255),
                   help="generic images/masks folders: mask value to ignore (default: none; non-zero is object)")
    p.add_argument("--limit", type=COUNT, help="evaluate only the first N samples of each dataset (quick runs)")
    p.add_argument("--output", type=Path, help="output folder (default runs/NAME)")
    p.add_argument("--name", help="run name in tables and plots (default: baseline name, checkpoint stem or "
                                  "random-VARIANT, plus '-interformer' for that protocol)")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in the output folder")
    p.add_argument("--compare", nargs="+", type=Path, default=[], metavar="RUN",
                   help="other runs (output folders or results.jsonl files) to add to the table and plot; "
                        "without a model option, only these are summarised")
    p.add_argument("--workers", type=COUNT, help="Ray workers (default: the cluster's CPUs divided by --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=real(0), default=0.0, help="GPUs reserved per worker (default 0)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto', HOST:PORT); default: the cluster of a `ray job submit` "
                        "(RAY_ADDRESS), else a private local Ray ('local' forces one)")
    p.add_argument("--num-cpus", type=COUNT, help="CPUs of the private local cluster (default: all)")
    add_stall_timeout_argument(p, "sample", "a worker", "the run stops, keeping the finished samples, and exits 1")
    add_click_engine_arguments(p.add_argument_group("click engine (model runs)"))
    return p


def _check_device(p: argparse.ArgumentParser, device: str) -> None:
    """Refuse a --device torch cannot name, or CUDA on a machine without it, before any worker starts."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        p.error(f"--device {device!r}: {str(e).splitlines()[0]}")
    if kind == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device!r}: CUDA is not available on this machine")


def parse_args(prog: str, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked; `args.spec` is the segmenter to evaluate (None: only --compare) and
    `args.eval_config` the protocol."""
    p = build_parser(prog, doc)
    args = p.parse_args(argv)
    has_model = args.checkpoint or args.baseline or args.random_init
    if not has_model and not args.compare:
        p.error("give --checkpoint, --baseline or --random-init (or --compare to summarise earlier runs)")
    if has_model and not args.datasets:
        p.error("name at least one DATASET to evaluate")
    if args.device is not None:
        _check_device(p, args.device)
    try:
        check_table_name(args.feature_table)
    except ValueError as e:
        p.error(f"--feature-table: {e}")
    if args.checkpoint is not None:
        try:  # the workers load it; a bad file is the user's error, before any of them starts
            args.variant = check_checkpoint(args.checkpoint, args.variant)
        except CheckpointError as e:
            p.error(f"--checkpoint: {e}")
    try:
        args.spec = build_spec(args) if has_model else None
        args.eval_config = EvalConfig(args.protocol, args.max_clicks, args.pred_thr, args.seed)
    except ValueError as e:
        p.error(str(e))
    return args


def build_spec(args: argparse.Namespace) -> SegmenterSpec:
    """The segmenter the options name: the GrabCut baseline, random weights, or a checkpoint."""
    if args.baseline:
        return SegmenterSpec("grabcut", grabcut=GrabCutConfig(), zoom_in=args.zoom_in)
    common = dict(device=args.device, max_side=args.max_side, feature_db=args.feature_db,
                  feature_table=args.feature_table, feature_id_prefix=args.feature_id_prefix,
                  engine=args.click_engine, engine_cache=args.engine_cache,
                  engine_max_sizes=args.engine_max_sizes, zoom_in=args.zoom_in)
    if args.random_init:
        return SegmenterSpec("random", variant=args.random_init, seed=args.init_seed, **common)
    return SegmenterSpec("checkpoint", checkpoint=str(args.checkpoint), variant=args.variant, **common)
