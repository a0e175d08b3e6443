"""Strict dataclass configs: the shape of every JSON file nbkit reads back.

`StrictConfig.from_dict` rejects unknown keys and wrong types with an error that names the key, the
file and the allowed keys, so a typo in a hand-edited `session.json` is caught instead of silently
ignored. Nested dataclasses, lists of dataclasses, Optional and the plain JSON types are supported.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar, Union

from nbkit.errors import NbkitError

C = TypeVar("C", bound="StrictConfig")


class StrictConfig:
    """Mixin for dataclasses loaded from JSON. Subclasses must be `@dataclasses.dataclass`."""

    @classmethod
    def from_dict(cls: type[C], data: Any, *, where: str = "config") -> C:
        """Build an instance from `data`, rejecting unknown keys and values of the wrong type.

        Args:
            data: a mapping, typically parsed JSON.
            where: a description of the source used in error messages, e.g. the file and key path.
        """
        return _build(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes`, each checked like `from_dict` would."""
        return type(self).from_dict({**self.to_dict(), **changes}, where=type(self).__name__)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise NbkitError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise NbkitError(
            f"unknown key '{key}' in {where}{hint}",
            fix=f"remove it; allowed keys are: {', '.join(fields)}",
        )
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except NbkitError as error:
                errors.append(error)
        raise errors[0]
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(option) for option in typing.get_args(hint))
            raise NbkitError(f"{where} is {value!r}; allowed values are {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise NbkitError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_coerce(item, element, f"{where}[{index}]") for index, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise NbkitError(f"{where} must be an object, got {type(value).__name__}")
        return dict(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise NbkitError(f"{where} must be a number, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise NbkitError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
