"""Validation of a policy's parameters from plain config data into its frozen dataclass.

Each policy owns one frozen parameters dataclass (units in field names, defaults in one
place). ``parse_params`` checks a mapping against it and names the key path on error, e.g.
``policy.params.weight: expected a number``. Besides the plain JSON types it reads a string into
an ``Enum`` field (by value), a mapping into a nested dataclass field (its keys checked the same
way, the path extended), and names a missing field that has no default as ``required``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

__all__ = ["ParamError", "parse_params"]

T = TypeVar("T")


class ParamError(ValueError):
    """A parameter failed validation; the message starts with its key path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _check(value: object, hint: Any, path: str) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, path)
            except ParamError as exc:
                errors.append(exc.problem)
        raise ParamError(path, " or ".join(errors))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(path, "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(path, "expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamError(path, "expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(path, "expected a string")
        return value
    if isinstance(hint, type) and issubclass(hint, Enum):
        values = [str(member.value) for member in hint]
        if not isinstance(value, str) or value not in values:
            raise ParamError(path, f"expected one of {', '.join(values)}")
        return hint(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ParamError(path, "expected a mapping")
        return parse_params(hint, value, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamError(path, "expected a list")
        (item_hint, *_rest) = typing.get_args(hint)
        return tuple(_check(v, item_hint, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ParamError(path, "expected a mapping")
        args = typing.get_args(hint)
        if args:
            return {str(k): _check(v, args[1], f"{path}.{k}") for k, v in value.items()}
        return dict(value)
    return value


def parse_params(cls: type[T], raw: Mapping[str, object] | None, path: str) -> T:
    """Build ``cls`` (a dataclass) from ``raw``; unknown keys and wrong types raise ParamError."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ParamError(path, "expected a mapping")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ParamError(f"{path}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(fields))})")
    values = {k: _check(v, hints[k], f"{path}.{k}") for k, v in raw.items()}
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in values:
            raise ParamError(f"{path}.{f.name}", "required")
    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__ range checks
        raise ParamError(path, str(exc)) from None
