"""Knob metadata: what a config key means and which values it takes, declared beside its field.

A method's `Params` (and a training table's dataclass) declares each field with `knob`:

    threshold: float = knob(0.1, "exit when the uncertainty is <= threshold", at_least=0, at_most=1)

`knob` returns an ordinary `dataclasses.field`, so defaults and loading are unchanged; the metadata
feeds `adadiff-bench methods NAME` and docs/config.md. The class's `validate` stays the check that
runs; tests/test_knobs.py holds every declared range and choice against it, so the two cannot drift.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

METADATA_KEY = "adadiff_bench.knob"


@dataclass(frozen=True)
class Bounds:
    """A closed, open or half-open interval of numbers; None is unbounded on that side."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "any number"


def _number(value: float | None) -> str:
    """A whole-number bound without a decimal point (a seed's 2^63 - 1 exactly), any other as Python writes it."""
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def bounds(*, at_least: float | None = None, above: float | None = None,
           at_most: float | None = None, below: float | None = None) -> Bounds | None:
    """The interval `at_least`/`above` .. `at_most`/`below` (None when no side is given)."""
    if at_least is not None and above is not None or at_most is not None and below is not None:
        raise ValueError("give at most one lower bound (at_least or above) and one upper bound (at_most or below)")
    low, high = (at_least if above is None else above), (at_most if below is None else below)
    if low is None and high is None:
        return None
    return Bounds(low, high, low_open=above is not None, high_open=below is not None)


@dataclass(frozen=True)
class KnobInfo:
    """One knob's documentation: its meaning and the values `validate` accepts.

    `choices`: the accepted strings (or a function returning them, for open registries);
    `bounds`: the accepted numbers (for a list, every item's); `bounds_by`: (other knob, {its value:
    bounds}) where the range depends on another knob; `needs`: knobs that must be set for this one to
    be accepted; `valid`: the accepted values in words where they cannot be listed (a path, a format).
    """
    meaning: str
    choices: tuple[str, ...] | Callable[[], Iterable[str]] = ()
    bounds: Bounds | None = None
    bounds_by: tuple[str, dict[str, Bounds]] | None = None
    needs: tuple[str, ...] = ()
    valid: str = ""

    def choice_list(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def valid_text(self) -> str:
        """The accepted values in one phrase, e.g. `[0, 1]` or `per-sample | per-batch`."""
        parts = []
        if self.choice_list():
            parts.append(" | ".join('""' if c == "" else c for c in self.choice_list()))
        if self.bounds is not None:
            parts.append(str(self.bounds))
        if self.bounds_by is not None:
            other, by_value = self.bounds_by
            parts.append("; ".join(f'{b} when {other} = "{value}"' for value, b in by_value.items()))
        if self.valid:
            parts.append(self.valid)
        if self.needs:
            parts.append("needs " + ", ".join(f"`{n}`" for n in self.needs))
        return "; ".join(parts)


def describe(meaning: str, *, choices: tuple[str, ...] | Callable[[], Iterable[str]] = (),
             at_least: float | None = None, above: float | None = None, at_most: float | None = None,
             below: float | None = None, bounds_by: tuple[str, dict[str, Bounds]] | None = None,
             needs: tuple[str, ...] = (), valid: str = "") -> KnobInfo:
    """A knob's documentation: its meaning, choices, interval (`at_least`/`above`, `at_most`/`below`)."""
    return KnobInfo(meaning, choices, bounds(at_least=at_least, above=above, at_most=at_most, below=below),
                    bounds_by, tuple(needs), valid)


def knob(default: Any, meaning: str, **documentation) -> Any:
    """A dataclass field with `default` and its documentation (keywords as `describe`)."""
    metadata = {METADATA_KEY: describe(meaning, **documentation)}
    if isinstance(default, (list, dict)):  # a mutable default: a fresh copy per instance
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def knob_info(field: dataclasses.Field) -> KnobInfo | None:
    return field.metadata.get(METADATA_KEY)


@dataclass(frozen=True)
class KnobRow:
    """One line of a knob table: name, type, default, valid values and meaning, as text."""
    name: str
    type: str
    default: str
    valid: str
    meaning: str


def knob_rows(cls: type, described: dict[str, KnobInfo] | None = None) -> list[KnobRow]:
    """The knobs of dataclass `cls`, in declaration order. Documentation comes from each field's `knob`
    metadata, or from `described` (for dataclasses documented elsewhere); nested dataclasses are skipped."""
    hints = typing.get_type_hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            continue
        info = knob_info(field) or (described or {}).get(field.name)
        rows.append(KnobRow(field.name, type_name(hints[field.name]), default_text(field),
                            info.valid_text() if info else "", info.meaning if info else ""))
    return rows


def type_name(hint: Any) -> str:
    """A type as a TOML user reads it: int, float, bool, str, list of float, str or none."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "table"
    if hint is type(None):
        return "none"
    if hint is Any:
        return "any"
    return getattr(hint, "__name__", str(hint))


def default_text(field: dataclasses.Field) -> str:
    """The default as it would be written in TOML (`"..."`, true/false, numbers, lists); `(none)` for None."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return toml_value(value)


def toml_value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        return type(value).__name__
    return str(value)
