"""A declared config key: its type, valid range and an example, and the one-line refusal
(``key=value must be ...; e.g. key=...``) that every check of :mod:`skipstudy.config` prints."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from skipstudy.errors import ConfigError


def show(value: Any) -> str:
    """A value as an override would write it: ``true``, ``null``, ``[100,150]``, ``adam``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class Key:
    """One key: ``accepts(value)``, words for the valid range, an example value, and
    ``bad_range``: a value of the right type outside the range, for the test that walks every key."""

    def __init__(self, accepts: Callable[[Any], bool], valid: str, eg: Any, bad_range: Any = None,
                 null: bool = False, choices: tuple = ()) -> None:
        self._accepts, self.valid, self.eg, self.null, self.choices = accepts, valid, eg, null, choices
        self.bad_range = bad_range

    def accepts(self, value: Any) -> bool:
        return (self.null and value is None) or (value is not None and self._accepts(value))

    def check(self, key: str, value: Any) -> None:
        if not self.accepts(value):
            words = "is not one of:" if self.choices and not self.null else "must be"
            raise ConfigError(f"{key}={value!r} {words} {self.valid}{' or null' if self.null else ''}; "
                              f"e.g. {key}={show(self.eg)}")

    def __or__(self, other: Key) -> Key:
        oob = [v for v in (self.bad_range, other.bad_range) if v is not None and not (self.accepts(v) or other.accepts(v))]
        return Key(lambda v: self.accepts(v) or other.accepts(v), f"{self.valid} or {other.valid}", self.eg,
                   oob[0] if oob else None, self.null or other.null)

    def nullable(self) -> Key:
        return Key(self._accepts, self.valid, self.eg, self.bad_range, True, self.choices)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, noun: str) -> str:
    a = f"{'an' if noun == 'integer' else 'a'} {noun}"
    if hi is None and lo is not None and ((lo == 0 and lo_open) or (noun == "integer" and lo == 1)):
        return f"a positive {noun}"
    if hi is None:
        return a if lo is None else f"{a} {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f"{a} {'<' if hi_open else '<='} {hi}"
    return f"{a} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def Num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
        eg: Any, null: bool = False, integer: bool = False,
        rule: tuple[Callable[[int], bool], str, int] | None = None) -> Key:
    """A finite number (an integer if ``integer``) in the interval ``lo..hi``; ``rule`` =
    (predicate, words for all valid values, a value it refuses)."""
    def ok(v: Any) -> bool:
        return (isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
                and (integer or math.isfinite(v)) and (rule is None or rule[0](v))
                and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi)))
    if rule is not None:
        return Key(ok, rule[1], eg, rule[2], null)
    bad = (lo if lo_open else lo - 1) if lo is not None else (hi if hi_open else hi + 1) if hi is not None else None
    return Key(ok, _interval(lo, hi, lo_open, hi_open, "integer" if integer else "number"), eg, bad, null)


def Int(lo: int | None = None, hi: int | None = None, **kwargs: Any) -> Key:
    return Num(lo, hi, integer=True, **kwargs)


def Bool(*, eg: bool = True, null: bool = False) -> Key:
    return Key(lambda v: isinstance(v, bool), "true or false", eg, None, null)


def Choice(*choices: Any, null: bool = False) -> Key:
    return Key(lambda v: any(v == c and type(v) is type(c) for c in choices), ", ".join(show(c) for c in choices),
               choices[0], "nosuch", null, choices)


def Str(*, eg: str, null: bool = False, pattern: str | None = None, form: str = "a string") -> Key:
    """A string (a path, a name; numbers pass as their text), or one of the form ``pattern``."""
    def ok(v: Any) -> bool:
        if pattern is not None:
            return isinstance(v, str) and re.fullmatch(pattern, v) is not None
        return isinstance(v, (str, int, float)) and not isinstance(v, bool)
    return Key(ok, form, eg, "abc!" if pattern else None, null)


def List(item: Key, *, eg: list, size: int | None = None, distinct: bool = False, null: bool = False) -> Key:
    """A list of ``item`` values (``size`` of them if given)."""
    def ok(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and all(item.accepts(x) for x in v) and \
            (size is None or len(v) == size) and (not distinct or len(set(map(str, v))) == len(v))
    words = f"a list of {size} " if size else "a list of "
    valid = f"{words}{'different ' if distinct else ''}values, each {'one of: ' if item.choices else ''}{item.valid}"
    return Key(ok, valid, eg, [item.bad_range if item.bad_range is not None else [[]]], null)
