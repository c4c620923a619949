"""Text of a weight check: the verdict sentence and the ranked table. Formatting only."""
from __future__ import annotations

import math

from tabulate import tabulate

from ..formats import HEAVY_UNDERFLOW as FLUSH_RISK_FRACTION

_TABLE_ROWS = 40
_VERDICT_NAMES = 5


def _names(rows: list, describe) -> str:
    shown = ", ".join(f"{r.name} ({describe(r)})" for r in rows[:_VERDICT_NAMES])
    more = len(rows) - _VERDICT_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def weights_verdict(rep) -> str:
    n = len(rep.rows)
    parts: list[str] = []
    if not rep.rows:
        parts.append("no floating-point tensors to check.")
    over = sorted(rep.overflowing, key=lambda r: -r.absmax)
    flush = sorted((r for r in rep.rows if "flush" in r.risks), key=lambda r: -r.flush_fraction)
    bad = [r for r in rep.rows if r.nonfinite]
    if over:
        parts.append(
            f"{len(over)} of {n} floating tensors {_plural(len(over), 'exceeds', 'exceed')} FP16 "
            f"range (|x| > 65504): "
            + _names(over, lambda r: f"absmax {r.absmax:.1e}, {r.beyond_fp16} values")
            + "."
        )
    if flush:
        parts.append(
            f"{len(flush)} of {n} {_plural(len(flush), 'flushes', 'flush')} more than "
            f"{FLUSH_RISK_FRACTION:.0%} of {_plural(len(flush), 'its', 'their')} values to zero in "
            "FP16: "
            + _names(flush, lambda r: f"{r.flush_fraction:.1%}")
            + "."
        )
    if bad:
        parts.append(
            f"{len(bad)} of {n} {_plural(len(bad), 'holds', 'hold')} NaN/Inf already: "
            + _names(bad, lambda r: f"{r.nonfinite} values")
            + "."
        )
    if rep.rows and not rep.at_risk:
        parts.append(f"All {n} floating tensors fit FP16 (no overflow, flush <= 1%, no NaN/Inf).")
    if rep.rows:
        top = max(rep.rows, key=lambda r: r.absmax)
        parts.append(
            f"Largest absmax {top.absmax:.1e} ({top.name}, {top.headroom_bits:.1f} bits of FP16 "
            "headroom)."
        )
    if rep.skipped:
        k = len(rep.skipped)
        shown = ", ".join(rep.skipped[:_VERDICT_NAMES]) + (
            f" and {k - _VERDICT_NAMES} more" if k > _VERDICT_NAMES else ""
        )
        parts.append(
            f"Skipped {k} {_plural(k, 'entry that is', 'entries that are')} not "
            f"{_plural(k, 'a floating-point tensor', 'floating-point tensors')} with values: {shown}."
        )
    return f"{rep.source}: " + " ".join(parts)


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}" if math.isfinite(x) else str(x)


def weights_text(rep) -> str:
    ranked = rep.ranked()
    shown = ranked[:_TABLE_ROWS]
    table = tabulate(
        [
            (
                r.name,
                r.dtype,
                "x".join(map(str, r.shape)) or "scalar",
                _fmt(r.absmax),
                r.beyond_fp16,
                r.fp16_flushed,
                r.bf16_flushed,
                r.nonfinite,
                _fmt(r.fp16_abs_err),
                _fmt(r.fp16_rel_err),
                _fmt(r.bf16_abs_err),
                _fmt(r.bf16_rel_err),
                ",".join(r.risks) or "-",
            )
            for r in shown
        ],
        headers=(
            "name", "dtype", "shape", "absmax", ">fp16", "fp16 flush", "bf16 flush", "nan/inf",
            "fp16 abs", "fp16 rel", "bf16 abs", "bf16 rel", "risk",
        ),
        disable_numparse=True,
    )
    more = len(ranked) - len(shown)
    tail = f"\n... {more} more tensors (all in report.rows)" if more > 0 else ""
    return f"{rep.verdict()}\n\n{table}{tail}"
