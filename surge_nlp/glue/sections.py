"""Recipe sections that are small frozen dataclasses (`augmentation`, `selection`): one reader for
their mappings and one wording for their errors, which name the field and the allowed values.

Example:
    >>> from surge_nlp.glue.selection import Selection
    >>> from_section(Selection, "selection", {"held_out": 0.1})
    Selection(held_out=0.1, seed=0)
    >>> from_section(Selection, "selection", None)
    Selection(held_out=0.0, seed=0)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def invalid(section: str, name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{section}.{name}={value!r} is invalid; allowed values: {allowed}")


def check_int(section: str, name: str, value: Any) -> None:
    """Raise `invalid` unless `value` is an int (a bool is not: YAML's `yes` would pass otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(section, name, value, "an integer")


def from_section(cls: type[T], section: str, data: dict[str, Any] | None) -> T:
    """`cls` from a recipe's `section` mapping (None: the defaults); unknown keys raise ValueError."""
    settings = [field.name for field in fields(cls)]
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{section} must be a mapping with keys among {', '.join(settings)}; got {data!r}")
    unknown = sorted(set(data) - set(settings))
    if unknown:
        raise ValueError(f"{section} has no setting(s) {unknown}; allowed: {settings}")
    return cls(**data)
