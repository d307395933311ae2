"""A diverging run stops before its weights turn NaN: a non-finite loss or gradient is refused before the optimiser
step (TrainingDiverged, exit 2), no checkpoint of non-finite weights is ever written, so pruning never removes the
last finite one; --init files and resumed checkpoints holding NaN or infinite tensors are refused before any work."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from interformer.checkpoint import CheckpointError, load_model, save_checkpoint
from interformer.training.augment import AugmentConfig
from interformer.training.click_sampler import ClickSimConfig
from interformer.training.config import TrainConfig
from interformer.training.data import DataSpec
from interformer.training.init import check_init, initial_model
from interformer.training.losses import LossConfig
from interformer.training.optim import OptimConfig, build_optimizer
from interformer.training.runlog import (NonFiniteWeights, list_checkpoints, load_training_checkpoint,
                                         nonfinite_tensors, save_training_checkpoint)
from interformer.training.step import TrainForward, TrainingDiverged, training_step
from interformer.training.stream import SampleStream
from interformer.training.trainer import _collate_images, open_sources, run_worker
from pipeline.training_run import checked_before_start
from test_training_init import timm_mae_state_dict

ROOT = Path(__file__).resolve().parents[1]


def config(shared_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    davis = shared_dir / "data/DAVIS"
    base = dict(out_dir=str(out_dir), data=(DataSpec.parse(f"folder:{davis / 'img'},masks={davis / 'gt'}"),),
                variant="small", max_iters=6, batch_size=1, loader_workers=0, checkpoint_interval=1, log_interval=1,
                augment=AugmentConfig(crop_size=32), optim=OptimConfig(lr=1e-3, warmup_iters=1))
    base.update(kw)
    return TrainConfig(**base)


class PoisonedStream(Dataset):
    """The run's own sample stream, with NaN or infinite pixels from sample number `from_sample` on."""

    def __init__(self, cfg: TrainConfig, from_sample: int, value: float) -> None:
        self.stream = SampleStream(open_sources(cfg), cfg.augment, cfg.seed)
        self.from_sample, self.value = from_sample, value

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, n: int):
        img, label = self.stream[n]
        return (torch.full_like(img, self.value), label) if n >= self.from_sample else (img, label)


def finite_checkpoint(path: Path) -> bool:
    return not nonfinite_tensors(torch.load(path, weights_only=False)["state_dict"])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(poison_at=st.integers(1, 4), keep=st.integers(0, 2), interval=st.integers(1, 2),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_diverging_run_stops_before_any_nonfinite_checkpoint(shared_dir, tmp_path_factory, poison_at, keep,
                                                               interval, value):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    cfg = config(shared_dir, out, keep_checkpoints=keep, checkpoint_interval=interval)
    with pytest.raises(TrainingDiverged, match=f"iteration {poison_at + 1} .*not finite.*step was not taken"):
        run_worker(cfg, sample_stream=PoisonedStream(cfg, poison_at, value), collate=_collate_images)
    saved = list_checkpoints(out)
    written = [i for i in range(1, poison_at + 1) if i % interval == 0]  # iterations 1..poison_at were sound
    assert [it for it, _ in saved] == (written[-keep:] if keep else written)
    assert all(finite_checkpoint(p) for _, p in saved)
    for _, p in saved:
        load_training_checkpoint(p)  # a rerun can resume from what is left


def test_a_nonfinite_gradient_stops_the_step_with_the_weights_untouched(small_model):
    model = load_model(None, variant="small")
    model.train()
    optimizer = build_optimizer(model, OptimConfig(), model.config.vit.depth, model.config.layer_decay_rate)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("decode_head"))
    param.register_hook(lambda g: torch.full_like(g, math.nan))
    label = torch.zeros(1, 32, 32, dtype=torch.long)
    label[:, 8:24, 8:24] = 1
    with pytest.raises(TrainingDiverged, match=f"1 gradient\\(s\\) are not finite \\({name}\\)"):
        training_step(TrainForward(model), model, optimizer, [(torch.rand(1, 3, 32, 32), label, None)],
                      np.random.default_rng(0), ClickSimConfig(max_extra_clicks=0), LossConfig())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nonfinite_weights_are_never_written_and_nothing_is_pruned(tmp_path):
    model = load_model(None, variant="small")
    optimizer = build_optimizer(model, OptimConfig(), model.config.vit.depth, model.config.layer_decay_rate)
    first = save_training_checkpoint(model, optimizer, tmp_path, 1, {}, keep=1)
    with torch.no_grad():
        next(model.parameters())[0].fill_(math.inf)
    with pytest.raises(NonFiniteWeights, match="iteration 2 are not finite"):
        save_training_checkpoint(model, optimizer, tmp_path, 2, {}, keep=1)
    assert list_checkpoints(tmp_path) == [(1, first)]


def nan_checkpoint(tmp_path: Path, vit_only: bool) -> Path:
    path = tmp_path / "nan.pth"
    if vit_only:
        sd = timm_mae_state_dict()
        sd["patch_embed.proj.weight"] = torch.full_like(sd["patch_embed.proj.weight"], math.nan)
        torch.save({"model": sd}, path)
    else:
        model = load_model(None, variant="small")
        with torch.no_grad():
            model.backbone.patch_embed.projection.weight.fill_(math.nan)
        save_checkpoint(model, path)
    return path


@pytest.mark.parametrize("vit_only", [False, True])
def test_an_init_with_nan_weights_is_refused_before_any_work(shared_dir, tmp_path, vit_only):
    path = nan_checkpoint(tmp_path, vit_only)
    with pytest.raises(CheckpointError, match="NaN or infinite weights.*patch_embed"):
        check_init("small", str(path))
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        initial_model("small", str(path))
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        checked_before_start(config(shared_dir, tmp_path / "run", init=str(path)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_job_exits_2_with_one_line_when_training_diverges(shared_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_job_nonfinite", ROOT / "jobs/train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    davis = shared_dir / "data/DAVIS"
    torch.set_num_threads(1)
    rc = job.main(["--local", "--out-dir", str(tmp_path / "run"), "--variant", "small", "--data",
                   f"folder:{davis / 'img'},masks={davis / 'gt'}", "--max-iters", "8", "--batch-size", "1",
                   "--crop-size", "32", "--loader-workers", "0", "--checkpoint-interval", "1", "--keep-checkpoints",
                   "2", "--log-interval", "1", "--lr", "1e12", "--warmup-iters", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: training diverged at iteration" in err and "Traceback" not in err
    saved = list_checkpoints(tmp_path / "run")
    assert saved and all(finite_checkpoint(p) for _, p in saved)
