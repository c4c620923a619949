"""Text tables (tabulate) for recordings and reports."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from tabulate import tabulate

if TYPE_CHECKING:
    from ..capture import Recording

MAX_ROWS = 60


def num(x: float | None, digits: int = 3) -> str:
    """Compact number: '-' for None, scientific only where it helps."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def trim(rows: Sequence[list], keep: Sequence[bool] | None = None, limit: int = MAX_ROWS) -> list[list]:
    """At most ``limit`` rows: the flagged ones first, then head and tail, with '...' markers."""
    if len(rows) <= limit:
        return list(rows)
    flagged = set(i for i, k in enumerate(keep or []) if k)
    shown = sorted(flagged)[:limit]
    room = limit - len(shown)
    shown = sorted(set(shown) | set(range(room // 2)) | set(range(len(rows) - (room - room // 2), len(rows))))
    out, last = [], -1
    for i in shown:
        if i != last + 1:
            out.append([f"... {i - last - 1} rows"] + [""] * (len(rows[0]) - 1))
        out.append(rows[i])
        last = i
    if last != len(rows) - 1:
        out.append([f"... {len(rows) - last - 1} rows"] + [""] * (len(rows[0]) - 1))
    return out


def recording_table(rec: "Recording") -> str:
    headers = ["module call", "type", "dtype", "shape", "absmax", "rms", "headroom bits", "nan/inf", ">fp16 max", "fp16 flush"]
    rows, flags = [], []
    for r in rec.rows:
        risky = bool(r.is_floating and (r.nonfinite or r.beyond_fp16 or (r.headroom_bits or 99) < 1))
        flags.append(risky)
        rows.append([
            r.key, r.module_type, r.dtype, "x".join(map(str, r.shape)) or "()",
            num(r.absmax), num(r.rms), num(r.headroom_bits), f"{r.nan}/{r.inf}" if r.is_floating else "-",
            num(r.beyond_fp16), num(r.flush_fp16),
        ])
    parts = [tabulate(trim(rows, flags), headers=headers, disable_numparse=True)]
    risks = rec.at_risk()
    if risks:
        parts.append(f"\nAt risk in FP16 ({len(risks)}):")
        parts.extend(f"  {r.key}: {r.kind}: {r.detail}" for r in risks[:20])
        if len(risks) > 20:
            parts.append(f"  ... {len(risks) - 20} more")
    else:
        parts.append("\nNo module output at risk in FP16.")
    missing = rec.unvisited()
    if missing:
        parts.append(f"Modules that never ran ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return "\n".join(parts)


def report_text(rep) -> str:
    """Verdict per target first, then culprits, then the per-module table in call order."""
    lines = [f"torchprobe report: {rep.model}, reference {rep.reference}, metric {rep.metric}"]
    for o in rep.outcomes:
        if o.failure:
            lines.append(f"  {o.target:<16} FAILED    {o.failure}")
            continue
        err = "-" if o.output_error is None else num(o.output_error[rep.metric])
        verdict = "OK" if o.passed else "DIVERGES"
        top = rep.culprits_for(o.target)[:3]
        tail = f"  culprits: {', '.join(f'{c.module} ({c.reason})' for c in top)}" if top else ""
        lines.append(f"  {o.target:<16} {verdict:<9} final {rep.metric} {err} (tol {num(o.tol)}){tail}")
    if rep.culprits:
        lines.append("\nCulprits (the modules that introduce the error, smallest first):")
        for i, c in enumerate(rep.culprits[:10], 1):
            lines.append(f"  {i}. {c.module} [{c.module_type}] under {c.target}: {c.reason}: {c.evidence}")
        if len(rep.culprits) > 10:
            lines.append(f"  ... {len(rep.culprits) - 10} more")
    else:
        lines.append("\nNo culprit: every target is within tolerance." if rep else "\nNo single module explains the divergence.")
    lines.append("")
    lines.append(module_table(rep))
    if rep.peak_note:
        lines.append(rep.peak_note)
    return "\n".join(lines)


def module_table(rep) -> str:
    from ..findings import worst

    by = {}
    for e in rep.errors:
        call = e.module if e.call == 0 else f"{e.module}#{e.call}"
        by.setdefault((call, e.target, e.kind), []).append(e)
    seen, calls = set(), []
    for r in rep.rows:
        call = r.key.split(":", 1)[0]
        if call not in seen:
            seen.add(call)
            calls.append((call, r))
    headers = ["module call", "type", "ref absmax", "headroom"]
    for t in rep.targets:
        headers += [f"{t} local", f"{t} prop."]
    culprit_calls = {c.key for c in rep.culprits}
    rows, flags = [], []
    for call, r in calls:
        row = [call + (" *" if call in culprit_calls else ""), r.module_type, num(r.absmax), num(r.headroom_bits)]
        for t in rep.targets:
            for kind in ("local", "propagated"):
                errs = by.get((call, t, kind))
                if not errs:
                    row.append("-")
                elif any(e.failure for e in errs):
                    row.append("failed")
                else:
                    row.append(num(worst(rep.metric, [e.metrics for e in errs])))
        rows.append(row)
        flags.append(call in culprit_calls)
    return tabulate(trim(rows, flags), headers=headers, disable_numparse=True) + ("\n(* culprit)" if culprit_calls else "")


def fix_text(fix) -> str:
    verdict = "VERIFIED" if fix else "NOT FOUND"
    lines = [
        f"torchprobe fix for {fix.target}: {verdict} — {fix.message}",
        f"  keep in FP32: {', '.join(fix.keep_fp32) or '(nothing)'}",
        f"  final {fix.metric}: {num(fix.error_before)} before -> {num(fix.error_after)} after (tol {num(fix.tol)}), measured with the plan applied",
        f"  cost: {fix.evaluations} full-model evaluations (bound {fix.bound}), {fix.compilations} per-module compilations, {len(fix.candidates)} candidates",
    ]
    if fix.rule is not None:
        r = fix.rule
        lines.append(f"  rule-based autocast (keep FP32 where |x| > {r.threshold:g}) would keep {len(r.keep_fp32)} modules: "
                     f"{fix.metric} {num(r.error)} ({'meets' if r.passed else 'misses'} tol)")
    steps = [[", ".join(s.keep_fp32) or "(nothing)", num(s.error), "pass" if s.passed else "fail", s.note] for s in fix.log]
    lines.append(tabulate(trim(steps, limit=30), headers=["kept in FP32", fix.metric, "", "step"], disable_numparse=True))
    return "\n".join(lines)
