"""A training run that cannot start or fails says why in one line: bad --init files are CheckpointErrors found
before Ray starts, and a failed Ray Train run reports each worker's root cause instead of a Ray traceback."""
from __future__ import annotations

import pytest
import torch
from ray.train import ControllerError, WorkerGroupError

from interformer.checkpoint import CheckpointError, load_model, save_checkpoint
from interformer.training.config import TrainConfig
from interformer.training.data import DataError, DataSpec
from interformer.training.init import check_init, initial_model
from interformer.training.launch import failure_message
from pipeline.training_run import checked_before_start
from test_training_init import timm_mae_state_dict


def with_pos_embed(value: torch.Tensor) -> dict[str, torch.Tensor]:
    sd = timm_mae_state_dict()
    sd["pos_embed"] = value
    return sd


BAD_INITS = {
    "pos_embed with only the class position": (with_pos_embed(torch.zeros(1, 1, 96)), r"pos_embed has shape \(1, 1, 96\)"),
    "2-D pos_embed": (with_pos_embed(torch.zeros(197, 96)), r"pos_embed has shape \(197, 96\).*\[1, 1 \+ n\*n, C\]"),
    "distillation token": (with_pos_embed(torch.zeros(1, 198, 96)), "not a square grid"),
    "q_bias without v_bias": ({**timm_mae_state_dict(), "blocks.0.attn.q_bias": torch.zeros(96)},
                              r"blocks.0.attn.q_bias \(96,\) and blocks.0.attn.v_bias \(absent\)"),
    "v_bias without q_bias": ({**timm_mae_state_dict(), "blocks.1.attn.v_bias": torch.zeros(96)},
                              r"q_bias \(absent\)"),
    "wrong width": (with_pos_embed(torch.zeros(1, 197, 64)), "mis-shaped"),
}


@pytest.mark.parametrize("case", sorted(BAD_INITS))
def test_bad_vit_inits_are_checkpoint_errors_before_any_weights_are_built(tmp_path, case):
    sd, message = BAD_INITS[case]
    path = tmp_path / "init.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=message):
        check_init("small", str(path))
    with pytest.raises(CheckpointError, match=message):
        initial_model("small", str(path))


def test_good_inits_pass_the_check(tmp_path, small_model):
    torch.save({"model": timm_mae_state_dict()}, tmp_path / "mae.pth")
    check_init("small", str(tmp_path / "mae.pth"))
    save_checkpoint(load_model(None, variant="small"), tmp_path / "full.pth")
    check_init("small", str(tmp_path / "full.pth"))
    with pytest.raises(CheckpointError, match="not InterFormer-light"):
        check_init("light", str(tmp_path / "full.pth"))


def test_the_driver_refuses_a_bad_init_before_starting(shared_dir, tmp_path):
    torch.save({"model": with_pos_embed(torch.zeros(1, 1, 96))}, tmp_path / "init.pth")
    davis = shared_dir / "data/DAVIS"
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=(DataSpec.parse(f"folder:{davis / 'img'},masks={davis / 'gt'}"),),
                      variant="small", init=str(tmp_path / "init.pth"))
    with pytest.raises(CheckpointError, match="pos_embed"):
        checked_before_start(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ray_train_failures_name_each_workers_root_cause():
    try:
        try:
            raise DataError("cannot read image /data/s1.jpg")
        except DataError as inner:
            raise RuntimeError("wrapped by the worker group") from inner
    except RuntimeError as wrapped:
        failure = WorkerGroupError("Traceback (most recent call last): ...", {1: wrapped, 0: ValueError("bad")})
    assert failure_message(failure) == "worker 0: ValueError: bad; worker 1: DataError: cannot read image /data/s1.jpg"
    assert failure_message(ControllerError(OSError("disk full"))) == "OSError: disk full"
