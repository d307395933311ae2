"""Label Studio ML backend protocol: request parsing, click conversion and response bodies.

Facts about the bodies Label Studio 1.23.2 sends and expects are in shared/spec/integrations.md §1.
Everything here is pure (no model, no IO) so that each rule can be tested on its own:

- the labelling config tells which `Image` the prompts point at, which `BrushLabels` tag receives the
  mask, and which labels exist;
- `params.context.result` holds the prompt regions of one interactive call: `keypointlabels`
  (top-level `is_positive`, Alt+click gives a negative point) and `rectanglelabels`, both in percent
  of the original image size;
- a box becomes one positive click at its centre plus a region: the box grown by `BOX_MARGIN` on every
  side is the zoom-in region of the model's refine stages and bounds the mask (`pipeline.box_prompt`).
"""
from __future__ import annotations

import hashlib
import math
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from interformer.clicks import Click, Roi
from pipeline import box_prompt

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")
MAX_CLICKS = 200  # prompt items per interactive call; InterFormer is evaluated up to 20 clicks
MAX_LABEL_CONFIG_CHARS = 1_000_000
MAX_REGION_ID_CHARS = 64  # a longer prompt item id is shortened (with a digest) in the region's key
MAX_LISTED_LABELS = 5  # labels an error message names (a config may have tens of thousands)
MAX_QUOTED_CHARS = 100  # a client's label quoted in an error message is cut to this


