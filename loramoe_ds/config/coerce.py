"""Coerce config values to their dataclass field's annotated type, with one-line errors.

Config values arrive from YAML (PyYAML reads ``lr: 2e-4`` as the *string*
``"2e-4"``: YAML 1.1 floats need a dot) and from ``key=value`` command-line
overrides. Before a config dataclass is built, every value is checked against
its field's type annotation and converted where the conversion is lossless:

============================  =====================================================
annotation                    accepted (converted to the annotated type)
============================  =====================================================
``float``                     finite int, float or numeric string (``"2e-4"``)
``int``                       int, integral float (``1e3``), integral numeric string
``bool``                      bool, ``"true"/"false"/"yes"/"no"/"on"/"off"``
``str``                       str; an int/float is written back as text
``X | None``                  ``None`` or anything ``X`` accepts
``list[X]``, ``tuple[X, ...]`` a list/tuple of ``X`` (a single ``X`` becomes a 1-list)
``dict[K, V]``                a mapping, values as ``V``
``A | B | ...``               the first member that accepts the value, in order
============================  =====================================================

Anything else (a bool for an int, ``"abc"`` for a float, ``None`` for a
non-optional field) raises ``ValueError("train.lr='abc': expected a float ...")``
naming the field, the value and the expected type. Range checks stay in each
dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

_TRUE = ("true", "yes", "on")
_FALSE = ("false", "no", "off")


class _RejectError(Exception):
    """Internal: the value does not fit the annotation."""


def _describe(tp: Any) -> str:
    """Human name of an annotation: ``a float``, ``a list of str``, ``an int or null``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        text = " or ".join(_describe(a) for a in members)
        return text + (" or null" if len(members) < len(typing.get_args(tp)) else "")
    if origin in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[-1]}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_describe(k).split(' ', 1)[-1]} to {_describe(v).split(' ', 1)[-1]}"
    name = {float: "float (a number such as 2e-4)", bool: "bool (true or false)"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )
    return ("an " if name[0] in "aeiou" else "a ") + name


def _to_number(value: Any, want: type) -> int | float:
    if isinstance(value, bool):
        raise _RejectError
    if isinstance(value, str):
        try:
            value = float(value.strip()) if want is float else _int_from_text(value.strip())
        except ValueError:
            raise _RejectError from None
    if not isinstance(value, (int, float)):
        raise _RejectError
    if not math.isfinite(value):
        raise _RejectError
    if want is float:
        return float(value)
    if isinstance(value, float):
        if value != int(value):
            raise _RejectError
        return int(value)
    return value


def _int_from_text(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return _to_number(float(text), int)  # "1e3" -> 1000; "2.5" rejects


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``; raises :class:`_RejectError`."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None:
            if type(None) in members:
                return None
            raise _RejectError
        # An exact type match wins (an int for ``int | list[int] | str`` stays an int).
        for m in members:
            base = typing.get_origin(m) or m
            if isinstance(base, type) and type(value) is base:
                return _coerce(value, m)
        for m in members:
            if m is type(None):
                continue
            try:
                return _coerce(value, m)
            except _RejectError:
                pass
        raise _RejectError
    if value is None:
        raise _RejectError
    if origin in (list, tuple):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        seq = list(value) if isinstance(value, (list, tuple)) else [value]
        out = [_coerce(v, item) for v in seq]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _RejectError
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, k_tp): _coerce(v, v_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _RejectError
    if tp in (int, float):
        return _to_number(value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _RejectError
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):  # a nested config entry
        hints = typing.get_type_hints(tp)
        return {k: _coerce(v, hints[k]) if k in hints else v for k, v in value.items()}
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _RejectError
    return value


def coerce_value(value: Any, tp: Any, name: str) -> Any:
    """Convert one value to annotation ``tp``.

    Args:
        value: The raw value (from YAML, JSON or a command-line override).
        tp: The field's resolved type annotation.
        name: ``section.field`` for the error message.

    Returns:
        The value as ``tp`` (see the module table).

    Raises:
        ValueError: ``name=value: expected <type>``.
    """
    try:
        return _coerce(value, tp)
    except _RejectError:
        raise ValueError(f"{name}={value!r}: expected {_describe(tp)}") from None


def coerce_fields(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """Coerce a mapping of keyword arguments for dataclass ``cls`` field by field.

    Keys that are not fields of ``cls`` are passed through (the caller reports
    them). Works for any dataclass whose annotations resolve with
    ``typing.get_type_hints``.

    Args:
        cls: The config dataclass.
        values: ``field -> raw value``.
        section: Prefix for error messages, e.g. ``"train"``.

    Returns:
        A new dict with every known field converted to its annotated type.

    Raises:
        ValueError: Naming ``section.field``, the value and the expected type.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = dict(values)
    for key, value in values.items():
        if key in fields and key in hints:
            out[key] = coerce_value(value, hints[key], f"{section}.{key}")
    return out
