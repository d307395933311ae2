"""COCO files of pre-annotated masks: RLE (pycocotools' encoder) or polygons (`--mask-format polygon`).

Two forms:
  annotations  a self-contained COCO dataset (images, categories, annotations with RLE segmentations):
               opens with `pycocotools.coco.COCO(path)`; works for any prompt source;
  results      the detection-results list (`COCO.loadRes`) against the prompt file's own images and
               categories; needs a COCO prompt source (numeric image and category ids).
Every annotation carries the mask's `score` and how it was made: `source_key` (the prompt object),
`prompt` (box/mask/points), `clicks`, and `iou_prompt` (IoU against the coarse label, when there was one);
polygons also carry `polygon_iou`, their IoU against the mask they came from. `area` and `bbox` are the
mask's. An empty mask has no polygon (pycocotools cannot read an empty polygon list), so in polygon
form it is left out, as it would have nothing to show.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

from .preannotation import ImageResult, ObjectResult
from .prompts import ImageJob

FORMATS = ("annotations", "results")


def _extras(o: ObjectResult, model_version: str) -> dict[str, Any]:
    extras = {"score": o.score, "source_key": o.key, "prompt": o.kind, "clicks": len(o.clicks), "iou_prompt": o.iou,
              "model_version": model_version}
    if o.polygons is not None:
        extras["polygon_iou"] = o.polygon_iou
    return extras


def _written(o: ObjectResult) -> bool:
    """A segmented object with a segmentation COCO readers can decode (polygons: at least one)."""
    return o.ok and (o.polygons is None or len(o.polygons) > 0)


def _as_prompted(results: Iterable[ImageResult], jobs: Mapping[str, ImageJob]) -> list[ImageResult]:
    """Results whose objects carry the category and label of the prompts now, not of the run that made the
    mask: a rerun after the prompt file renumbered its categories resumes the masks (which the category does
    not decide) and must still write them under the file's current ids."""
    out = []
    for r in results:
        now = {p.key: p for p in jobs[r.key].objects}
        objects = [replace(o, category_id=now[o.key].category_id, label=now[o.key].label) if o.key in now else o
                   for o in r.objects]
        out.append(replace(r, objects=objects))
    return out


def coco_results(results: Iterable[ImageResult], jobs: Mapping[str, ImageJob], model_version: str) -> list[dict]:
    """The results list: one entry per segmented object whose image and category have COCO ids, on the COCO
    image entry the object was annotated on (several entries may name one image file: they share one job).
    `jobs` maps ImageJob.key to the job of each result."""
    out = []
    for r in _as_prompted(results, jobs):
        job = jobs[r.key]
        if job.source_image_id is None:
            raise ValueError(f"image {r.image_id!r} has no COCO image id: write the 'annotations' form instead")
        entry_of = {p.key: p.source_image_id for p in job.objects if isinstance(p.source_image_id, int)}
        for o in r.objects:
            if _written(o) and o.category_id is not None:
                # no bbox: with one, loadRes would take the box area as the object's area
                out.append({"image_id": entry_of.get(o.key, job.source_image_id), "category_id": o.category_id,
                            "segmentation": o.segmentation,
                            **_extras(o, model_version)})
    return out


def coco_annotations(
    results: Iterable[ImageResult],
    jobs: Mapping[str, ImageJob],
    model_version: str,
    categories: Mapping[int, str] | None = None,
    image_entries: Mapping[str, Sequence[dict]] | None = None,
) -> dict[str, Any]:
    """A COCO dataset of the segmented objects. Image entries and categories are the prompt file's when
    given (several entries may name one image file: they share one job, and each object goes on the entry it
    was annotated on, as in `coco_results`); otherwise images get ids 1.. (file_name = the feature-table id)
    and categories ids 1.. by label."""
    results = sorted(_as_prompted(results, jobs), key=lambda r: r.key)
    image_entries = image_entries or {}
    cats = dict(categories or {})
    by_name = {name: cid for cid, name in cats.items()}
    for r in results:
        for o in r.objects:
            if not _written(o):
                continue
            if o.category_id is not None:
                if o.category_id not in cats:
                    cats[o.category_id] = o.label
                    by_name.setdefault(o.label, o.category_id)
            elif o.label not in by_name:
                cid = max(cats, default=0) + 1
                cats[cid] = o.label
                by_name[o.label] = cid
    images, annotations = [], []
    next_image = max((e["id"] for es in image_entries.values() for e in es if isinstance(e.get("id"), int)),
                     default=0) + 1
    for r in results:
        job = jobs[r.key]
        entries = list(image_entries.get(r.image_id) or ())
        if not entries:
            entry = {"id": next_image, "file_name": r.image_id, "height": r.size[0], "width": r.size[1]}
            next_image += 1
            if job.task_id is not None:
                entry["ls_task_id"] = job.task_id
            entries = [entry]
        images.extend(entries)
        ids = {e.get("id") for e in entries}
        entry_of = {p.key: p.source_image_id for p in job.objects if p.source_image_id in ids}
        for o in r.objects:
            if not _written(o):
                continue
            cid = o.category_id if o.category_id is not None else by_name[o.label]
            image_id = entry_of.get(o.key, entries[0]["id"])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cid,
                                "segmentation": o.segmentation, "area": o.area, "bbox": o.bbox, "iscrowd": 0,
                                **_extras(o, model_version)})
    return {
        "info": {"description": "masks pre-annotated by InterFormer from prompts (jobs/preannotate.py)",
                 "model_version": model_version},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for cid, name in sorted(cats.items())],
    }
