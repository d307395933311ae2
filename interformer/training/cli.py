"""argparse options generated from a (nested) dataclass: one option per field, its help from the field metadata.

Nested dataclass fields are flattened (their own fields become top-level options), so names must be unique.
bool -> --x / --no-x; tuple[float, float] -> two values; tuple[DataSpec, ...] -> a repeatable option;
`X | None` -> optional. Fields without a default become required options.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, get_args, get_origin


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = get_args(tp)
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _with_message(parse: Any) -> Any:
    """A type converter whose ValueError text reaches the user (argparse would print only 'invalid value')."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, group_title: str | None = None) -> None:
    """Add one option per field of `cls` (recursively for nested dataclasses)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(group_title) if group_title else parser
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            add_dataclass_arguments(parser, tp, (tp.__doc__ or tp.__name__).strip().splitlines()[0])
            continue
        help_text = f.metadata.get("help")
        if not help_text:
            raise ValueError(f"{cls.__name__}.{f.name} has no help text")
        opt = "--" + f.name.replace("_", "-")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        base, optional = _unwrap_optional(tp)
        shown = has_default and default is not None
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text + (f" (default: {default})" if shown else "")}
        if base is bool and not optional:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif base is bool:
            kwargs.update(type=_parse_bool, default=default, metavar="true|false")
        elif get_origin(base) is tuple and len(get_args(base)) == 2 and get_args(base)[1] is Ellipsis:
            item = get_args(base)[0]
            kwargs.update(type=_with_message(getattr(item, "parse", item)), action="append", metavar="SPEC",
                          required=not has_default, default=None)
        elif get_origin(base) is tuple:
            kwargs.update(type=f.metadata.get("range", get_args(base)[0]), nargs=len(get_args(base)), default=default)
        else:
            kwargs.update(type=f.metadata.get("range", base), default=default, required=not has_default)
        group.add_argument(opt, **kwargs)


def build_dataclass(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate `cls` from a flat dict of parsed option values (nested dataclasses included)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            kwargs[f.name] = build_dataclass(tp, values)
        elif f.name in values and values[f.name] is not None:
            v = values[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = values.get(f.name)
    return cls(**kwargs)
