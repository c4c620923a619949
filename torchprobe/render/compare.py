"""Text of a dump comparison: verdict line, sources, the per-tensor table in call order.

Formatting only; every number comes from the :class:`~torchprobe.compare.DumpComparison`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from tabulate import tabulate

from ..metrics import get_metric


def comparison_verdict(cmp) -> str:
    """One line: how many tensors diverge and where the first divergence is."""
    n = len(cmp.rows)
    m = get_metric(cmp.metric)
    rule = f"{cmp.metric} {'<' if m.higher_is_better else '>'} {m.bound(cmp.tol):g}"
    missing = f"{len(cmp.missing)} of a's tensors missing from b" if cmp.missing else ""
    if n == 0:
        return (
            f"no tensors in common: {len(cmp.missing)} in a are missing from b, "
            f"{len(cmp.extra)} in b are not in a; pass mapping= to match their names"
        )
    failing = cmp.diverging()
    if failing:
        first = failing[0]
        verb = "diverges" if len(failing) == 1 else "diverge"
        line = (
            f"{len(failing)} of {n} tensors {verb} ({rule}); first divergence: {_name(first)} "
            f"({_why(cmp, first)})"
        )
        return f"{line}; {missing}" if missing else line
    ok_rule = m.rule(cmp.tol)
    worst = max(cmp.rows, key=cmp.badness)
    worst_text = f"worst: {_name(worst)} ({cmp.metric} {_num(worst.metrics[cmp.metric])})"
    if missing:
        return f"all {n} common tensors match ({ok_rule}), but {missing}; {worst_text}"
    return f"all {n} tensors match ({ok_rule}); {worst_text}"

def comparison_text(cmp, max_rows: int | None = 40, context: int = 2) -> str:
    """Verdict, sources, a table in call order, then missing and extra keys.

    Tables longer than ``max_rows`` keep the diverging rows (else the worst ones) with
    ``context`` rows around each, and the last row; skipped stretches read ``... N more``.
    """
    lines = [
        comparison_verdict(cmp),
        f"a: {cmp.a}{_bracket(cmp.target_a)}   b: {cmp.b}{_bracket(cmp.target_b)}",
    ]
    if cmp.onnx is not None:
        lines.append(
            f"matched {len(cmp.rows)} of {len(cmp.rows) + len(cmp.unmatched)} module outputs of a "
            f"by name through {cmp.onnx}"
        )
    if cmp.rows:
        lines += ["", _table(cmp, max_rows, context)]
    if cmp.missing:
        shown = [f"{k} (as {cmp.mapping[k]})" if k in cmp.mapping else k for k in cmp.missing]
        lines += ["", f"missing from b ({len(cmp.missing)}): {_few(shown, 20)}"]
    if cmp.extra:
        lines += ["", f"in b only ({len(cmp.extra)}): {_few(cmp.extra, 20)}"]
    if cmp.unmatched:
        lines += ["", f"no engine tensor ({len(cmp.unmatched)}): {_few(cmp.unmatched, 20)}"]
    return "\n".join(lines)


def _name(row) -> str:
    return row.key if row.key_b is None else f"{row.key} (b: {row.key_b})"

def _why(cmp, row) -> str:
    if row.metrics is None:
        return row.problem or "not compared"
    text = f"{cmp.metric} {_num(row.metrics[cmp.metric])}"
    return f"{text}; {row.problem}" if row.problem else text


def _table(cmp, max_rows: int | None, context: int) -> str:
    keep = _rows_to_show(cmp.rows, max_rows, context, cmp.badness)
    origin = any(row.origin for row in cmp.rows)
    blank = [""] * (8 if origin else 7)
    body: list[list[Any]] = []
    previous = -1
    for i in keep:
        if i > previous + 1:
            body.append(["", f"... {i - previous - 1} more", *blank])
        body.append(_cells(i, cmp.rows[i]) + ([cmp.rows[i].origin or ""] if origin else []))
        previous = i
    if previous < len(cmp.rows) - 1:
        body.append(["", f"... {len(cmp.rows) - 1 - previous} more", *blank])
    headers = ["#", "key", "shape", "dtype", "max_abs", "rel_l2", "cosine", "sqnr dB", "status"]
    align = ("right", "left", "left", "left", "right", "right", "right", "right", "left")
    if origin:
        headers, align = [*headers, "origin"], (*align, "left")
    return tabulate(body, headers=headers, disable_numparse=True, colalign=align)

def _cells(index: int, row) -> list[Any]:
    shape = _shape_str(row.shape_a) if row.shape_a == row.shape_b else f"{row.shape_a} vs {row.shape_b}"
    dtype = (
        _dtype_str(row.dtype_a)
        if row.dtype_a == row.dtype_b
        else f"{_dtype_str(row.dtype_a)} vs {_dtype_str(row.dtype_b)}"
    )
    m = row.metrics
    if m is None:
        values = ["", "", "", ""]
    else:
        values = [_num(m.max_abs), _num(m.rel_l2), _num(m.cosine, 6), _num(m.sqnr)]
    status = "ok" if row.passed else ("DIVERGE" if row.problem is None else f"DIVERGE: {row.problem}")
    key = row.key if row.key_b is None else f"{row.key} -> {row.key_b}"
    return [str(index), key, shape, dtype, *values, status]


def _rows_to_show(rows: Sequence[TensorComparison], max_rows: int | None, context: int, badness) -> list[int]:
    """Indices of the rows a trimmed table shows, in call order."""
    n = len(rows)
    if max_rows is None or n <= max_rows:
        return list(range(n))
    budget = max(1, max_rows - 1)  # one row is kept for the last (final output) row
    failing = [i for i, r in enumerate(rows) if not r.passed]
    ranked = failing or sorted(range(n), key=lambda i: badness(rows[i]), reverse=True)
    keep: set[int] = set()
    for i in ranked:
        window = set(range(max(0, i - context), min(n, i + context + 1)))
        if len(keep | window) <= budget:
            keep |= window
        elif len(keep | {i}) <= budget:
            keep.add(i)  # no room left for its context: the row alone
        else:
            break
    keep.add(n - 1)
    return sorted(keep)


def _few(items: Sequence[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _num(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"



def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_str(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _bracket(text: str | None) -> str:
    return f" [{text}]" if text else ""
