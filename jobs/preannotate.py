"""Pre-annotate a collection with InterFormer: prompts (boxes, coarse masks or polygons, points) -> masks.

Examples:
  # COCO prompts -> COCO file of masks (features stored earlier by jobs/encode.py)
  interformer-preannotate --coco coarse.json --image-root images/ --coco-out masks.json --checkpoint light.pth

  # COCO prompts -> predictions in Label Studio project 3 (tasks are created for images without one)
  LABEL_STUDIO_URL=http://ls:8080 LABEL_STUDIO_API_KEY=... interformer-preannotate --coco coarse.json \\
      --image-root images/ --ls-project 3 --push --checkpoint light.pth

  # the boxes/keypoints annotators drew in project 3 -> brush predictions in the same project
  interformer-preannotate --ls-project 3 --push --checkpoint light.pth

  # the same as polygons: polygonlabels predictions (the project's PolygonLabels tag), COCO polygons
  interformer-preannotate --ls-project 3 --push --mask-format polygon --coco-out polygons.json --checkpoint light.pth

Per object: a box becomes the backend's centre click + region; a coarse mask or polygon drives RITM's click
simulator until --target-iou against it or --max-clicks; points are clicked as given. Images are spread
over CPU Ray workers that read the stored features by image id. Every finished image is appended to
RUN_DIR/ledger.jsonl, so a killed run resumes where it stopped; Label Studio tasks that already hold a
prediction of this model version are never given a second one. RUN_DIR/report.csv lists every object
(clicks, IoU against the coarse label, score, polygon IoU against the mask, or why it was not segmented).
"""
from __future__ import annotations

import sys

from pipeline.ray_runtime import RayStartError, prepare_job_process

prepare_job_process("jobs/preannotate.py")  # before the imports that need the project's packages

from connectors.label_studio_client import LabelStudioError  # noqa: E402
from interformer.checkpoint import CheckpointError  # noqa: E402
from connectors.label_studio_preannotation import ProjectLink  # noqa: E402
from connectors.preannotate_cli import build_parser, parse_config  # noqa: E402
from pipeline.actor_pool import WorkerStartError  # noqa: E402
from pipeline.ledger import LedgerError  # noqa: E402
from pipeline.preannotation_report import format_summary, nothing_segmented, push_incomplete, write_summary  # noqa: E402
from pipeline.preannotation_run import OutputError, PreannotateConfig, RunDirError, run  # noqa: E402
from pipeline.prompts import PromptFileError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> PreannotateConfig:
    return parse_config(build_parser("interformer-preannotate", __doc__), argv)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run(cfg, ProjectLink(cfg) if cfg.ls_project is not None else None)
    except (RunDirError, PromptFileError, LabelStudioError, LedgerError, RayStartError, OutputError, CheckpointError,
            WorkerStartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    write_summary(summary)
    if summary.interrupted and summary.error:  # the cluster lost the workers: not a stop anyone asked for
        print(f"error: {summary.error}; the finished images are in the ledger: run again with the same options to "
              "resume once the cluster has a node for a worker", file=sys.stderr)
        return 1
    if summary.interrupted:
        return 130
    if summary.push_stopped:
        print(f"error: {summary.push_stopped}", file=sys.stderr)
        return 2
    if nothing_segmented(summary):
        print("error: no object could be segmented (see the report)", file=sys.stderr)
        return 1
    if push_incomplete(summary):
        print(f"error: {push_incomplete(summary)} predictions were not delivered to Label Studio (listed above); "
              "run again to push those that are missing" + (" (import tasks for the images without one first)"
                                                             if summary.no_task else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
