"""Argument checks for the public functions of optimized/: each failure names the argument, the value given and what
is allowed, and is raised before any work is done.

    lr = real("lr", lr, minimum=0.0)                      # a finite number >= 0; True, "1e-3", nan, inf refused
    steps = integer("total_steps", total_steps, minimum=1)
    kind = one_of("name", name, ("sgd", "adam"))          # "adma" -> "... did you mean 'adam'?"

A bool is never a number here (True would silently be 1), a string never a number (no float("1") coercion), and a
0-d tensor is not a Python number either: these are the configuration knobs of a training run, where a wrong type is
a bug to report, not a value to convert.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor


class ArgumentError(ValueError, TypeError):
    """A bad argument: a wrong value or a wrong type (caught by `except ValueError` and by `except TypeError`)."""


def fail(name: str, value: Any, allowed: str) -> ArgumentError:
    """The error for argument `name`: "name must be <allowed>, got <value>"."""
    return ArgumentError(f"{name} must be {allowed}, got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bounds_text(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f" {'>' if min_open else '>='} {minimum:g}"
    if maximum is not None:
        return f" {'<' if max_open else '<='} {maximum:g}"
    return ""


def real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """`value` as a float: a real number (not a bool), never NaN, finite unless `allow_inf`, within the bounds."""
    ok = _is_real(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        raise fail(name, value, kind + _bounds_text(minimum, maximum, min_open, max_open))
    return float(value)


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    """`value` as an int: an integer (not a bool, not a float such as 2.0), >= `minimum`."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        minimum is not None and value < minimum
    ):
        raise fail(name, value, "an integer" + _bounds_text(minimum, None, False, False))
    return int(value)


def boolean(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """`value` itself when it is True or False (or None, if `optional`)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise fail(name, value, "True or False" + (" or None" if optional else ""))
    return value


def one_of(name: str, value: Any, allowed: Sequence[str], *, case_sensitive: bool = True) -> str:
    """`value` (lower-cased unless `case_sensitive`) when it is one of `allowed`; the error suggests a close name."""
    key = value if case_sensitive or not isinstance(value, str) else value.lower()
    if isinstance(key, str) and key in allowed:
        return key
    close = [] if not isinstance(key, str) or not key else (
        [a for a in allowed if key in a] or difflib.get_close_matches(key, allowed, n=3))
    hint = "" if not close else f" (did you mean {close[0]!r}?)" if len(close) == 1 else (
        f" (did you mean one of {', '.join(map(repr, close))}?)")
    raise ArgumentError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}{hint}")


def pair(name: str, value: Any, *, minimum: float, maximum: float, max_open: bool = False) -> tuple[float, float]:
    """A tuple or list of two real numbers, each within [minimum, maximum] (or [minimum, maximum))."""
    allowed = f"a pair of numbers, each{_bounds_text(minimum, maximum, False, max_open)}"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise fail(name, value, allowed)
    try:
        return tuple(real(name, v, minimum=minimum, maximum=maximum, max_open=max_open) for v in value)  # type: ignore[return-value]
    except ArgumentError:
        raise fail(name, value, allowed) from None


def function(name: str, value: Any) -> Callable[..., Any]:
    if not callable(value):
        raise fail(name, value, "a callable")
    return value


def tensors(name: str, value: Any, *, allow_none: bool = False) -> list[Any]:
    """An iterable of tensors (a single tensor counts as one) as a list; None entries kept only if `allow_none`."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise fail(name, value, "a tensor or an iterable of tensors")
    items = list(value)
    for i, t in enumerate(items):
        if not (isinstance(t, Tensor) or (allow_none and t is None)):
            raise ArgumentError(
                f"{name} must hold only tensors{' (or None)' if allow_none else ''}, got {t!r} at position {i}"
            )
    return items


def scalar_tensor(name: str, value: Any) -> Tensor:
    """A tensor of one element (a norm computed earlier)."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise fail(name, value, "a tensor of one element")
    return value
