r"""Argument checks shared by the layers: each names the argument and the
values it accepts, so that a bad hyper-parameter (e.g. ``num_experts=2.0`` or
a string from the command line) fails at construction, not deep in PyTorch."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = ["check_int", "check_positive_float"]


def check_int(name: str, value: Any, low: int = 1, high: Optional[int] = None,
              note: str = "") -> int:
    r"""``value`` as an :obj:`int` in ``[low, high]``; raises a
    :class:`ValueError` naming ``name`` for anything else (floats, strings and
    booleans included)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value <= high):
        return int(value)
    allowed = (f"an integer in [{low}, {high}]{note}" if high is not None
               else "a positive integer" if low == 1
               else "a non-negative integer" if low == 0 else f"an integer >= {low}")
    raise ValueError(f"'{name}' must be {allowed} (got {value!r})")


def check_finite_float(name: str, value: Any) -> float:
    r"""``value`` as a finite :obj:`float` (zero and negatives allowed);
    raises a :class:`ValueError` naming ``name`` for anything else (booleans
    and strings included)."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value)):
        raise ValueError(f"'{name}' must be a finite number (got {value!r})")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    r"""``value`` as a finite positive :obj:`float`; raises a
    :class:`ValueError` naming ``name`` for anything else."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and float(value) > 0)
    if not ok:
        raise ValueError(f"'{name}' must be a finite positive number (got {value!r})")
    return float(value)