class ProtocolError(Exception):
    """A request Label Studio (or anyone) sent that cannot be served; `status` is the HTTP code to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------------
# Request bodies (extra fields are ignored: Label Studio sends many we do not use)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


MAX_IMAGE_SIDE = 1_000_000  # pixels; Label Studio's original_width/height of any real image is far below


class ContextItem(_Lenient):
    type: str
    value: dict[str, Any]
    original_width: int = Field(gt=0, le=MAX_IMAGE_SIDE)
    original_height: int = Field(gt=0, le=MAX_IMAGE_SIDE)
    image_rotation: float = Field(default=0.0, allow_inf_nan=False)
    is_positive: bool | None = None
    id: str | None = None
    from_name: str | None = None
    to_name: str | None = None

    @model_validator(mode="after")
    def _numeric_geometry(self) -> "ContextItem":
        """Coordinates (and a rectangle's rotation) are finite numbers; anything else is a 422, not a fault."""
        keys = {"keypointlabels": ("x", "y"), "rectanglelabels": ("x", "y", "width", "height", "rotation")}
        for key in keys.get(self.type, ()):
            v = self.value.get(key)
            if not (v is None and key == "rotation") and key in self.value and not box_prompt.is_finite_number(v):
                raise ValueError(f"value.{key} must be a finite number")
        return self


class Context(_Lenient):
    result: list[ContextItem] = Field(default_factory=list)


class Params(_Lenient):
    context: Context | None = None


class Task(_Lenient):
    id: int | None = None
    data: dict[str, Any]
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    drafts: list[dict[str, Any]] = Field(default_factory=list)
    predictions: list[dict[str, Any]] = Field(default_factory=list)


class PredictRequest(_Lenient):
    tasks: list[Task] = Field(min_length=1)
    project: str | None = None
    label_config: str | None = None
    params: Params | None = None


class SetupRequest(_Lenient):
    project: str | None = None
    label_config: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    extra_params: dict[str, Any] | None = None


def parse_body(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body against `model`; a mismatch is a 422 naming the first bad fields."""
    if not isinstance(body, dict):
        raise ProtocolError(422, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])[:80] or '<body>'}: {err['msg'][:200]}" for err in e.errors()[:5]
        )
        raise ProtocolError(422, f"invalid {model.__name__}: {problems}") from None
    except (TypeError, OverflowError, RecursionError) as e:  # raised by a validator on a value it did not expect
        raise ProtocolError(422, f"invalid {model.__name__}: a value could not be read ({type(e).__name__})") from None


def quoted(text: str) -> str:
    """A client's string for an error message: its repr, cut to MAX_QUOTED_CHARS characters."""
    return repr(text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "...")


def project_id(project: str | None) -> str | None:
    """Label Studio sends `project` as '<id>.<created timestamp>'; the id is the part before the dot."""
    if not project:
        return None
    return str(project).split(".", 1)[0]


# --------------------------------------------------------------------------------------------------
# Labelling config


@dataclass(frozen=True)
class ControlTag:
    """One control tag of the labelling config (BrushLabels, KeyPointLabels or RectangleLabels).

    A `<Label value="Object" alias="o"/>` is known by both names: Label Studio's editor writes the alias into the
    results it saves and sends (and accepts either when it reads them), so an incoming label may be either;
    `labels` holds the values (the canonical names), `aliases` each one's alias (None: none)."""

    name: str
    type: str  # lower-case tag name, e.g. "brushlabels"
    to_name: str
    labels: tuple[str, ...]
    aliases: tuple[str | None, ...] = ()  # parallel to `labels` (empty: no Label has an alias)

    def _named(self) -> list[tuple[str, str | None]]:
        return [(v, self.aliases[n] if n < len(self.aliases) else None) for n, v in enumerate(self.labels)]

    @cached_property
    def _index(self) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[str, ...]]]:
        """(name -> value of the first Label it names, value -> how it is shown, value -> all its names), built
        once per tag: a lookup per prompt item must not walk a config's (maybe tens of thousands of) labels."""
        value_of: dict[str, str] = {}
        shown: dict[str, str] = {}
        names: dict[str, dict[str, None]] = {}
        for v, alias in self._named():
            value_of.setdefault(v, v)
            if alias:
                value_of.setdefault(alias, v)
            shown.setdefault(v, alias or v)
            names.setdefault(v, {}).update(dict.fromkeys(n for n in (v, alias) if n))
        return value_of, shown, {v: tuple(n) for v, n in names.items()}

    def canonical(self, label: str) -> str | None:
        """The value of this tag's first Label named `label` by its value or its alias (as Label Studio's
        findLabel matches), else None."""
        return self._index[0].get(label)

    def shown(self, value: str) -> str:
        """How Label Studio writes the Label of value `value` in a result: its alias when it has one."""
        return self._index[1].get(value, value)

    def names(self, label: str) -> tuple[str, ...]:
        """Every name (value, alias) of the Label that `label` names here; just `label` when none does."""
        value = self.canonical(label)
        if value is None:
            return (label,)
        return self._index[2][value]

    def listed(self, limit: int = MAX_LISTED_LABELS) -> str:
        """The labels for an error message: the first `limit` values, each with its alias when it has one, and
        how many more there are (never the whole list: a refusal per prompt item must stay short)."""
        aliases = self.aliases[:limit]
        shown = [f"{v} (alias {aliases[n]})" if n < len(aliases) and aliases[n] else v
                 for n, v in enumerate(self.labels[:limit])]
        more = len(self.labels) - limit
        return f"{shown}" + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class LabelConfig:
    """What the backend needs from a labelling config: images, the mask outputs and the prompt tools."""

    images: dict[str, str]  # Image tag name -> task data key (value="$image" -> "image")
    brushes: dict[str, ControlTag]  # Image tag name -> its BrushLabels tag
    prompts: dict[str, ControlTag] = field(default_factory=dict)  # tag name -> KeyPoint/Rectangle labels
    polygons: dict[str, ControlTag] = field(default_factory=dict)  # Image tag name -> its PolygonLabels tag
    # every BrushLabels and PolygonLabels tag in document order: an image may have several of one kind, of
    # which `brushes`/`polygons` keep the last; a bulk job picks among all of them (or refuses to guess)
    outputs: tuple[ControlTag, ...] = ()

    def outputs_of(self, kind: str) -> list[ControlTag]:
        """Every output tag of `kind` ("brushlabels" or "polygonlabels"), in document order."""
        return [t for t in self.outputs if t.type == kind]

    def output_for(self, to_name: str | None, label: str) -> ControlTag:
        """The tag a mask labelled `label` on image `to_name` is returned in: the image's first PolygonLabels tag
        with that label, else its first BrushLabels tag with it (the only image when `to_name` is None). An
        image may have several tags of one kind (people and cars); the label picks among them."""
        if to_name is None:
            names = set(self.brushes) | set(self.polygons)
            if len(names) != 1:
                raise ProtocolError(422, "prompt has no to_name and the label config has several output images")
            to_name = names.pop()
        for kind in ("polygonlabels", "brushlabels"):
            for tag in self.outputs:
                if tag.type == kind and tag.to_name == to_name and tag.canonical(label) is not None:
                    return tag
        polygon = self.polygons.get(to_name)
        if polygon is not None and to_name not in self.brushes:
            raise ProtocolError(
                422, f"label {quoted(label)} is not one of the PolygonLabels {quoted(polygon.name)} labels "
                     f"{polygon.listed()}")
        brush = self.brush_for(to_name)
        if brush.canonical(label) is None:
            raise ProtocolError(
                422, f"label {quoted(label)} is not one of the BrushLabels {quoted(brush.name)} labels "
                     f"{brush.listed()}"
            )
        return brush

    def canonical_label(self, label: str, from_name: str | None) -> str:
        """An incoming label as its Label's value in the prompt tag `from_name` (an alias there is the same
        label as the value elsewhere); unchanged when that tag is unknown or has no such Label."""
        tag = self.prompts.get(from_name) if from_name is not None else None
        value = tag.canonical(label) if tag is not None else None
        return label if value is None else value

    def brush_for(self, to_name: str | None) -> ControlTag:
        """The BrushLabels tag that receives masks for the image `to_name` (the only image when None)."""
        if to_name is None:
            if len(self.brushes) != 1:
                raise ProtocolError(422, "prompt has no to_name and the label config has several BrushLabels")
            return next(iter(self.brushes.values()))
        try:
            return self.brushes[to_name]
        except KeyError:
            raise ProtocolError(
                422, f"label config has no BrushLabels with toName={to_name!r}; masks cannot be returned"
            ) from None

    def image_key(self, to_name: str) -> str:
        """Task data key holding the image of the Image tag `to_name`."""
        try:
            return self.images[to_name]
        except KeyError:
            raise ProtocolError(422, f"label config has no Image tag named {to_name!r}") from None


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a Label Studio labelling config; errors name what is missing (422)."""
    if not xml or not xml.strip():
        raise ProtocolError(422, "label config is empty")
    if len(xml) > MAX_LABEL_CONFIG_CHARS:
        raise ProtocolError(413, f"label config is longer than {MAX_LABEL_CONFIG_CHARS} characters")
    if "<!DOCTYPE" in xml.upper() or "<!ENTITY" in xml.upper():
        raise ProtocolError(422, "label config must not contain DOCTYPE or ENTITY declarations")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise ProtocolError(422, f"label config is not valid XML: {e}") from None
    images: dict[str, str] = {}
    outputs: dict[str, dict[str, ControlTag]] = {"brushlabels": {}, "polygonlabels": {}}
    every_output: list[ControlTag] = []
    prompts: dict[str, ControlTag] = {}
    for el in root.iter():
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        name = el.get("name")
        if tag == "image" and name:
            images[name] = (el.get("value") or "").lstrip("$")
        elif tag in (*outputs, *PROMPT_TYPES) and name:
            to_name = el.get("toName") or el.get("toname") or ""
            found = [lab for lab in el if isinstance(lab.tag, str) and lab.tag.lower() == "label"
                     and lab.get("value") is not None]
            aliases = tuple(lab.get("alias") or None for lab in found)
            ctl = ControlTag(name, tag, to_name, tuple(lab.get("value") for lab in found),
                             aliases if any(aliases) else ())
            if tag in outputs:
                outputs[tag][to_name] = ctl
                every_output.append(ctl)
            else:
                prompts[name] = ctl
    if not images:
        raise ProtocolError(422, "label config has no <Image> tag")
    if not any(outputs.values()):
        raise ProtocolError(422, "label config has no <BrushLabels> (or <PolygonLabels>) tag to receive the masks")
    for ctl in every_output:
        if ctl.to_name not in images:
            title = "BrushLabels" if ctl.type == "brushlabels" else "PolygonLabels"
            raise ProtocolError(422, f"<{title} toName={ctl.to_name!r}> points at no <Image> tag")
    return LabelConfig(images, outputs["brushlabels"], prompts, outputs["polygonlabels"], tuple(every_output))


# --------------------------------------------------------------------------------------------------
# Task data: which image a prompt is on

IMAGE_ID_KEY = "image_id"
MAX_IMAGE_ID_CHARS = 1024
MAX_IMAGE_REF_CHARS = 4096


def image_id_keys(config: LabelConfig, image_name: str) -> tuple[str, ...]:
    """The task data keys that may hold the feature-table id of the Image tag `image_name`, best first:
    `image_id_<name>`, then `image_id` only when the config has that one Image tag (with several, which image a
    plain `image_id` names is unknown, so it is never used: a click on one image must not be served from
    another image's features)."""
    keys = [f"{IMAGE_ID_KEY}_{image_name}"]
    if list(config.images) == [image_name]:
        keys.append(IMAGE_ID_KEY)
    return tuple(keys)


def task_image(data: dict[str, Any], config: LabelConfig, image_name: str,
               task: str = "task") -> tuple[str | None, str | None]:
    """(feature-table id, image URL/path) of the Image tag `image_name` in a task's `data`: the id from
    `image_id_keys` (None when the task gives none), the reference from the tag's own data key (None when
    absent). The one identity rule of the interactive, batch and bulk paths. A wrongly typed or overlong
    value, or a task giving neither, is a 422 naming the key (and `task`, e.g. "task 7")."""
    ref_key = config.image_key(image_name)
    id_key = next((k for k in image_id_keys(config, image_name) if data.get(k) not in (None, "")), None)
    image_id = data.get(id_key) if id_key is not None else None
    image_ref = data.get(ref_key)
    if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, (str, int))):
        raise ProtocolError(422, f"task data {id_key} must be a string, got {type(image_id).__name__}")
    if image_ref is not None and not isinstance(image_ref, str):
        raise ProtocolError(422, f"task data {ref_key} (the image) must be a URL or path string")
    if image_id is not None and len(str(image_id)) > MAX_IMAGE_ID_CHARS:
        raise ProtocolError(422, f"task data {id_key} is longer than {MAX_IMAGE_ID_CHARS} characters")
    if image_ref is not None and len(image_ref) > MAX_IMAGE_REF_CHARS:
        raise ProtocolError(422, f"task image reference is longer than {MAX_IMAGE_REF_CHARS} characters")
    if image_id is None and not image_ref:
        ids = " nor data.".join(image_id_keys(config, image_name)[::-1])
        raise ProtocolError(422, f"{task} has neither data.{ids} nor data.{ref_key}")
    return (str(image_id) if image_id is not None else None), (image_ref or None)


