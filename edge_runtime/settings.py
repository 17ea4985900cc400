"""One settings loader: TOML sections into frozen dataclasses, with every mistake named.

The trainer's ``[env]``/``[timing]`` and ``[train]``/``[ppo]`` files and a controller's device file all
go through here, so an unknown key, a wrong type or a missing value reads the same everywhere:
``<file>: [<section>] <key> = <value> should be <type>``. Values are converted by the dataclass's type
hints (ints are accepted where floats are expected, TOML lists become tuples, paths are resolved against
the file's folder); choices (``Literal`` fields) are left to the dataclass, which names the valid ones.
Dependency-light: the controller uses it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from edge_runtime.errors import RELEDError
from edge_runtime.fileio import read_toml

T = TypeVar("T")


def read_sections(path: Path, allowed: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The file's tables by section name; unknown sections and non-table values are refused."""
    allowed = list(allowed)
    data = read_toml(path)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RELEDError(f"{path}: unknown section(s) {unknown}; expected {', '.join(f'[{s}]' for s in allowed)}")
    for name, values in data.items():
        if not isinstance(values, dict):
            raise RELEDError(f"{path}: {name!r} must be a [{name}] section")
    return data


def settings_keys(cls: type, exclude: Iterable[str] = ()) -> set[str]:
    """Names a section may set: the dataclass's fields less the excluded (nested or derived) ones."""
    return {f.name for f in dataclasses.fields(cls)} - set(exclude)


def section_values(source: str, section: str, values: Mapping[str, Any], cls: type, *,
                   allowed: Iterable[str] | None = None, base: Path | None = None) -> dict[str, Any]:
    """``values`` checked against ``cls``'s fields (or ``allowed``) and converted to their types."""
    allowed = settings_keys(cls) if allowed is None else set(allowed)
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RELEDError(f"{source}: unknown key(s) {unknown} in [{section}]; allowed: {', '.join(sorted(allowed))}")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            out[key] = convert(value, hints[key], base)
        except (TypeError, ValueError) as exc:
            raise RELEDError(f"{source}: [{section}] {key} = {value!r} should be {exc}") from None
    return out


def build_section(source: str, section: str, values: Mapping[str, Any], cls: type[T], *,
                  allowed: Iterable[str] | None = None, base: Path | None = None, **fixed: Any) -> T:
    """A ``cls`` from a section's values (plus ``fixed`` keyword arguments that do not come from the file)."""
    kwargs = section_values(source, section, values, cls, allowed=allowed, base=base)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs and f.name not in fixed
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RELEDError(f"{source}: [{section}] is missing {', '.join(repr(m) for m in missing)}")
    try:
        return cls(**kwargs, **fixed)
    except (TypeError, ValueError) as exc:
        raise RELEDError(f"{source}: [{section}] {exc}") from exc


def convert(value: Any, expected: Any, base: Path | None = None) -> Any:
    """``value`` as ``expected``; raises TypeError with the expected type's name when it does not fit."""
    origin = typing.get_origin(expected)
    if origin is Literal:
        return value  # the dataclass itself refuses a wrong choice, naming the valid ones
    if origin in (types.UnionType, typing.Union):
        if value == "" and type(None) in typing.get_args(expected):
            return None  # an empty string switches an optional setting off
        for option in typing.get_args(expected):
            try:
                return convert(value, option, base)
            except TypeError:
                continue
        raise TypeError(type_name(expected))
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError("a list")
        item = typing.get_args(expected)[0] if typing.get_args(expected) else Any
        return tuple(convert(v, item, base) for v in value)
    if expected is type(None):
        if value is not None:
            raise TypeError("none")
        return None
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("float")
        return float(value)
    if expected is int or expected is bool:
        if type(value) is not expected:
            raise TypeError(expected.__name__)
        return value
    if expected is Path:
        if not isinstance(value, str | Path) or str(value) == "":
            raise TypeError("a path")
        return (base / value).resolve() if base is not None else Path(value)
    if expected is str:
        if not isinstance(value, str):
            raise TypeError("str")
        return value
    return value  # Any, or a nested dataclass its own section builds


def type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(expected))
    return "none" if expected is type(None) else getattr(expected, "__name__", str(expected))
