"""The rules a config value must follow (`Spec`) and their builders: `number(0, 1)`, `choice("a", "b")`, ...

Shared by the schema of the core config groups (schema.py) and by every technique, which declares its own keys
with them (`keys` in its file under regularizers/). Every rule carries the words of its error message: a bad value
is reported as "key=value: expected <allowed>".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    """One key's rule: `check(value)` returns True when the value is allowed; `allowed` says what is."""

    check: Callable[[object], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Spec:
    text = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    return Spec(lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi), text)


def number(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False) -> Spec:
    """A finite float or int in the interval lo..hi (brackets as written in `allowed`)."""

    def check(v) -> bool:
        if not _is_number(v):
            return False
        above = lo is None or (v > lo if lo_open else v >= lo)
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    if lo is not None and hi is not None:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a number {'>' if lo_open else '>='} {lo:g}"
    else:
        text = "a number"
    return Spec(check, text)


def choice(*options) -> Spec:
    return Spec(lambda v: v in options, "one of " + ", ".join(str(o) for o in options))


def boolean() -> Spec:
    return Spec(lambda v: isinstance(v, bool), "true or false")


def text() -> Spec:
    return Spec(lambda v: isinstance(v, str) and v != "", "a non-empty string")


def optional(spec: Spec) -> Spec:
    return Spec(lambda v: v is None or spec.check(v), f"null or {spec.allowed}")


def int_list(lo: int = 1) -> Spec:
    return Spec(
        lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) and x >= lo for x in v),
        f"a list of integers >= {lo}, e.g. [100, 100]",
    )


def string_list() -> Spec:
    return Spec(
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), "a list of strings"
    )


def either(*specs: Spec) -> Spec:
    return Spec(lambda v: any(s.check(v) for s in specs), " or ".join(s.allowed for s in specs))


def float_pair() -> Spec:
    return Spec(
        lambda v: (
            isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1), e.g. [0.9, 0.999]",
    )


PROBABILITY = number(0, 1, hi_open=True)
IMPL = choice("scratch", "torch")