# --------------------------------------------------------------------------------------------------
# Prompts: context items -> clicks in original-image pixels


@dataclass(frozen=True)
class Prompt:
    """Everything one interactive call asks for: the clicks of one region, its label and where it goes."""

    clicks: tuple[Click, ...]
    label: str
    brush_name: str  # from_name of the result
    image_name: str  # to_name of the result
    original_size: tuple[int, int]  # (H, W) in pixels, as Label Studio knows the image
    box: Roi | None = None  # (left, up, right, bottom) region of a box prompt, exclusive right/bottom
    region_key: str = ""
    output_type: str = "brushlabels"  # the type of `brush_name`'s tag: "brushlabels" or "polygonlabels"
    label_names: tuple[str, ...] = ()  # every name (value, alias) of `label` in the output tag; () = just `label`

    @property
    def names(self) -> tuple[str, ...]:
        """The names a region of this prompt's label may carry (Label Studio writes the alias or the value)."""
        return self.label_names or (self.label,)

    @property
    def has_positive(self) -> bool:
        return any(c.positive for c in self.clicks)


def percent_to_pixel(pct: float, size: int, what: str) -> int:
    """A percent coordinate (0-100) of an axis of `size` pixels -> the pixel index it falls in."""
    if not box_prompt.is_finite_number(pct):
        raise ProtocolError(422, f"{what} must be a number in percent, got {box_prompt.shown(pct)}")
    if pct < 0 or pct > 100:
        raise ProtocolError(422, f"{what} = {box_prompt.shown(pct)} is outside the image (0-100 percent)")
    return min(int(math.floor(pct * size / 100.0)), size - 1)


