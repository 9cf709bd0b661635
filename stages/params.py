"""Read one section of ``params.yaml`` into a stage's dataclass, strictly.

Every stage has exactly one dataclass mirrored 1:1 by its ``params.yaml`` section (DVC tracks the section via
``params: [<stage>]`` in ``dvc.yaml``). A missing key, an unknown key or a wrongly typed value is a one-line
:class:`ParamsError` naming ``params.yaml`` and the dotted key, e.g. ``params.yaml: pretrain.train.lr: expected
a number, got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gptlab.errors import UserError
from gptlab.fileio import read_utf8

PARAMS_FILE = Path("params.yaml")
T = TypeVar("T")


class ParamsError(UserError):
    """Bad params.yaml content; the message names the file and the dotted key."""


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the repository root)")
    try:
        data = yaml.safe_load(read_utf8(path))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of stage sections")
    return data


def load_section(section: str, cls: type[T], path: str | Path = PARAMS_FILE) -> T:
    """``params.yaml[section]`` validated into ``cls`` (a dataclass, possibly nested)."""
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path}: missing section {section!r}")
    return from_dict(cls, data[section], f"{path}: {section}")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``data``; every key required unless the field has a default."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{where}.{name}: missing")
            continue
        values[name] = _coerce(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, where)
        errors = []
        for arg in options:
            try:
                return _coerce(arg, value, where)
            except ParamsError as exc:
                errors.append(str(exc).split(": ")[-1])
        raise ParamsError(f"{where}: {' or '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `5e-5` as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return origin(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = args or (Any, Any)
        return {_coerce(key_t, k, where): _coerce(val_t, v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported params type {tp!r} at {where}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming ``key`` unless ``value`` is one of ``choices`` (for a params dataclass's __post_init__)."""
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def section_keys(cls: type) -> set[str]:
    """Top-level keys a section for ``cls`` may hold (for the params/dataclass/dvc.yaml agreement test)."""
    return {f.name for f in dataclasses.fields(cls)}
