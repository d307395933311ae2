"""A training run that cannot start or fails says why in one line: bad --init files are CheckpointErrors found
before Ray starts, and a failed Ray Train run reports each worker's root cause instead of a Ray traceback."""
from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.train import ControllerError, WorkerGroupError

from interformer.checkpoint import CheckpointError, load_model, save_checkpoint
from interformer.training.augment import AugmentConfig
from interformer.training.config import TrainConfig
from interformer.training.data import DataError, DataSpec
from interformer.training.init import check_init, initial_model
from interformer.training.launch import failure_message
from interformer.training.optim import OptimConfig, build_optimizer
from interformer.training.runlog import EVAL_FIELDS, LOG_FIELDS, CsvLog, list_checkpoints, save_training_checkpoint
from interformer.training.trainer import run_worker, stopped_message
from pipeline.datasets import DatasetError
from pipeline.training_run import checked_before_start
from test_training_init import timm_mae_state_dict

ROOT = Path(__file__).resolve().parents[1]


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


def davis_config(shared_dir: Path, out_dir: Path, **kw) -> TrainConfig:
    davis = shared_dir / "data/DAVIS"
    base = dict(out_dir=str(out_dir), data=(DataSpec.parse(f"folder:{davis / 'img'},masks={davis / 'gt'}"),),
                variant="small", max_iters=2, batch_size=1, loader_workers=0, checkpoint_interval=1, log_interval=1,
                augment=AugmentConfig(crop_size=32))
    base.update(kw)
    return TrainConfig(**base)


def load_job():
    spec = importlib.util.spec_from_file_location("train_job_start_errors", ROOT / "jobs/train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def job_args(shared_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    davis = shared_dir / "data/DAVIS"
    return ["--local", "--out-dir", str(out_dir), "--variant", "small", "--data",
            f"folder:{davis / 'img'},masks={davis / 'gt'}", "--max-iters", "2", "--batch-size", "1", "--crop-size",
            "32", "--loader-workers", "0", "--checkpoint-interval", "1", *extra]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --- held-out data: every sample the run will evaluate is loaded before any work ---------------------------------

def write_held_out(folder: Path, n: int, bad: int | None, fault: str) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 12:36] = 255
        if i == bad and fault == "empty mask":
            mask[:] = 0
        if i == bad and fault == "mask size":
            mask = mask[:20]
        cv2.imwrite(str(folder / "images" / f"s{i}.png"), image)
        cv2.imwrite(str(folder / "masks" / f"s{i}.png"), mask)
        if i == bad and fault == "not an image":
            (folder / "images" / f"s{i}.png").write_bytes(b"not a png")


HELD_OUT_FAULTS = {"empty mask": "s{bad}.*no object pixel", "mask size": "s{bad}: mask size",
                   "not an image": r"s{bad}\.png: not_an_image"}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 5), data=st.data(), fault=st.sampled_from(sorted(HELD_OUT_FAULTS)))
def test_a_bad_held_out_sample_is_refused_before_any_work(shared_dir, tmp_path_factory, n, data, fault):
    bad = data.draw(st.integers(0, n - 1))
    tmp = tmp_path_factory.mktemp("held")
    write_held_out(tmp / "held", n, bad, fault)
    cfg = davis_config(shared_dir, tmp / "run", eval_data=str(tmp / "held"), eval_interval=1)
    with pytest.raises(DatasetError, match="--eval-data .*" + HELD_OUT_FAULTS[fault].format(bad=bad)):
        checked_before_start(cfg)
    assert not (tmp / "run" / "checkpoints").exists()


def test_the_job_refuses_a_bad_held_out_set_in_one_line(shared_dir, tmp_path, capsys):
    write_held_out(tmp_path / "held", 3, 2, "empty mask")
    rc = load_job().main(job_args(shared_dir, tmp_path / "run", "--eval-data", str(tmp_path / "held"),
                                  "--eval-interval", "1", "--eval-clicks", "2"))
    assert rc == 2 and "no object pixel" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_good_held_out_set_passes_and_eval_max_samples_limits_the_check(shared_dir, tmp_path):
    write_held_out(tmp_path / "held", 3, 2, "empty mask")
    cfg = davis_config(shared_dir, tmp_path / "run", eval_data=str(tmp_path / "held"), eval_interval=1,
                       eval_max_samples=2)
    checked_before_start(cfg)


