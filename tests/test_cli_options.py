"""Every number a command line takes is range-checked when it is parsed: a negative count, a threshold above 1,
NaN or inf is a usage error (exit 2) naming the option, never a traceback inside a Ray worker or a run that
silently does something else."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import jobs.encode
import jobs.evaluate
import jobs.preannotate
import jobs.train
from connectors import cli as backend_cli
from pipeline import evaluation_cli
from interformer.cli_types import NumberType, integer, real
from interformer.training.config import TrainConfig
from interformer.training.data import DataSpec

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["-7", "-1", "0", "nan", "inf", "-inf", "1e400", "2.5", "4294967296", "", "x"]


def _parsers() -> dict[str, argparse.ArgumentParser]:
    return {
        "encode": jobs.encode.build_parser(),
        "preannotate": jobs.preannotate.build_parser("interformer-preannotate", jobs.preannotate.__doc__),
        "evaluate": evaluation_cli.build_parser("interformer-evaluate", jobs.evaluate.__doc__),
        "backend": backend_cli.build_parser(),
        "train": jobs.train.build_parser(),
    }


def _numeric_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and (isinstance(a.type, NumberType) or a.type in (int, float))]


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_numeric_option_has_a_range(name):
    """A bare int/float type accepts -7, NaN and inf."""
    options = _numeric_options(_parsers()[name])
    assert options, name
    assert [a.option_strings[0] for a in options if not isinstance(a.type, NumberType)] == []


def _is_numeric(hint) -> bool:
    """int, float, Optional[...] of them, tuples of them."""
    return hint in (int, float) or any(_is_numeric(arg) for arg in typing.get_args(hint))


def _numeric_fields(cls) -> list[tuple[str, object]]:
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _numeric_fields(hint)
        elif _is_numeric(hint):
            out.append((f.name, f.metadata.get("range")))
    return out


def test_every_numeric_training_setting_declares_its_range_and_is_checked_however_it_is_built(tmp_path):
    """TrainConfig is built from the command line, from config.json on resume, and from Python: the field's
    declared range is checked in all three."""
    fields = _numeric_fields(TrainConfig)
    assert len(fields) > 20 and [name for name, kind in fields if kind is None] == []
    base = TrainConfig(out_dir=str(tmp_path), data=(DataSpec.parse("folder:a,masks=b"),))
    for name, kind in fields:
        bad = next(v for v in (-7, float("nan"), 10**12, 2.5) if not _accepts(kind, repr(v)))
        with pytest.raises(ValueError, match=name):
            _replace_field(base, name, bad)


def _replace_field(config, name, value):
    for f in dataclasses.fields(config):
        if f.name == name:
            current = getattr(config, name)
            return dataclasses.replace(config, **{name: (value,) * len(current) if isinstance(current, tuple) else value})
        sub = getattr(config, f.name)
        if dataclasses.is_dataclass(sub) and any(g.name == name for g in dataclasses.fields(sub)):
            return dataclasses.replace(config, **{f.name: _replace_field(sub, name, value)})
    raise AssertionError(name)


def _parse(name: str, argv: list[str], tmp_path: Path) -> None:
    if name == "encode":
        jobs.encode.parse_args([str(ROOT / "samples"), *argv])
    elif name == "preannotate":
        (tmp_path / "p.json").write_text('{"images": [], "annotations": [], "categories": []}')
        jobs.preannotate.parse_args(["--coco", str(tmp_path / "p.json"), "--image-root", str(ROOT / "samples"),
                                     "--coco-out", str(tmp_path / "out.json"), *argv])
    elif name == "evaluate":
        evaluation_cli.parse_args("interformer-evaluate", jobs.evaluate.__doc__, ["--baseline", "grabcut", "GrabCut",
                                                                                  *argv])
    elif name == "backend":
        backend_cli.build_parser().parse_args(["--variant", "small", *argv])
    else:
        jobs.train.parse_config(["--out-dir", str(tmp_path), "--data", "folder:a,masks=b", *argv])


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_out_of_range_values_are_usage_errors_naming_the_option(name, tmp_path, capsys):
    _parse(name, [], tmp_path)  # the base command line parses: every refusal below is the option's own
    for action in _numeric_options(_parsers()[name]):
        opt = action.option_strings[0]
        for value in HOSTILE:
            allowed = _accepts(action.type, value)
            if allowed and value != "nan":
                continue
            with pytest.raises(SystemExit) as exit_:
                _parse(name, [opt, value], tmp_path)
            assert exit_.value.code == 2, (opt, value)
            err = capsys.readouterr().err
            assert "error" in err and (opt in err or opt.lstrip("-").replace("-", "_") in err), (opt, value, err)


def _accepts(kind, value: str) -> bool:
    try:
        parsed = kind(value)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return False
    return not (isinstance(parsed, float) and not math.isfinite(parsed))


@given(lo=st.integers(-5, 5), span=st.integers(0, 10), value=st.integers(-20, 20))
def test_integer_accepts_exactly_its_range(lo, span, value):
    kind = integer(lo, lo + span)
    if lo <= value <= lo + span:
        assert kind(str(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f">= {lo} and <= {lo + span}"):
            kind(str(value))


@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6)),
       lo=st.floats(-10, 10), above=st.booleans())
def test_real_accepts_exactly_finite_values_in_its_range(value, lo, above):
    kind = real(above=lo) if above else real(lo)
    ok = math.isfinite(float(value)) and (value > lo if above else value >= lo)
    if ok:
        assert kind(repr(value)) == float(repr(value))
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="must be a number"):
            kind(repr(value))
