"""`TrainConfig`: every setting of a training run, in one dataclass that the command line is built from.

The nested configs (optimiser, augmentation, click simulation, loss) live next to the code that uses them;
`jobs/train.py` turns every field into an option (`--crop-size`, `--lr`, ...) with the field's help text.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..cli_types import COUNT, SEED, integer, range_problems
from ..config import get_config
from .augment import AugmentConfig
from .click_sampler import ClickSimConfig
from .data import DataSpec
from .losses import LossConfig
from .optim import OptimConfig


EVAL_PROTOCOLS = ("ritm", "interformer")  # pipeline.evaluation.PROTOCOLS (a test keeps them equal)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = field(metadata={"help": "run folder: checkpoints/, log.csv, config.json; rerunning resumes"})
    data: tuple[DataSpec, ...] = field(metadata={"help": "training data, repeatable: " + " | ".join(
        ["coco:ANN.json,images=DIR", "lvis:ANN.json,images=DIR", "panoptic:ANN.json,images=DIR,masks=PNG_DIR",
         "labelstudio:EXPORT.json,images=DIR[,key=FIELD]", "folder:IMAGE_DIR,masks=MASK_DIR[,format=binary|instances]"])})
    variant: str = field(default="small", metadata={"help": "model variant (light, tiny, small, small_refine)"})
    init: str | None = field(default=None, metadata={
        "help": "start from this file: an official or our InterFormer checkpoint, or plain MAE/timm ViT weights "
                "(backbone only); default: random init"})
    max_iters: int = field(default=320_000, metadata={"range": COUNT, "help": "length of the schedule in iterations"})
    stop_at: int | None = field(default=None, metadata={"range": COUNT,
        "help": "stop after this iteration (with a checkpoint) but keep the max_iters schedule; rerun to go on"})
    batch_size: int = field(default=4, metadata={"range": COUNT,
        "help": "samples per iteration per worker (official: 4 x 4 GPUs)"})
    num_workers: int = field(default=1, metadata={"range": COUNT,
        "help": "Ray Train workers (one GPU each on a GPU cluster)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "train on GPUs; default: when the cluster has any"})
    cpus_per_worker: int = field(default=1, metadata={"range": COUNT,
        "help": "CPUs (and torch threads) per Ray Train worker"})
    loader_workers: int = field(default=2, metadata={"range": integer(0),
        "help": "data-loading processes per worker (0: in the worker)"})
    seed: int = field(default=42, metadata={"range": SEED,
        "help": "seed of every random choice (data order, crops, clicks)"})
    deterministic: bool = field(default=False, metadata={
        "help": "bit-identical runs: one torch thread per worker and torch's deterministic algorithms (slower on "
                "multi-core CPUs); without it a resumed run equals an uninterrupted one only with 1 CPU per worker"})
    frozen_backbone: bool = field(default=False, metadata={
        "help": "train only I-MSA and the heads; the ViT + SimpleFPN stay fixed"})
    freeze_bn: bool = field(default=False, metadata={
        "help": "keep the heads' BatchNorm statistics fixed (for tiny batches; a 1-sample batch always does)"})
    features: str | None = field(default=None, metadata={
        "help": "with --frozen-backbone: LanceDB feature table (folder) to read the pyramids from instead of "
                "running the ViT; its fingerprint must match the model"})
    features_table: str = field(default="features", metadata={"help": "table name inside the --features database"})
    features_fingerprint: str | None = field(default=None, metadata={
        "help": "encoder fingerprint of the stored features; default: the model's own (variant, weights, "
                "default preprocessing)"})
    checkpoint_interval: int = field(default=20_000, metadata={"range": COUNT,
        "help": "save a checkpoint every N iterations, at the end of the session and before every evaluation"})
    keep_checkpoints: int = field(default=0, metadata={"range": integer(0),
        "help": "keep only the newest N checkpoints (0: keep all)"})
    log_interval: int = field(default=50, metadata={"range": COUNT,
        "help": "write a log.csv row every N iterations (averages)"})
    eval_data: str | None = field(default=None, metadata={
        "help": "held-out set for NoC evaluation: a benchmark name (grabcut, berkeley, davis), folder or COCO json"})
    eval_data_root: str | None = field(default=None, metadata={
        "help": "folder holding GrabCut/, Berkeley/, DAVIS/ for benchmark names; default: the shared/data beside "
                "the project checkout, whatever the current folder (as interformer-evaluate --data-root)"})
    eval_interval: int = field(default=0, metadata={"range": integer(0),
        "help": "evaluate NoC every N iterations (0: never)"})
    eval_max_samples: int | None = field(default=None, metadata={"range": COUNT,
        "help": "evaluate on the first N samples only"})
    eval_protocol: str = field(default="interformer", metadata={
        "help": "evaluation protocol: interformer (clicks and IoU on the padded canvas, as the paper) or ritm"})
    eval_clicks: int = field(default=20, metadata={"range": COUNT, "help": "clicks per evaluated sample"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    clicks: ClickSimConfig = field(default_factory=ClickSimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        get_config(self.variant)
        problems = []
        if not self.data:
            problems.append("at least one --data source is required")
        problems += range_problems(self)
        if self.stop_at is not None and not 1 <= self.stop_at <= self.max_iters:
            problems.append(f"stop_at must be in 1..max_iters={self.max_iters}, got {self.stop_at}")
        if self.augment.crop_size % 32 or self.augment.crop_size < 32:
            problems.append(f"crop_size must be a positive multiple of 32, got {self.augment.crop_size}")
        if self.features and not self.frozen_backbone:
            problems.append("--features needs --frozen-backbone (stored features come from a fixed ViT)")
        if self.eval_protocol not in EVAL_PROTOCOLS:
            problems.append(f"eval_protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {self.eval_protocol!r}")
        if self.eval_interval and not self.eval_data:
            problems.append("--eval-interval needs --eval-data")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def with_absolute_paths(self) -> "TrainConfig":
        """Paths resolved against the current folder, so that Ray workers elsewhere find the same files."""
        def fix(p: str | None) -> str | None:
            return None if p is None or "://" in p else str(Path(p).expanduser().resolve())

        eval_data = self.eval_data
        if eval_data is not None and Path(eval_data).exists():
            eval_data = fix(eval_data)
        return replace(self, out_dir=fix(self.out_dir), data=tuple(d.absolute() for d in self.data),
                       init=fix(self.init), features=fix(self.features), eval_data=eval_data,
                       eval_data_root=fix(self.eval_data_root))

    @property
    def last_iter(self) -> int:
        """The iteration this invocation stops after."""
        return self.stop_at if self.stop_at is not None else self.max_iters

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = [str(s) for s in self.data]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


SCHEDULE_FIELDS = ("max_iters", "batch_size", "num_workers", "seed", "variant", "frozen_backbone", "optim")
