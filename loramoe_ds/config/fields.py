"""What every config section shares: the one ``from_dict`` and the one choice check.

Every user-input error of a section reads ``section.field=value: what is wrong``
(``adapter.rank=0: must be an int >= 1``, ``train.loss_reduction='sum': valid
values [...]``); a run config prefixes the file it came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from loramoe_ds.config.coerce import coerce_fields

T = TypeVar("T")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Refuse a value outside ``choices``.

    Args:
        name: ``section.field`` for the message.

    Raises:
        ValueError: ``section.field=value: valid values [...]``.
    """
    if value not in choices:
        raise ValueError(f"{name}={value!r}: valid values {list(choices)}")


def section_from_dict(cls: type[T], d: dict[str, Any], section: str) -> T:
    """Build a config section from a mapping: unknown keys refused, values coerced.

    Raises:
        ValueError: ``section 'name': unknown field(s) [...]; valid fields: [...]``,
            or a value of the wrong type or range (``section.field=value: ...``).
    """
    if not isinstance(d, dict):
        raise ValueError(f"section {section!r} must be a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"section {section!r}: unknown field(s) {unknown}; valid fields: {sorted(names)}"
        )
    return cls(**coerce_fields(cls, d, section))
