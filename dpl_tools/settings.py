"""Settings machinery: what a valid config value is (``Setting``, ``Range``), how a mapping
of values is checked against a table of settings, and how a settings dataclass is built from
a checked section. The table itself, every setting with its default, is
``dpl_tools.defaults``. Importing this module imports nothing heavy (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Range:
    """A closed or open interval of valid numbers (``None``: unbounded on that side)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """True when ``value`` lies in the interval."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
UNIT = Range(0, 1)  # probabilities, IoU thresholds, fractions
PERCENT = Range(0, 100, low_open=True)


class SettingError(ValueError):
    """A value that does not fit its setting (the message says why, without the key)."""


@dataclass(frozen=True)
class Setting:
    """One config key: its default and what a valid value is.

    The value type is the default's (``kind`` when the default is None; ``item`` for the
    elements of a list); ``nullable`` also allows None (null in YAML); ``keys`` is the
    table a mapping's own keys are checked against (``model.detector_kwargs``); ``help``
    says what the setting does.
    """

    default: Any
    help: str = ""
    range: Range | None = None
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    kind: type | None = None
    item: type | None = None
    keys: Mapping[str, Setting] | None = None
    pair: bool = False  # a list that is an ordered [low, high] pair

    @property
    def type(self) -> type:
        return self.kind or type(self.default)

    def check(self, value: Any) -> Any:
        """``value`` in its canonical type (an integral float becomes int for an int
        setting, list items likewise), or a ``SettingError`` saying what is wrong."""
        if value is None:
            if self.nullable:
                return None
            raise SettingError(f"expected {_describe(self)}, got null")
        if self.type is list:
            if not isinstance(value, list):
                raise SettingError(f"expected {_describe(self)}, got {_shown(value)}")
            item = Setting(None, range=self.range, kind=self.item or float)
            out = []
            for i, v in enumerate(value):
                try:
                    out.append(item.check(v))
                except SettingError as e:
                    raise SettingError(f"item {i}: {e}") from None
            if self.pair and (len(out) != 2 or out[0] > out[1]):
                raise SettingError(f"expected [low, high] with low <= high, got {out}")
            return out
        if self.type is dict:
            if not isinstance(value, dict):
                raise SettingError(f"expected a mapping, got {_shown(value)}")
            return dict(value)  # keys are checked by ``check_mapping``
        value = _typed(self.type, value, self)
        if self.choices is not None and value not in self.choices:
            raise SettingError(f"{value!r} is not one of {', '.join(self.choices)}")
        if self.range is not None and not self.range.contains(value):
            raise SettingError(f"must be {self.range}, got {value:g}")
        return value


def _describe(setting: Setting) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    if setting.type is list:
        return f"a list of {'integers' if setting.item is int else 'numbers'}"
    if setting.type is dict:
        return "a mapping"
    return names.get(setting.type, setting.type.__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:40]}..." if len(text) > 40 else text


def _typed(kind: type, value: Any, setting: Setting) -> Any:
    """``value`` as ``kind`` (bool, int, float or str), without lossy conversions."""
    wrong = SettingError(f"expected {_describe(setting)}, got {_shown(value)}")
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise wrong
    if not math.isfinite(value):
        raise SettingError(f"expected a finite number, got {value}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise wrong
        return int(value)
    return float(value)  # an int is a valid number where a float is expected


def check_mapping(
    values: Mapping[str, Any], table: Mapping[str, Setting], prefix: str = ""
) -> dict[str, Any]:
    """``values`` checked against ``table`` (unknown keys, types, ranges), in canonical
    types; a ``SettingError`` names the key as ``prefix + key`` (e.g. ``teacher.iters``),
    with a did-you-mean for a typo. Mappings with a ``keys`` table are checked inside."""
    out = {}
    for key, value in values.items():
        if key not in table:
            raise SettingError(unknown(f"key {prefix}", key, table))
        setting = table[key]
        try:
            out[key] = setting.check(value)
        except SettingError as e:
            raise SettingError(f"{prefix}{key}: {e}") from None
        if setting.keys is not None and out[key]:
            out[key] = check_mapping(out[key], setting.keys, f"{prefix}{key}.")
    return out


def unknown(what: str, name: Any, known: Mapping[str, Any] | list[str]) -> str:
    """``unknown key teacher.iter (did you mean iters?)``, or the list of known names."""
    import difflib

    names = list(known)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(names)}"
    return f"unknown {what}{name} ({hint})"


def settings_from_section(cls: type, section: Mapping[str, Any], **overrides: Any) -> Any:
    """A settings dataclass built from a config section: its fields that the section has
    (other keys ignored), each converted to the field default's type (int / float, list
    items likewise), the others at the dataclass defaults (which come from this table)."""
    values = {**section, **overrides}
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        kwargs[f.name] = _like(default, values[f.name])
    return cls(**kwargs)


def _like(default: Any, value: Any) -> Any:
    """``value`` converted to ``default``'s number type (lists item by item)."""
    if isinstance(default, list) and isinstance(value, list | tuple):  # a Config holds tuples
        return [_like(default[0], v) for v in value] if default else list(value)
    if value is None or isinstance(value, bool) or isinstance(default, bool):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value
