"""A training run with the pipeline's parts: held-out NoC with the evaluation code, samples from the feature table.

The loop and its Ray Train launch live in `interformer.training`; this module gives them the pieces that
belong to the pipeline (`PIPELINE_HOOKS`), resolves the held-out set with the same data-root rule as
`interformer-evaluate` (`pipeline.datasets.default_data_root`, whatever the current folder), and joins or
starts Ray like every other job.
"""
from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from interformer.training.config import SCHEDULE_FIELDS, TrainConfig
from interformer.training.data import TrainSource, check_source
from interformer.training.init import check_init
from interformer.training.launch import TrainingFailed, WorkerHooks, run_ray_train
from interformer.training.launch import run_local as run_in_process
from interformer.training.runlog import refuse_schedule_changes
from interformer.training.trainer import check_resume_checkpoint, open_sources

from .datasets import DatasetError, SampleRef, default_data_root, resolve
from .ray_runtime import init_ray

EVAL_ROOT_OPTION = "--eval-data-root"


def checked_before_start(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its held-out data root made explicit, after the checks that would otherwise fail only once
    workers run: every held-out sample loads and has an object, a resumed run keeps its schedule and its newest
    checkpoint fits the model and optimiser, --init fits the variant and is finite, every
    training sample's files exist and its annotations parse, and the feature table holds this model's features
    for every training image. Raises DatasetError, ScheduleChanged, CheckpointError, DataError or
    FeatureTableError."""
    cfg = with_eval_data(cfg)
    refuse_schedule_changes(Path(cfg.out_dir), cfg.to_dict(), SCHEDULE_FIELDS)
    check_resume_checkpoint(cfg)
    check_init(cfg.variant, cfg.init)
    source = open_sources(cfg)
    check_source(source)
    if cfg.features:
        check_feature_coverage(cfg, source, features_fingerprint(cfg))
    return cfg


def with_eval_data(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its held-out data root made explicit (absolute, so that workers anywhere read the same
    folder), after checking every held-out sample loads and has an object: raises DatasetError naming the option
    to fix."""
    if cfg.eval_data is None:
        return cfg
    if cfg.eval_data_root is None:
        cfg = replace(cfg, eval_data_root=str(default_data_root()))
    check_eval_samples(cfg, eval_refs(cfg))
    return cfg


def check_eval_samples(cfg: TrainConfig, refs: list[SampleRef]) -> None:
    """Load every held-out sample the run will evaluate and check it has an object pixel: a bad sample found at
    the first evaluation would stop the run there, and every rerun (which repeats that evaluation first) again.
    Raises DatasetError naming the sample."""
    from .evaluation import check_has_object

    for ref in refs:
        try:
            check_has_object(ref.load())
        except ValueError as e:  # DatasetError included
            raise DatasetError(f"--eval-data {cfg.eval_data}: {e}") from None


def eval_refs(cfg: TrainConfig) -> list[SampleRef]:
    refs = resolve(cfg.eval_data, cfg.eval_data_root, root_option=EVAL_ROOT_OPTION)
    return refs[: cfg.eval_max_samples] if cfg.eval_max_samples is not None else refs


def make_evaluator(cfg: TrainConfig, device: torch.device):
    """NoC on the held-out set with the evaluation job's code (pipeline.evaluation), on a copy of the model."""
    from tqdm import tqdm

    from interformer.predictor import Predictor

    from .evaluation import EvalConfig, evaluate_ref
    from .metrics import mean_noc, miou_at
    from .segmenters import ModelSegmenter

    refs = eval_refs(cfg)
    econf = EvalConfig(protocol=cfg.eval_protocol, max_clicks=cfg.eval_clicks, seed=cfg.seed)

    def evaluate(model) -> dict[str, Any]:
        segmenter = ModelSegmenter(Predictor(copy.deepcopy(model), device=device))
        results = [evaluate_ref(segmenter, r, econf) for r in tqdm(refs, desc="eval", leave=False)]
        ious = [r.ious for r in results]
        return {
            "dataset": cfg.eval_data, "protocol": cfg.eval_protocol, "samples": len(results),
            "noc85": round(mean_noc(ious, 0.85, cfg.eval_clicks, cfg.eval_protocol), 4),
            "noc90": round(mean_noc(ious, 0.90, cfg.eval_clicks, cfg.eval_protocol), 4),
            "miou1": round(miou_at(ious, 1), 4),
            "miou5": round(miou_at(ious, min(5, cfg.eval_clicks)), 4),
        }

    return evaluate


class StoredFeatureFetch:
    """Opens a FeatureReader on first use (in whichever process reads samples) and fetches pyramids by id."""

    def __init__(self, root: str, table: str, fingerprint: str) -> None:
        self.root, self.table, self.fingerprint = root, table, fingerprint

    def __call__(self):
        from .feature_store import FeatureReader

        return FeatureReader(self.root, self.fingerprint, table=self.table).get


class FeatureTableError(ValueError):
    """The feature table holds no features of the model being trained."""


def model_part(fingerprint: str) -> str:
    """The variant and weights id of an encoder fingerprint (`variant:weights:max_side=..:div=..`)."""
    return ":".join(fingerprint.split(":")[:2])


def features_fingerprint(cfg: TrainConfig) -> str:
    """The encoder fingerprint of the stored features to train on, after checking the table holds it.

    --features-fingerprint may choose other preprocessing (max_side, div) of the same encoder, never features of
    another variant or other weights: the neck would learn on a backbone it is not trained with."""
    from interformer.config import PreprocessConfig
    from interformer.training.init import initial_model

    torch.manual_seed(cfg.seed)
    own = initial_model(cfg.variant, cfg.init)[0].fingerprint(PreprocessConfig())
    fingerprint = cfg.features_fingerprint or own
    if model_part(fingerprint) != model_part(own):
        raise FeatureTableError(
            f"--features-fingerprint {fingerprint!r} names features of encoder {model_part(fingerprint)!r}, but the "
            f"model being trained is {model_part(own)!r} (--variant, --init, --seed); it may differ from "
            f"{own!r} only in max_side/div")
    found = _stored(cfg)
    if fingerprint not in found:
        raise FeatureTableError(
            f"the feature table {cfg.features}/{cfg.features_table} has no features of encoder {fingerprint!r}; it "
            f"holds {({fp: len(ids) for fp, ids in found.items()}) or 'nothing'} (encode with the same --init, or "
            "give --features-fingerprint)")
    return fingerprint


def _stored(cfg: TrainConfig) -> dict[str, set[str]]:
    """The ids stored per encoder fingerprint in the training feature table, read without writing to it."""
    from .feature_store import FeatureStoreError, stored_ids_by_fingerprint

    try:
        return stored_ids_by_fingerprint(cfg.features, cfg.features_table)
    except FeatureStoreError as e:
        raise FeatureTableError(str(e)) from None


def check_feature_coverage(cfg: TrainConfig, source: TrainSource, fingerprint: str, shown: int = 5) -> None:
    """FeatureTableError when some training image has no stored features of `fingerprint` (found before any
    work, not as a worker's lookup error mid-run)."""
    stored = _stored(cfg).get(fingerprint, set())
    missing = sorted({source.key(i) for i in range(len(source))} - stored)
    if missing:
        raise FeatureTableError(
            f"the feature table {cfg.features}/{cfg.features_table} lacks features of encoder {fingerprint!r} for "
            f"{len(missing)} of the {len(source)} training images (e.g. {missing[:shown]}); encode them first "
            "(interformer-encode with the same --init and data)")


def feature_stream(cfg: TrainConfig, rank: int, world_size: int) -> tuple[Any, Any]:
    """The frozen-backbone sample stream over the feature table, or (None, None) when the run trains on images."""
    if not cfg.features:
        return None, None
    from interformer.training.feature_stream import FeatureSampleStream, collate_by_size

    fetch = StoredFeatureFetch(cfg.features, cfg.features_table, features_fingerprint(cfg))
    stream = FeatureSampleStream(open_sources(cfg), fetch, cfg.augment.crop_size, cfg.seed, rank, world_size)
    return stream, collate_by_size


PIPELINE_HOOKS = WorkerHooks(evaluator=make_evaluator, sample_stream=feature_stream)


def run_local(cfg: TrainConfig) -> dict[str, Any]:
    """Train in this process (no Ray) with the pipeline's evaluator and feature stream."""
    return run_in_process(checked_before_start(cfg), PIPELINE_HOOKS)


def run_on_ray(cfg: TrainConfig, address: str | None, max_failures: int) -> dict[str, str]:
    """Train with Ray Train on the cluster at `address` (or RAY_ADDRESS), else on a private local Ray sized for
    the workers; returns the last log.csv row."""
    import ray

    cfg = checked_before_start(cfg)
    init_ray(address, num_cpus=max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker),
             log_to_driver=False, job="train")
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if cfg.use_gpu and gpus < cfg.num_workers:  # Ray Train would wait for them forever, without a word
            raise TrainingFailed(f"--use-gpu true needs {cfg.num_workers} GPU(s), one per worker, and the cluster "
                                 f"has {gpus:g}; train on CPUs (--use-gpu false) or on a cluster with GPUs")
        return run_ray_train(cfg, max_failures, PIPELINE_HOOKS)
    finally:
        ray.shutdown()
