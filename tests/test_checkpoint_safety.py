"""A checkpoint is data, never a program: every loader refuses pickled code before it runs, any structure a
file may hold ends in a model or a CheckpointError, and every entry point reports a bad checkpoint as a
user error (exit 2, one line, no traceback) before it starts anything."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interformer.checkpoint import CheckpointError, check_checkpoint, load_model, read_checkpoint, save_checkpoint
from interformer.modeling import InterFormer
from interformer.training.runlog import load_training_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GRABCUT = ROOT.parent / "shared" / "data" / "GrabCut"


class Touch:
    """Unpickling this object creates `marker`: the harmless stand-in for code run by a hostile file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class Shell:
    """The same through a module torch blocks outright (os / posix): its refusal reads differently."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(small_model: InterFormer, where: str, marker: Path, payload_type: type = Touch) -> dict:
    sd = dict(small_model.state_dict())
    obj = {"meta": {"iter": 1}, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    payload = payload_type(marker)
    if where == "meta":
        obj["meta"]["hook"] = payload
    elif where == "state dict value":
        sd[next(iter(sd))] = payload
    elif where == "deep in a list":
        obj["meta"]["history"] = [1, [2, {"x": [payload]}]]
    elif where == "optimizer":
        obj["optimizer"]["state"] = {0: payload}
    elif where == "top level":
        obj = payload
    return obj


LOADERS = {
    "load_model": load_model,
    "check_checkpoint": check_checkpoint,
    "read_checkpoint": read_checkpoint,
    "load_training_checkpoint": lambda p: load_training_checkpoint(Path(p)),
}


@pytest.mark.parametrize("where", ["meta", "state dict value", "deep in a list", "optimizer", "top level"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("payload", [Touch, Shell])
def test_pickled_code_is_refused_before_it_runs(tmp_path, small_model, where, loader, payload):
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pth"
    torch.save(_hostile(small_model, where, marker, payload), path)
    with pytest.raises(CheckpointError, match="could run code"):
        LOADERS[loader](path)
    assert not marker.exists()


def test_the_numpy_values_an_mmcv_checkpoint_keeps_in_meta_still_load(tmp_path, small_model):
    """mmcv/mmseg runners store a numpy seed, scores and palettes beside the weights; they are plain data."""
    path = tmp_path / "mmcv-like.pth"
    meta = {"seed": np.int64(1234), "hook_msgs": {"best_score": np.float64(0.8), "last_ckpt": "iter_10.pth"},
            "PALETTE": np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8), "CLASSES": ("Background", "Foreground"),
            "config": "model = dict(...)", "mmcv_version": "1.7.1", "iter": 10, "flags": np.array([True, False])}
    torch.save({"meta": meta, "state_dict": small_model.state_dict()}, path)
    model = load_model(path)
    assert model.config.name == "small"
    assert check_checkpoint(path) == "small"
    _, read_meta = read_checkpoint(path)
    assert read_meta["seed"] == 1234 and read_meta["PALETTE"].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_our_own_and_training_checkpoints_load_without_unpickling_code(tmp_path, small_model):
    path = tmp_path / "ours.pth"
    opt = torch.optim.AdamW(small_model.parameters(), lr=1e-4)
    save_checkpoint(small_model, path, meta={"iter": 3, "train_config": {"lr": 1e-4, "sizes": (1, 2)}},
                    extra={"optimizer": opt.state_dict()})
    assert load_model(path).config.name == "small"
    assert set(load_training_checkpoint(path)) >= {"meta", "state_dict", "optimizer"}


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                  st.text(max_size=6), st.binary(max_size=6),
                  st.sampled_from([torch.zeros(()), torch.ones(3), torch.zeros(2, 3, dtype=torch.int64),
                                   torch.zeros(0)]))
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                      | st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 3)), inner, max_size=3),
                      max_leaves=8)


@st.composite
def _checkpoint_objects(draw, state_dict):
    """Anything a file may hold: random structures, and the real state dict with one entry broken."""
    kind = draw(st.sampled_from(["random", "meta", "broken entry", "bare"]))
    if kind == "random":
        return draw(_value)
    sd = dict(state_dict)
    if kind in ("broken entry", "bare"):
        key = draw(st.sampled_from(sorted(sd)))
        action = draw(st.sampled_from(["replace", "drop", "reshape", "rename"]))
        if action == "replace":
            sd[key] = draw(_value)
        elif action == "drop":
            del sd[key]
        elif action == "reshape":
            sd[key] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=4)))
        else:
            sd[draw(st.one_of(st.text(max_size=8), st.integers()))] = sd.pop(key)
    if kind == "bare":
        return sd
    meta = draw(st.one_of(_value, st.fixed_dictionaries({"interformer": _value}),
                          st.fixed_dictionaries({"interformer": st.fixed_dictionaries({"variant": _value})})))
    return {"meta": meta, draw(st.sampled_from(["state_dict", "model"])): sd}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_whatever_a_checkpoint_holds_loading_gives_a_model_or_a_checkpoint_error(tmp_path, small_model, data):
    obj = data.draw(_checkpoint_objects(small_model.state_dict()))
    path = tmp_path / "any.pth"
    torch.save(obj, path)
    for loader in (load_model, check_checkpoint):
        try:
            result = loader(path)
        except CheckpointError:
            continue
        assert isinstance(result, (InterFormer, str))


def _bad_files(tmp_path: Path, small_model: InterFormer) -> dict[str, Path]:
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint\n")
    hostile = tmp_path / "hostile.pth"
    torch.save(_hostile(small_model, "meta", tmp_path / "code-ran"), hostile)
    wrong = tmp_path / "wrong.pth"
    torch.save({"meta": {"interformer": {"variant": "huge"}}, "state_dict": small_model.state_dict()}, wrong)
    return {"text": text, "hostile": hostile, "unknown variant": wrong}


def _entry_point_argv(name: str, checkpoint: Path, tmp_path: Path) -> tuple[str, list[str]]:
    coco = tmp_path / "prompts.json"
    coco.write_text('{"images": [], "annotations": [], "categories": []}')
    return {
        "encode": ("jobs.encode", [str(ROOT / "samples"), "--db", str(tmp_path / "db"), "--checkpoint", str(checkpoint)]),
        "preannotate": ("jobs.preannotate", ["--coco", str(coco), "--image-root", str(ROOT / "samples"),
                                             "--coco-out", str(tmp_path / "out.json"), "--run-dir",
                                             str(tmp_path / "run"), "--checkpoint", str(checkpoint)]),
        "evaluate": ("jobs.evaluate", ["--checkpoint", str(checkpoint), "GrabCut", "--output", str(tmp_path / "ev")]),
        "backend": ("connectors.cli", ["--checkpoint", str(checkpoint), "--db", str(tmp_path / "db")]),
        "train": ("jobs.train", ["--local", "--out-dir", str(tmp_path / "train"), "--init", str(checkpoint),
                                 "--data", f"folder:{GRABCUT}/data_GT,masks={GRABCUT}/boundary_GT", "--max-iters", "1"]),
    }[name]


@pytest.mark.parametrize("entry", ["encode", "preannotate", "evaluate", "backend", "train"])
def test_every_entry_point_reports_a_bad_checkpoint_as_a_user_error(tmp_path, small_model, entry, capsys):
    for kind, path in _bad_files(tmp_path, small_model).items():
        module, argv = _entry_point_argv(entry, path, tmp_path)
        main = importlib.import_module(module).main
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, (kind, err[-2000:])
        assert "error" in err and str(path) in err and "Traceback" not in err, (kind, err[-2000:])
        assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("meta", [torch.ones(3), torch.zeros(()), np.array([1, 2]), "text", [1, 2]])
def test_a_meta_that_is_not_a_dict_is_a_checkpoint_error(tmp_path, small_model, meta):
    """Found by the property above: a tensor `meta` made `obj.get('meta') or {}` ask a tensor for its truth."""
    path = tmp_path / "meta.pth"
    torch.save({"meta": meta, "state_dict": small_model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="'meta'"):
        load_model(path)