def box_to_click(value: dict[str, Any], size: tuple[int, int]) -> tuple[Click, Roi]:
    """The shared box rule (`pipeline.box_prompt.box_to_click`), a bad rectangle answered with 422."""
    try:
        return box_prompt.box_to_click(value, size)
    except box_prompt.BoxPromptError as e:
        raise ProtocolError(422, str(e)) from None


def _item_label(item: ContextItem) -> str:
    labels = item.value.get(item.type)
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise ProtocolError(422, f"{item.type} item {item.id!r} has no label in value.{item.type}")
    return labels[0]


def item_label(item: ContextItem, config: LabelConfig) -> str:
    """An item's label as its Label's value (`LabelConfig.canonical_label`): an alias and its value are one label."""
    return config.canonical_label(_item_label(item), item.from_name)


def prompt_from_items(items: list[ContextItem], config: LabelConfig) -> Prompt:
    """Turn the prompt regions of one call into a `Prompt`.

    Keypoints keep their order; the last rectangle (if any) becomes the first click and the region.
    The label is that of the last item (as in Label Studio's SAM examples) and must be one of the
    output tag's labels (by value or alias), since the mask is returned under it: under the output tag's
    alias of it when it has one, as Label Studio itself writes it, else its value.
    """
    items = [it for it in items if it.type in PROMPT_TYPES]
    if not items:
        raise ProtocolError(422, f"context has no {' or '.join(PROMPT_TYPES)} item")
    if len(items) > MAX_CLICKS:
        raise ProtocolError(413, f"context has {len(items)} prompt items; at most {MAX_CLICKS} are served")
    sizes = {(it.original_height, it.original_width) for it in items}
    if len(sizes) != 1:
        raise ProtocolError(422, f"context items disagree on the original image size: {sorted(sizes)}")
    size = sizes.pop()
    to_names = {it.to_name for it in items if it.to_name is not None}
    if len(to_names) > 1:
        raise ProtocolError(422, f"context items point at several images: {sorted(to_names)}")
    to_name = to_names.pop() if to_names else None
    for it in items:
        if it.image_rotation:
            raise ProtocolError(422, f"rotated images are not supported (image_rotation={it.image_rotation})")
        if it.from_name is not None and it.from_name in config.prompts:
            if config.prompts[it.from_name].type != it.type:
                raise ProtocolError(422, f"item from {it.from_name!r} has type {it.type}, tag is another type")
        config.output_for(to_name, item_label(it, config))  # every label must have a tag to be returned in
    output = config.output_for(to_name, item_label(items[-1], config))
    value = output.canonical(item_label(items[-1], config)) or item_label(items[-1], config)
    keypoints: list[Click] = []
    box_click: Click | None = None
    region: Roi | None = None
    key_item: ContextItem | None = None
    for it in items:
        if it.type == "keypointlabels":
            for k in ("x", "y"):
                if k not in it.value:
                    raise ProtocolError(422, f"keypoint {it.id!r} has no value.{k}")
            positive = True if it.is_positive is None else bool(it.is_positive)
            keypoints.append(Click(
                row=percent_to_pixel(it.value["y"], size[0], "keypoint y"),
                col=percent_to_pixel(it.value["x"], size[1], "keypoint x"),
                positive=positive,
            ))
            key_item = key_item or it
        else:
            box_click, region = box_to_click(it.value, size)
            key_item = it
    clicks = tuple(([box_click] if box_click else []) + keypoints)
    return Prompt(
        clicks=clicks,
        label=output.shown(value),
        brush_name=output.name,
        image_name=output.to_name,
        original_size=size,
        box=region,
        region_key=region_key(key_item, clicks),
        output_type=output.type,
        label_names=output.names(value),
    )


