"""Keep-FP32 search: per-module isolation, set-minimizing strategies, and bisect.

``isolate`` (:mod:`.isolate`) measures each module's local error alone under a target;
``bisect`` (:mod:`.bisect`) finds the smallest verified keep-FP32 set with a strategy from
:mod:`.strategies`.
"""
from __future__ import annotations

from .bisect import bisect
from .isolate import isolate
from .strategies import MinimalSetSearch

__all__ = ["bisect", "isolate", "MinimalSetSearch"]
