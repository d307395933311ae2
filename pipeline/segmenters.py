"""What clicks are evaluated against: a picklable description (`SegmenterSpec`) that each Ray worker builds.

Kinds: "grabcut" (the OpenCV baseline), "checkpoint" (InterFormer weights from a file), "random" (a
randomly initialised variant, seeded so that every worker builds the same weights). Model sessions are
wrapped so that the evaluation loop sees `canvas_size` and times image encoding apart from clicks; with a
feature table the stored features are read instead of running the image encoder. Model sessions run
without the demo's zoom-in unless asked (`zoom_in`): the released evaluation (clicktest) has none.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .baselines import GrabCutBaseline, GrabCutConfig

KINDS = ("grabcut", "checkpoint", "random")


@dataclass(frozen=True)
class SegmenterSpec:
    """kind: one of KINDS; checkpoint: weights file (kind "checkpoint"); variant: model variant (required for
    "random", optional for "checkpoint"); device: torch device (None: CUDA when available); seed: torch seed
    for random weights; max_side: the predictor's longest-side resize (None: native size, as in the papers);
    feature_db / feature_table: LanceDB root and table of stored features to read instead of encoding
    (models only); feature_id_prefix: prepended to a sample's image id to find its row; grabcut: baseline
    settings; engine / engine_cache / engine_max_sizes: the click engine (interformer.click_engine.ENGINES;
    torch is the exact fp32 reference), its cache folder and its compiled sizes held at once (None: the
    default); checkpoint_sha256: the checkpoint's content (`pinned`), which `build` then insists on;
    zoom_in: the demo's feature zoom-in of the refine stages (spec §4.4) in every session (default off, as the
    released clicktest; it changes the results of refine-stage variants such as tiny only)."""

    kind: str
    checkpoint: str | None = None
    variant: str | None = None
    device: str | None = None
    seed: int = 0
    max_side: int | None = None
    feature_db: str | None = None
    feature_table: str = "features"
    feature_id_prefix: str = ""
    grabcut: GrabCutConfig = field(default_factory=GrabCutConfig)
    engine: str = "torch"
    engine_cache: str | None = None
    engine_max_sizes: int | None = None
    checkpoint_sha256: str | None = None
    zoom_in: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown segmenter kind {self.kind!r}; choose one of {KINDS}")
        if self.kind == "checkpoint" and not self.checkpoint:
            raise ValueError("a checkpoint path is required")
        if self.kind == "checkpoint" and not Path(self.checkpoint).is_file():
            raise ValueError(f"checkpoint file {self.checkpoint} does not exist")
        if self.kind == "random" and not self.variant:
            raise ValueError("a model variant is required for random initialisation")
        if self.kind == "grabcut" and self.feature_db:
            raise ValueError("the GrabCut baseline does not use stored features")
        if self.kind == "grabcut" and self.zoom_in:
            raise ValueError("the GrabCut baseline has no zoom-in (it is a model option)")
        self.engine_config  # an unknown engine name fails here, in the driver, not in every worker

    @property
    def default_name(self) -> str:
        if self.kind == "grabcut":
            return "grabcut"
        name = f"random-{self.variant}" if self.kind == "random" else Path(self.checkpoint).stem
        return name + ("-zoomin" if self.zoom_in else "")

    @property
    def engine_config(self) -> Any:
        from interformer.click_engine import ClickEngineConfig

        extra = {} if self.engine_max_sizes is None else {"max_sizes": self.engine_max_sizes}
        return ClickEngineConfig(self.engine, cache_dir=self.engine_cache, **extra)

    def pinned(self) -> "SegmenterSpec":
        """This spec with the checkpoint's sha256 filled in (unchanged for other kinds or when already set):
        the weights by content, not by path, so that a rerun after the file was replaced is told apart."""
        if self.kind != "checkpoint" or self.checkpoint_sha256:
            return self
        from interformer.checkpoint import file_sha256

        return replace(self, checkpoint_sha256=file_sha256(self.checkpoint))

    def to_dict(self) -> dict[str, Any]:
        """What decides the results: the weights (a checkpoint by content: the spec is pinned first), not the
        cache folder; the default torch engine is left out so that runs recorded before engines existed
        still match. `zoom_in` is recorded for every model that may have refine stages (a checkpoint of
        unknown variant included): runs recorded before it existed used the zoom-in, so they do not match a
        run without it. For the baseline and variants without refine stages it changes nothing and is left
        out."""
        d = asdict(self.pinned())
        if not self._zoom_in_matters():
            d.pop("zoom_in")
        d.pop("engine_cache")
        d.pop("engine_max_sizes")  # memory, not results: an evicted size is compiled again from the same IR
        if d["engine"] == "torch":
            d.pop("engine")
        if d["checkpoint_sha256"] is None:
            d.pop("checkpoint_sha256")
        return d

    def _zoom_in_matters(self) -> bool:
        if self.kind == "grabcut":
            return False
        from interformer.config import CONFIGS

        config = CONFIGS.get(self.variant) if self.variant else None
        return config is None or any(d > 0 for d in config.imsa.refine_depths)

    def _check_pinned_checkpoint(self) -> None:
        from interformer.checkpoint import file_sha256

        if self.checkpoint_sha256 and file_sha256(self.checkpoint) != self.checkpoint_sha256:
            raise ValueError(f"checkpoint {self.checkpoint} changed after the run started (its sha256 is no longer "
                             f"{self.checkpoint_sha256}); run again to evaluate the new weights")

    def build(self) -> Any:
        """The segmenter object (`start(image, image_id)`): call once per worker."""
        if self.kind == "grabcut":
            return GrabCutBaseline(self.grabcut)
        import torch

        from interformer.checkpoint import load_model
        from interformer.config import PreprocessConfig
        from interformer.predictor import Predictor

        self._check_pinned_checkpoint()
        torch.manual_seed(self.seed)
        model = load_model(self.checkpoint if self.kind == "checkpoint" else None, variant=self.variant, device=self.device)
        predictor = Predictor(model, PreprocessConfig(max_side=self.max_side), device=self.device,
                              engine=self.engine_config)
        reader = None
        if self.feature_db:
            from .feature_store import FeatureReader

            reader = FeatureReader(self.feature_db, predictor.fingerprint, table=self.feature_table)
        return ModelSegmenter(predictor, reader, self.feature_id_prefix, zoom_in=self.zoom_in)


class ModelSession:
    """An InterFormer session plus the padded canvas size its `padded_mask` lives on."""

    def __init__(self, session: Any, geometry: Any) -> None:
        self._session = session
        self._geometry = geometry

    @property
    def canvas_size(self) -> tuple[int, int]:
        if self._geometry.resized:
            raise ValueError(
                "the InterFormer protocol needs images at native size; this predictor resizes them (max_side)"
            )
        return tuple(self._geometry.padded_size)

    def add_click(self, row: int, col: int, positive: bool) -> Any:
        return self._session.add_click(row, col, positive=positive)

    def repredict(self) -> Any:
        """The network run again on the current state, no new click (the InterFormer protocol's step when its
        simulator has nothing to click)."""
        return self._session.repredict()


class ModelSegmenter:
    """Open InterFormer sessions on images, encoding them or reading their stored features; `zoom_in`: the
    demo's zoom-in in every session (default off: the released evaluation has none)."""

    def __init__(self, predictor: Any, reader: Any = None, id_prefix: str = "", zoom_in: bool = False) -> None:
        self.predictor = predictor
        self.reader = reader
        self.id_prefix = id_prefix
        self.zoom_in = zoom_in

    def start(self, image: np.ndarray, image_id: str | None = None, allow_padding: bool = False) -> ModelSession:
        """A session on `image`; with a feature reader its stored features (by `image_id`) are used instead.
        `allow_padding`: the session also takes clicks in the padding of the canvas (InterFormer protocol)."""
        if self.reader is not None:
            if image_id is None:
                raise ValueError("reading stored features needs the image id")
            feats = self.reader.get(self.id_prefix + image_id)
        else:
            feats = self.predictor.encode(image)
        session = self.predictor.session(feats, zoom_in=self.zoom_in, allow_padding=allow_padding)
        return ModelSession(session, feats.geometry)