def region_key(first: ContextItem | None, clicks: tuple[Click, ...]) -> str:
    """Key of the region being drawn: the id of its first prompt item (stable while clicks are added). An id
    over MAX_REGION_ID_CHARS is kept as its start and a digest of the whole, so that the key (logged, and a
    session's key) stays short and still tells regions apart."""
    if first is not None and first.id:
        rid = first.id
        if len(rid) > MAX_REGION_ID_CHARS:
            digest = hashlib.sha256(rid.encode("utf-8", "surrogatepass")).hexdigest()[:32]
            rid = f"{rid[:MAX_REGION_ID_CHARS - 33]}~{digest}"
        return f"id:{rid}"
    if clicks:
        c = clicks[0]
        return f"click:{c.row},{c.col},{int(c.positive)}"
    return "empty"


def stored_objects(items: list[ContextItem], config: LabelConfig) -> list[list[ContextItem]]:
    """Group saved prompt regions into objects: each rectangle with the keypoints of its image and label inside it
    (the smallest such rectangle takes a keypoint), then the other keypoints, one group per (image, label)
    (Label Studio saves each click as its own keypoint region). No rectangle is ever merged into another's
    object, and no group mixes images: a label used on two images is two objects. Labels compare by value
    (`item_label`), so an alias and its value are one label. A rectangle the box rule refuses (rotated,
    outside, degenerate) stays its own object, refused alone, and holds no keypoint: those stay an object of
    their own, as in bulk pre-annotation."""
    keys = {id(it): (it.to_name, item_label(it, config)) for it in items
            if it.type in ("keypointlabels", "rectanglelabels")}  # each item's label read once
    boxes = [it for it in items if it.type == "rectanglelabels"]
    objects: list[list[ContextItem]] = [[b] for b in boxes]
    holders: dict[tuple[str | None, str], tuple[list[int], list[_Bounds]]] = {}  # by (image, label): O(K + B)
    for n, b in enumerate(boxes):
        if _box_usable(b):
            same, bounds = holders.setdefault(keys[id(b)], ([], []))
            same.append(n)
            bounds.append(_box_bounds(b.value))
    loose: dict[tuple[str | None, str], list[ContextItem]] = {}
    for it in items:
        if it.type != "keypointlabels":
            continue
        same, bounds = holders.get(keys[id(it)], ((), ()))
        held_by = _holding(bounds, it.value)
        if held_by is not None:
            objects[same[held_by]].append(it)
        else:
            loose.setdefault(keys[id(it)], []).append(it)
    return objects + list(loose.values())


