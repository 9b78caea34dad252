"""Strict type checks of option values from config files, recipes and adapter configs.

A value must already have its option's type: JSON ``"false"`` is a string, not a boolean, and
``"0.5"`` is not a number. Nothing is coerced by truthiness, so a quoted value can never turn
an option on (``"overwrite": "false"``, ``"allow_pickle": "false"``); it is an error naming the
option, the value and the type wanted.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Optional, Union

_NONE = type(None)
#: Type words for messages.
_WANTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}


def kind_of(value: Any) -> str:
    """How a value reads in a message: ``a string 'false'``, ``a number 2``."""
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"a number {value!r}"
    if isinstance(value, str):
        return f"a string {value!r}"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def is_number(value: Any) -> bool:
    """An int or float, not a bool (JSON true is not 1 here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (bool, int, float, str, dict, list, list[X], Optional[X])."""
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if hint is _NONE:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_integer(value)
    if hint is float:
        return is_number(value)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """The type ``hint`` in words: ``true or false``, ``a list of numbers or null``."""
    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not _NONE]
        words = " or ".join(describe(a) for a in args)
        return f"{words} or null" if len(args) < len(typing.get_args(hint)) else words
    if origin is list:
        (item,) = typing.get_args(hint)
        return "a list of " + {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}.get(item, "values")
    if origin is dict:
        return "an object"
    return _WANTED.get(hint, getattr(hint, "__name__", str(hint)))


def type_problem(name: str, value: Any, hint: Any) -> Optional[str]:
    """None when ``value`` fits ``hint``, else ``option NAME: got ..., expected ...``."""
    if matches(value, hint):
        return None
    return f"option {name}: got {kind_of(value)}, expected {describe(hint)}"


def hints_of(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass's fields (string annotations evaluated)."""
    return typing.get_type_hints(cls)


def finite_float32(value: float) -> bool:
    """Whether a number stays finite in float32, the precision merges compute in."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


#: Largest finite float32.
FLOAT32_MAX = 3.4028234663852886e38
