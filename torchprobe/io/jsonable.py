"""Floats for strict JSON, which has no inf or nan: written as the strings ``"inf"``, ``"-inf"``, ``"nan"``.

    >>> json_float(float("inf")), float_from_json("inf"), json_float(0.5)
    ('inf', inf, 0.5)
"""
from __future__ import annotations

import math


def json_float(x: float) -> float | str:
    """``x`` as it can stand in strict JSON: finite floats as they are, the others as strings."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def float_from_json(x: float | str) -> float:
    return float(x)