def _box_usable(box: ContextItem) -> bool:
    """Whether the shared box rule takes this rectangle as a prompt (the same test bulk pre-annotation makes)."""
    try:
        box_prompt.box_to_click(box.value, (box.original_height, box.original_width))
    except box_prompt.BoxPromptError:
        return False
    return True


_Bounds = tuple[float, float, float, float, float] | None  # (left, top, right, bottom, area); None: holds nothing


def holding_box(boxes: list[dict[str, Any]], point: dict[str, Any]) -> int | None:
    """The index of the smallest of `boxes` (rectangle values: percent x, y, width, height) that holds a
    keypoint value (percent x, y), edges included, the first of equal ones; None when none does. The one
    rule by which the backend's batch path (`stored_objects`) and bulk pre-annotation
    (`label_studio_prompts.task_prompts`) add a keypoint to a rectangle's object: the DRAWN rectangle, never
    the box grown for the model's zoom-in region."""
    return _holding([_box_bounds(b) for b in boxes], point)


def _box_bounds(box: dict[str, Any]) -> _Bounds:
    """A rectangle value's edges and area as floats, read once (None when they are not numbers)."""
    try:
        left, top, width, height = float(box["x"]), float(box["y"]), float(box["width"]), float(box["height"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return left, top, left + width, top + height, width * height


def _holding(bounds: list[_Bounds] | tuple[()], point: dict[str, Any]) -> int | None:
    """`holding_box` over rectangles already read by `_box_bounds`."""
    try:
        x, y = float(point["x"]), float(point["y"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    best, best_area = None, 0.0
    for n, b in enumerate(bounds):
        if b is not None and b[0] <= x <= b[2] and b[1] <= y <= b[3] and (best is None or b[4] < best_area):
            best, best_area = n, b[4]
    return best


def stored_prompts(task: Task, config: LabelConfig) -> tuple[list[Prompt], list[str]]:
    """Prompts from keypoints/boxes saved in a task's newest annotation or draft: one per object
    (`stored_objects`), and why each object that cannot be one was refused (the others still are prompts).

    Used by batch predictions (no context): a task whose annotators left smart keypoints or boxes gets masks
    for them; a task without any gets none.
    """
    prompts: list[Prompt] = []
    refused: list[str] = []
    items = []
    for r in stored_prompt_items(task):
        try:
            item = parse_body(ContextItem, r)
            _item_label(item)
            items.append(item)
        except ProtocolError as e:
            refused.append(e.message)
    for group in stored_objects(items, config):
        try:
            prompt = prompt_from_items(group, config)
        except ProtocolError as e:
            refused.append(e.message)
            continue
        if prompt.box is None and not any(c.positive for c in prompt.clicks):  # as bulk pre-annotation
            refused.append(f"{prompt.label!r} has only negative keypoints: nothing to segment")
        else:
            prompts.append(prompt)
    return prompts, refused


def stored_prompt_items(task: Task) -> list[dict[str, Any]]:
    """The saved prompt regions (keypoints, rectangles) of a task's newest annotation or draft that has any:
    what `stored_prompts` makes its prompts of (counted first to bound a batch request's work)."""
    candidates = [a for a in (task.annotations + task.drafts) if isinstance(a, dict) and a.get("result")]
    for ann in sorted(candidates, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""), reverse=True):
        raw = [r for r in ann["result"] if isinstance(r, dict) and r.get("type") in PROMPT_TYPES]
        if raw:
            return raw
    return []


# --------------------------------------------------------------------------------------------------
# Responses


def brush_result(
    rle: list[int], prompt: Prompt, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """One `brushlabels` region at the original image size, labelled with the prompt's label."""
    h, w = prompt.original_size
    return {
        "id": region_id or uuid.uuid4().hex[:10],
        "from_name": prompt.brush_name,
        "to_name": prompt.image_name,
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "readonly": False,
        "value": {"format": "rle", "rle": rle, "brushlabels": [prompt.label]},
        "score": float(score),
    }


def polygon_results(polygons: list[list[list[float]]], prompt: Prompt, score: float,
                    region_id: str | None = None) -> list[dict[str, Any]]:
    """`polygonlabels` regions (one per polygon: points in percent of the width/height), labelled with the
    prompt's label; a mask with several parts gives several regions (ids `<region_id>-<n>` when given)."""
    h, w = prompt.original_size
    out = []
    for n, points in enumerate(polygons):
        out.append({
            "id": f"{region_id}-{n}" if region_id else uuid.uuid4().hex[:10],
            "from_name": prompt.brush_name,
            "to_name": prompt.image_name,
            "type": "polygonlabels",
            "original_width": w,
            "original_height": h,
            "image_rotation": 0,
            "readonly": False,
            "value": {"points": points, "polygonlabels": [prompt.label], "closed": True},
            "score": float(score),
        })
    return out


def mask_results(prompt: Prompt, score: float, rle: list[int] | None = None,
                 polygons: list[list[list[float]]] | None = None, region_id: str | None = None) -> list[dict[str, Any]]:
    """The regions answering a prompt in its output tag's form: one brush region, or its polygons."""
    if prompt.output_type == "polygonlabels":
        return polygon_results(polygons or [], prompt, score, region_id)
    return [brush_result(rle or [], prompt, score, region_id)]


def prediction(results: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """One task's prediction; its score is the mean of its regions' scores (0 when empty)."""
    score = sum(r["score"] for r in results) / len(results) if results else 0.0
    return {"result": results, "score": float(score), "model_version": model_version}
