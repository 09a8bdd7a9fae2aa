"""A method's options from text (``--opt key=value``, bench.toml's ``method_options``), by each field's
declared type, with one-line errors naming the bad value and what the method accepts."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dbench.errors import DbenchError


def parse_options(stage_cls: type, raw: dict[str, str]) -> Any:
    """Turn ``{"name": "text"}`` from the command line into the method's Options, by each field's declared type."""
    fields = {f.name: f for f in dataclasses.fields(stage_cls.Options)}
    hints = typing.get_type_hints(stage_cls.Options)
    values: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise DbenchError(f"option {key!r} does not apply to method {stage_cls.name!r}; its options: {known}")
        kinds = _accepted_types(hints[key], stage_cls.name, key)
        try:
            values[key] = _parse_value(kinds, text)
        except ValueError:
            expected = " or ".join("none" if k is type(None) else k.__name__ for k in kinds)
            raise DbenchError(f"bad value {text!r} for option {key!r} of {stage_cls.name!r}: expected {expected}") from None
    options = stage_cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


PARSEABLE = (bool, int, float, str, type(None))


def _accepted_types(hint: Any, method: str, key: str) -> tuple[type, ...]:
    """The types an option's text may become: its declared type, or each member of a union (``int | None``)."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    unsupported = [k for k in kinds if k not in PARSEABLE]
    if unsupported:
        raise DbenchError(f"method {method!r} declares option {key!r} as {hint}: options may be "
                          f"bool, int, float, str or None and unions of these")
    return kinds


def _parse_value(kinds: tuple[type, ...], text: str) -> Any:
    """The first of ``kinds`` (in a fixed order: none, bool, int, float, str) that reads ``text``."""
    for kind in sorted(kinds, key=PARSEABLE.index):
        try:
            return _parse_as(kind, text)
        except ValueError:
            continue
    raise ValueError(text)


def _parse_as(kind: type, text: str) -> Any:
    if kind is type(None):
        if text.lower() in ("none", "null"):
            return None
        raise ValueError(text)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    return kind(text)
