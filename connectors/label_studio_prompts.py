"""Object prompts from Label Studio tasks (bulk pre-annotation), and predictions back for them. Pure.

Prompts come from each task's newest annotation (or prediction) holding `rectanglelabels` or
`keypointlabels` regions, the same region types the interactive backend reads:
  - every rectangle is one object: its centre click and region, as `protocol.box_to_click` makes them;
  - a keypoint inside a rectangle of the same label (the smallest, when several) adds a click to it;
  - the other keypoints of a label form one object together (Alt-click negatives included).
Labels compare by value: a region labelled with a Label's alias (as Label Studio writes it) is that Label.
The image is the output tag's image, identified as the interactive backend does (`protocol.task_image`):
`data.image_id_<Image tag name>`, or `data.image_id` in a config with one Image tag (the feature-table id),
else the tag's image URL: the worker then finds the row whose `uri` is that URL, or the row the backend's
on-demand encoder stored under that URL as id.

Coordinates read from tasks are in the grid Label Studio shows (an image's stored pixels turned by its EXIF
orientation tag); the worker maps them into the stored grid of the features (pipeline/preannotation.py), and
`prediction_for` maps its stored-grid results back (pipeline/orientation.py).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

from interformer.clicks import Click

from pipeline import box_prompt
from pipeline.orientation import Orientation, normalize_tag
from pipeline.polygons import MaskPolygons
from pipeline.preannotation import ImageResult
from pipeline.prompts import (
    BAD_IMAGE_ENTRY,
    BAD_POINTS,
    MISSING_IMAGE_ENTRY,
    ImageJob,
    ObjectPrompt,
    Problem,
    PromptSet,
    decode_rle,
)

from .protocol import (
    MAX_REGION_ID_CHARS,
    PROMPT_TYPES,
    ContextItem,
    ControlTag,
    LabelConfig,
    Prompt,
    ProtocolError,
    holding_box,
    mask_results,
    parse_body,
    percent_to_pixel,
    task_image,
)
from .region_meta import click_meta
from .rle import mask_to_rle

PROMPT_SOURCES = ("annotations", "predictions")


def _label(item: ContextItem) -> str | None:
    labels = item.value.get(item.type)
    return labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None


def _on_image(region: dict, config: LabelConfig, image: str) -> bool:
    """Whether a region is drawn on the Image tag `image` (the output tag's image): its to_name says so (or it
    names none and the config has one image only), and its from_name is not a prompt tag of another image."""
    to_name, from_name = region.get("to_name"), region.get("from_name")
    if to_name is None:
        on = len(config.images) == 1 and image in config.images
    else:
        on = to_name == image
    tag = config.prompts.get(from_name) if isinstance(from_name, str) else None
    return on and (tag is None or tag.to_name == image)


def _newest_with_prompts(entries: list, model_version: str | None, skip_version: str | None,
                         config: LabelConfig, image: str) -> list[tuple[int, dict]]:
    """(index in its result, region) of the prompt regions on `image` of the newest annotation/prediction that
    has any (cancelled annotations skipped; malformed entries ignored)."""
    candidates = []
    for e in entries:
        if not isinstance(e, dict) or e.get("was_cancelled"):
            continue
        mv = e.get("model_version")
        if (model_version is not None and mv != model_version) or (skip_version is not None and mv == skip_version):
            continue
        result = e.get("result")
        if not isinstance(result, list):
            continue
        regions = [(n, r) for n, r in enumerate(result)
                   if isinstance(r, dict) and r.get("type") in PROMPT_TYPES and _on_image(r, config, image)]
        if regions:
            when = e.get("updated_at") or e.get("created_at") or ""
            eid = e.get("id")
            candidates.append((str(when), eid if isinstance(eid, int) and not isinstance(eid, bool) else 0, regions))
    if not candidates:
        return []
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def task_prompts(
    tasks: Iterable[dict],
    config: LabelConfig,
    brush: ControlTag,
    source: str = "annotations",
    prompt_model_version: str | None = None,
    skip_model_version: str | None = None,
) -> PromptSet:
    """Image jobs (one per task with prompt regions on the output tag's image) and per-object problems.

    source: "annotations" or "predictions" (then only those of `prompt_model_version` when given, and never
    those of `skip_model_version`, the version this job writes). A malformed task is a problem of its own,
    never an exception.
    """
    if source not in PROMPT_SOURCES:
        raise ValueError(f"source must be one of {PROMPT_SOURCES}, got {source!r}")
    out = PromptSet()
    for n, task in enumerate(tasks):
        tid = task.get("id") if isinstance(task, dict) else None
        if not isinstance(tid, int) or isinstance(tid, bool):
            out.problems.append(Problem(f"ls:task-{n}", None, None, BAD_IMAGE_ENTRY,
                                        f"task number {n} of the project's list has no integer id: {_shown(tid)}"))
            continue
        entries = task.get(source)
        if not isinstance(entries, list):
            if entries is not None:
                out.problems.append(Problem(f"ls:{tid}", None, None, BAD_IMAGE_ENTRY,
                                            f"task {tid}: {source} is not a list: {_shown(entries)}"))
            continue
        regions = _newest_with_prompts(entries, prompt_model_version if source == "predictions" else None,
                                       skip_model_version if source == "predictions" else None,
                                       config, brush.to_name)
        if not regions:
            continue
        data = task.get("data")
        if not isinstance(data, dict):
            out.problems.append(Problem(f"ls:{tid}", None, None, BAD_IMAGE_ENTRY,
                                        f"task {tid}: data is not an object: {_shown(data)}"))
            continue
        try:
            image_id, ref = task_image(data, config, brush.to_name, f"task {tid}")
        except ProtocolError as e:
            out.problems.append(Problem(f"ls:{tid}", None, None, MISSING_IMAGE_ENTRY, e.message))
            continue
        job, problems = _task_job(tid, image_id or ref, ref, regions, config, brush)
        out.problems.extend(problems)
        if job is not None:
            out.images.append(job)
    out.images.sort(key=lambda j: j.image_id)
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def region_key(tid: int, index: int, region: dict) -> str:
    """The object key of a region of task `tid`: its Label Studio id (a digest of a long one), else its index
    in the result (Label Studio accepts regions without an id)."""
    rid = region.get("id")
    if not isinstance(rid, str) or not rid:
        return f"ls:{tid}:#{index}"
    if len(rid) > MAX_REGION_ID_CHARS:
        rid = "sha1-" + hashlib.sha1(rid.encode("utf-8", "surrogatepass")).hexdigest()
    return f"ls:{tid}:{rid}"


def object_label(item: ContextItem, config: LabelConfig, output: ControlTag) -> str | None:
    """A region's label as the value of its Label (an alias and its value are one label): by its prompt tag
    (`from_name`), then by the output tag; None when it has none."""
    raw = _label(item)
    if raw is None:
        return None
    label = config.canonical_label(raw, item.from_name)
    return output.canonical(label) or label


def _task_job(tid: int, image_id: str, ref: str | None, regions: list[tuple[int, dict]], config: LabelConfig,
              output: ControlTag) -> tuple[ImageJob | None, list[Problem]]:
    problems: list[Problem] = []
    items: list[tuple[str, ContextItem, str]] = []
    seen: set[str] = set()
    for n, r in regions:
        key = region_key(tid, n, r)
        if key in seen:
            problems.append(Problem(key, image_id, None, BAD_IMAGE_ENTRY,
                                    f"task {tid} has several regions with the id {r.get('id')!r}: only the first is used"))
            continue
        seen.add(key)
        try:
            item = parse_body(ContextItem, r)
        except ProtocolError as e:
            problems.append(Problem(key, image_id, None, BAD_IMAGE_ENTRY, e.message))
            continue
        label = object_label(item, config, output)
        if label is None:
            problems.append(Problem(key, image_id, None, BAD_POINTS, f"{item.type} region has no label"))
            continue
        if item.image_rotation:
            problems.append(Problem(key, image_id, label, BAD_IMAGE_ENTRY,
                                    f"rotated images are not supported (image_rotation={item.image_rotation:g}): "
                                    "draw the prompt on the image unrotated"))
            continue
        items.append((key, item, label))
    sizes = {(it.original_height, it.original_width) for _, it, _ in items}
    if len(sizes) > 1:
        problems += [Problem(key, image_id, label, BAD_IMAGE_ENTRY,
                             f"regions disagree on the image size: {sorted(sizes)}") for key, _, label in items]
        return None, problems
    if not items:
        return None, problems
    size = sizes.pop()
    boxes: list[dict[str, Any]] = []
    for key, it, label in ((k, i, lab) for k, i, lab in items if i.type == "rectanglelabels"):
        try:
            click, region = box_prompt.box_to_click(it.value, size)
        except box_prompt.BoxPromptError as e:
            problems.append(Problem(key, image_id, label, e.reason, str(e)))
            continue
        boxes.append({"key": key, "label": label, "click": click, "region": region, "value": it.value, "extra": []})
    boxes_by_label: dict[str, list[dict[str, Any]]] = {}  # grouped once: each keypoint looks at its label's only
    for b in boxes:
        boxes_by_label.setdefault(b["label"], []).append(b)
    groups: dict[str, list[Click]] = {}
    for key, it, label in ((k, i, lab) for k, i, lab in items if i.type == "keypointlabels"):
        try:
            click = Click(percent_to_pixel(it.value.get("y"), size[0], "keypoint y"),
                          percent_to_pixel(it.value.get("x"), size[1], "keypoint x"),
                          True if it.is_positive is None else bool(it.is_positive))
        except ProtocolError as e:
            problems.append(Problem(key, image_id, label, BAD_POINTS, e.message))
            continue
        same = boxes_by_label.get(label, [])
        held_by = holding_box([b["value"] for b in same], it.value)  # the drawn rectangle, as the backend
        if held_by is not None:
            same[held_by]["extra"].append(click)
        else:
            groups.setdefault(label, []).append(click)
    objects = [ObjectPrompt(b["key"], image_id, b["label"], "box", size, clicks=(b["click"], *b["extra"]),
                            box=b["region"]) for b in boxes]
    for label, clicks in groups.items():
        key = f"ls:{tid}:points:{label}"
        if not any(c.positive for c in clicks):
            problems.append(Problem(key, image_id, label, BAD_POINTS, "only negative keypoints: nothing to segment"))
            continue
        if key in seen:
            problems.append(Problem(key, image_id, label, BAD_IMAGE_ENTRY,
                                    f"task {tid} has a region with the id 'points:{label}', the key of its "
                                    f"{label!r} keypoints: give that region another id"))
            continue
        objects.append(ObjectPrompt(key, image_id, label, "points", size, clicks=tuple(clicks)))
    if not objects:
        return None, problems
    return ImageJob(image_id, size, tuple(objects), uri=ref, task_id=tid, via_label_studio=True), problems



def region_id(key: str) -> str:
    """A stable Label Studio region id for a prompt object (the same object gets the same id on every run)."""
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _clicks_shown(view: Orientation, clicks: list[list[int]]) -> list[list[int]] | None:
    """[row, col, positive] clicks of the stored grid in the displayed grid; None if one is outside the image."""
    try:
        return [[*view.point_to_displayed(int(r), int(c)), int(p)] for r, c, p in clicks]
    except (TypeError, ValueError):
        return None


def prediction_for(result: ImageResult, task_id: int, output: ControlTag, model_version: str,
                   fingerprint: str | None = None) -> dict | None:
    """The task's prediction: per segmented object, one brush region or (an `output` PolygonLabels tag, masks
    delivered as polygons) one polygon region per part; None when no object has a region. With the model's
    `fingerprint`, each region of an object prompted by clicks or a mask carries the clicks that made it in
    its `meta` (connectors/region_meta.py), so that the backend can continue that session.

    The result is in the image's stored pixel grid; the prediction is in the grid Label Studio shows (the stored
    one turned by the result's EXIF orientation tag): masks, polygons, clicks and the original size are mapped."""
    polygon = output.type == "polygonlabels"
    view = Orientation((int(result.size[0]), int(result.size[1])), normalize_tag(result.exif_orientation))
    size = view.displayed_size
    regions = []
    for o in result.objects:
        if not o.ok:
            continue
        prompt = Prompt(clicks=(), label=output.shown(o.label), brush_name=output.name, image_name=output.to_name,
                        original_size=size, output_type=output.type)
        if polygon:
            stored = o.mask_polygons(view.stored_size)
            shown = MaskPolygons([view.xy_to_displayed(p) for p in stored.polygons], size, stored.iou,
                                 stored.holes, stored.tolerance)
            found = mask_results(prompt, o.score or 0.0, polygons=shown.label_studio_points(),
                                 region_id=region_id(o.key))
        else:
            found = mask_results(prompt, o.score or 0.0, rle=mask_to_rle(view.mask_to_displayed(decode_rle(o.rle))),
                                 region_id=region_id(o.key))
        meta = None
        if fingerprint is not None and o.kind != "box":
            shown_clicks = _clicks_shown(view, o.clicks)
            meta = click_meta(shown_clicks, fingerprint) if shown_clicks is not None else None
        regions.extend({**r, "meta": meta} if meta else r for r in found)
    if not regions:
        return None
    score = sum(r["score"] for r in regions) / len(regions)
    return {"task": int(task_id), "result": regions, "score": float(score), "model_version": model_version}