# --- the checkpoint a run resumes from is checked before start ----------------------------------------------------

def training_checkpoint(out_dir: Path, variant: str = "small", frozen_backbone: bool = False) -> Path:
    model = load_model(None, variant=variant)
    if frozen_backbone:
        model.backbone.requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig(), model.config.vit.depth, model.config.layer_decay_rate)
    return save_training_checkpoint(model, optimizer, out_dir, 1, {})


def edit_checkpoint(path: Path, edit) -> None:
    obj = torch.load(path, weights_only=False)
    edit(obj)
    torch.save(obj, path)


def no_optimizer(path: Path) -> None:
    edit_checkpoint(path, lambda o: o.pop("optimizer"))


def nan_weight(path: Path) -> None:
    edit_checkpoint(path, lambda o: o["state_dict"]["decode_head.conv_seg.weight"].fill_(float("nan")))


def missing_key(path: Path) -> None:
    edit_checkpoint(path, lambda o: o["state_dict"].pop("decode_head.conv_seg.weight"))


def fewer_optimizer_groups(path: Path) -> None:
    edit_checkpoint(path, lambda o: o["optimizer"]["param_groups"].pop())


def a_list(path: Path) -> None:
    torch.save([1, 2, 3], path)


FOREIGN_CHECKPOINTS = {
    "no optimizer": (no_optimizer, "not a training checkpoint of this job .no 'optimizer'."),
    "NaN weight": (nan_weight, "non-finite weights .1 tensor.s.: decode_head.conv_seg.weight"),
    "missing key": (missing_key, "does not fit InterFormer-small: 1 missing keys .decode_head.conv_seg.weight"),
    "other variant": (None, "does not fit InterFormer-small: .*unexpected keys .neck.refine_stages"),
    "frozen-backbone optimiser": (None, "optimiser state has parameter groups of sizes"),
    "optimiser groups": (fewer_optimizer_groups, "optimiser state has parameter groups of sizes"),
    "not a dict": (a_list, "not a training checkpoint of this job .it holds a list."),
}


def foreign_run_folder(out_dir: Path, case: str) -> None:
    edit, _ = FOREIGN_CHECKPOINTS[case]
    path = training_checkpoint(out_dir, variant="small_refine" if case == "other variant" else "small",
                               frozen_backbone=case == "frozen-backbone optimiser")
    if edit is not None:
        edit(path)


@pytest.mark.parametrize("case", sorted(FOREIGN_CHECKPOINTS))
def test_an_unusable_resume_checkpoint_is_refused_before_start(shared_dir, tmp_path, capsys, case):
    foreign_run_folder(tmp_path / "run", case)
    message = FOREIGN_CHECKPOINTS[case][1]
    with pytest.raises(CheckpointError, match=message):
        checked_before_start(davis_config(shared_dir, tmp_path / "run"))
    with pytest.raises(CheckpointError, match=message):  # the worker refuses it the same way
        run_worker(davis_config(shared_dir, tmp_path / "run"))
    rc = load_job().main(job_args(shared_dir, tmp_path / "run"))
    assert rc == 2 and re.search(message, one_error_line(capsys.readouterr().err))
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [1]


def test_a_sound_resume_checkpoint_passes(shared_dir, tmp_path):
    run_worker(davis_config(shared_dir, tmp_path / "run", stop_at=1))
    checked_before_start(davis_config(shared_dir, tmp_path / "run"))


def test_gpus_a_cpu_cluster_lacks_are_refused_instead_of_waiting_forever(shared_dir, tmp_path):
    """--use-gpu true on a cluster without GPUs: Ray Train would queue the workers forever without a word."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [a for a in job_args(shared_dir, tmp_path / "run", "--use-gpu", "true") if a != "--local"]
    done = subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), *argv, "--num-workers", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--use-gpu true needs 1 GPU" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# --- a stop (SIGTERM, Ctrl-C) keeps what it says it keeps ---------------------------------------------------------

def start_job(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs/train.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_when(proc: subprocess.Popen, ready, what: str, sig: str = "SIGTERM") -> str:
    """Send `sig` once `ready()` holds (polled, never timed); the job's stderr after it exited with 130."""
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} before the job ended: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    return err


def stop_line(err: str) -> str:
    """The one line a stop writes (tqdm may redraw its bar after it, when the interpreter closes it)."""
    lines = [line for line in err.splitlines() if line.startswith("[train] stopped")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# SIGTERM on Ray is the init_ray property tested in test_ray_runtime_signals.py
@pytest.mark.parametrize("mode, sig", [("local", "SIGTERM"), ("ray", "SIGINT")])
def test_a_stopped_run_says_what_it_kept_and_exits_130(shared_dir, tmp_path, mode, sig):
    """SIGTERM or Ctrl-C during a run, local or on Ray (whose Train installs its own Ctrl-C handler and used to
    leave with exit 1 and no word): one line naming the kept checkpoint and its iteration, exit 130, no
    traceback."""
    argv = job_args(shared_dir, tmp_path / "run")
    argv[argv.index("--max-iters") + 1] = "100000"
    if mode == "ray":
        argv = [a for a in argv if a != "--local"] + ["--num-workers", "1"]
    proc = start_job(argv)
    err = stop_when(proc, lambda: list_checkpoints(tmp_path / "run"), "checkpoint", sig)
    line = stop_line(err)
    assert re.fullmatch(r"\[train\] stopped; the newest checkpoint, .*iter_\d+\.pth \(iteration (\d+)\), is kept: run the "
                        r"same command again to resume from iteration \1", line), line
    if mode == "local":  # on Ray an aborted worker may still finish a step after the driver's word
        assert line == stopped_message(tmp_path / "run")


def test_a_stop_keeps_the_checkpoint_of_the_last_evaluation_and_the_rerun_resumes_from_it(shared_dir, tmp_path):
    """--eval-interval below --checkpoint-interval (the documented fine-tune: 500 against 20000): every
    evaluation has its checkpoint written before it, so a SIGTERM after an evaluation keeps that checkpoint (within
    --keep-checkpoints) and the rerun of the same command resumes from it, not from iteration 0."""
    write_held_out(tmp_path / "held", 1, None, "")
    out = tmp_path / "run"
    argv = job_args(shared_dir, out, "--eval-data", str(tmp_path / "held"), "--eval-interval", "2", "--eval-clicks",
                    "2", "--keep-checkpoints", "1", "--log-interval", "1")
    argv[argv.index("--max-iters") + 1] = "100000"
    argv[argv.index("--checkpoint-interval") + 1] = "50000"
    eval_log = CsvLog(out / "eval.csv", EVAL_FIELDS)
    err = stop_when(start_job(argv), eval_log.rows, "eval.csv row")
    kept = list_checkpoints(out)
    # --keep-checkpoints 1 prunes the evaluation checkpoints too (a stop between the newest one's rename and the
    # pruning may leave the one before it)
    assert 1 <= len(kept) <= 2, (kept, err[-2000:])
    iteration = kept[-1][0]
    evaluated = [int(r["iter"]) for r in eval_log.rows()]
    assert iteration % 2 == 0 and iteration >= max(evaluated), (iteration, evaluated)
    assert f"(iteration {iteration}), is kept" in stop_line(err), err[-2000:]
    rerun = subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), *argv, "--stop-at", str(iteration + 1)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"(iteration {iteration}); iterations {iteration} -> {iteration + 1} of 100000" in rerun.stdout, rerun.stdout
    assert [int(r["iter"]) for r in eval_log.rows()] == list(range(2, iteration + 1, 2))


def test_a_run_stopped_before_its_first_checkpoint_says_nothing_was_saved(shared_dir, tmp_path):
    out = tmp_path / "run"
    argv = job_args(shared_dir, out, "--log-interval", "1")
    argv[argv.index("--max-iters") + 1] = "100000"
    argv[argv.index("--checkpoint-interval") + 1] = "50000"
    err = stop_when(start_job(argv), CsvLog(out / "log.csv", LOG_FIELDS).rows, "log.csv row")
    assert not list_checkpoints(out)
    assert stop_line(err) == (f"[train] stopped before the first checkpoint: nothing was saved yet in {out}; running "
                              "the same command again starts from iteration 0"), err[-2000:]
