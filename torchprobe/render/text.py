"""Text tables (tabulate) for recordings, reports, isolations and fixes: formatting only."""
from __future__ import annotations

import math
import shutil
from typing import Sequence

from tabulate import tabulate

from ..kinds import ErrorKind, FixOutcome
from ..metrics import get_metric
from ..names import CallKey, call_key_of

MAX_ROWS = 60
NAME_WIDTH = 44


def stat(x: float | None, digits: int = 3) -> str:
    """A statistic: '-' when undefined (None or NaN, e.g. the absmax of an all-NaN tensor)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return num(x, digits)


def short(name: str, width: int = NAME_WIDTH) -> str:
    """``name`` abbreviated in the middle to at most ``width`` characters."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2):]


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


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
    risks = rec.at_risk()
    risky = {r.key for r in risks}
    for r in rec.rows:
        flags.append(r.key in risky)
        rows.append([
            short(r.key), r.module_type, r.dtype, "x".join(map(str, r.shape)) or "()",
            stat(r.absmax), stat(r.rms), stat(r.headroom_bits), f"{r.nan}/{r.inf}" if r.is_floating else "-",
            num(r.beyond_fp16), num(r.flush_fp16),
        ])
    parts = [tabulate(trim(rows, flags), headers=headers, disable_numparse=True)]
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


def _outcome(rep, o) -> tuple[str, str]:
    """(verdict word, the rest of the line) for one target's outcome."""
    if o.failure:
        return "FAILED", o.failure
    err = "-" if o.output_error is None else num(o.output_error[rep.metric])
    rest = f"final {rep.metric} {err} ({get_metric(rep.metric).rule(o.tol)})"
    culprits = ", ".join(f"{c.module} ({c.reason})" for c in rep.culprits_for(o.target)[:3])
    latent = ", ".join(f"{c.module} ({c.reason})" for c in rep.latent_for(o.target)[:3])
    if culprits:
        rest += f"; culprits: {culprits}"
    elif o.passed and latent:
        rest += f"; latent (broken inside, masked): {latent}"
    return ("OK" if o.passed else "DIVERGES"), rest


def _verdict_lines(rep) -> list[str]:
    return [f"  {o.target:<18} {verdict:<9} {rest}" for o in rep.outcomes for verdict, rest in [_outcome(rep, o)]]


def summary_lines(rep) -> list[str]:
    """One line per target: verdict, final error against tol, top culprits (``--quiet``)."""
    lines = [f"{o.target}: {verdict}: {rest}" for o in rep.outcomes for verdict, rest in [_outcome(rep, o)]]
    if not rep.reference_finite and rep.culprits:
        lines.append(f"{rep.reference}: NOT FINITE: NaN/Inf first from {rep.culprits[0].module} ({rep.culprits[0].reason})")
    return lines


def report_text(rep) -> str:
    """Verdict per target first, then culprits, latent findings, then the per-module table."""
    lines = [f"torchprobe report: {rep.model}, reference {rep.reference}, metric {rep.metric}"]
    lines += _verdict_lines(rep)
    if not rep.reference_finite:
        lines.append(f"\nThe {rep.reference} reference is not finite: fix the model before judging any target.")
        title = f"Where NaN/Inf first appears in the {rep.reference} reference:"
    else:
        title = "Culprits (the modules that introduce the error, most severe first):"
    if rep.culprits:
        lines.append("\n" + title)
        for i, c in enumerate(rep.culprits[:10], 1):
            lines.append(f"  {i}. {c.module} [{c.module_type}] under {c.target}: {c.reason}: {c.evidence}")
        if len(rep.culprits) > 10:
            lines.append(f"  ... {len(rep.culprits) - 10} more")
    elif rep:
        lines.append("\nNo culprit: every target is within tolerance.")
    else:
        lines.append("\nNo single module explains the divergence.")
    if rep.latent:
        lines.append("\nLatent (within tolerance, but broken inside — masked downstream):")
        for i, c in enumerate(rep.latent[:10], 1):
            masked = f"; masked by {c.masked_by}" if c.masked_by else ""
            lines.append(f"  {i}. {c.module} [{c.module_type}] under {c.target}: {c.reason}: {c.evidence}{masked}")
        if len(rep.latent) > 10:
            lines.append(f"  ... {len(rep.latent) - 10} more")
    if rep.replay_failures:
        lines.append(f"\n{plural(len(rep.replay_failures), 'module')} could not be replayed alone by torchprobe "
                     f"(not findings; logged with tracebacks): {', '.join(rep.replay_failures[:3])}")
    lines.append("")
    lines.append(module_table(rep))
    return "\n".join(lines)


def module_table(rep) -> str:
    cells = {(c.call_key, c.target, c.kind): c for c in rep.call_errors()}
    seen, calls = set(), []
    for r in rep.rows:
        call = call_key_of(r.key)
        if call not in seen:
            seen.add(call)
            calls.append((call, r))
    margins = rep.margins or {}
    labels = {t: t for t in rep.targets}
    if 70 + sum(max(len(t), 8) + 2 for t in rep.targets) * 2 > max(_terminal_width(), 140):  # T1, T2 ... and a legend
        labels = {t: f"T{i}" for i, t in enumerate(rep.targets, 1)}
    headers = ["module call", "type", "ref absmax", "headroom"]
    for t in rep.targets:
        headers += [f"{labels[t]}\nlocal", f"{labels[t]}\nprop."] + ([f"{labels[t]}\nmargin"] if t in margins else [])
    marked = {c.key: "*" for c in rep.culprits} | {c.key: "°" for c in rep.latent if c.key not in {x.key for x in rep.culprits}}
    rows, flags = [], []
    for call, r in calls:
        row = [call + (f" {marked[call]}" if call in marked else ""), short(r.module_type, 20), stat(r.absmax), stat(r.headroom_bits)]
        for t in rep.targets:
            for kind in (ErrorKind.LOCAL, ErrorKind.PROPAGATED):
                cell = cells.get((call, t, kind))
                row.append("-" if cell is None else "failed" if cell.failure else num(cell.value))
            if t in margins:
                factor = margins[t].get(CallKey.parse(call).name)
                row.append("-" if factor is None else f"x{num(factor)}")
        rows.append(row)
        flags.append(call in marked)
    _fit_names(rows, headers)
    legend = [f"{label} {t}" for t, label in labels.items() if label != t]
    if any(v == "*" for v in marked.values()):
        legend.append("* culprit")
    if any(v == "°" for v in marked.values()):
        legend.append("° latent")
    return tabulate(trim(rows, flags), headers=headers, disable_numparse=True) + (f"\n({', '.join(legend)})" if legend else "")


def _terminal_width() -> int:
    return max(shutil.get_terminal_size((100, 24)).columns, 100)


def _fit_names(rows: list[list[str]], headers: list[str]) -> None:
    """Shorten the first column (in the middle) so the table fits the terminal (at least 100 columns)."""
    width = _terminal_width()
    others = sum(max([len(line) for h in [headers[i]] for line in h.split("\n")] + [len(r[i]) for r in rows]) + 2
                 for i in range(1, len(headers)))
    room = max(24, min(NAME_WIDTH + 16, width - others - 2))
    for row in rows:
        row[0] = short(row[0], room)


def fix_message(fix) -> str:
    """What a Fix's search concluded, in one sentence."""
    if fix.outcome == FixOutcome.ALREADY_WITHIN:
        return "already within tolerance: nothing needs to stay in FP32"
    if fix.outcome == FixOutcome.FOUND:
        return fix.detail
    if fix.outcome == FixOutcome.REFERENCE_NOT_FINITE:
        return f"refused: {fix.detail}"
    if fix.outcome == FixOutcome.NO_CANDIDATE:
        return ("no module shows local error above tol: the error builds up across the model "
                "(try a looser tol or a list of candidates)")
    return f"no candidate set meets tol {num(fix.tol)}; tried: {fix.detail}"


def fix_text(fix) -> str:
    verdict = "VERIFIED" if fix else "NOT FOUND"
    metric = get_metric(fix.metric)
    lines = [
        f"torchprobe fix for {fix.target}: {verdict} — {fix.message}",
        f"  keep in FP32: {', '.join(fix.keep_fp32) or '(nothing)'}",
    ]
    if fix.outcome == FixOutcome.REFERENCE_NOT_FINITE:
        return "\n".join(lines)
    lines.append(f"  final {fix.metric}: {num(fix.error_before)} before -> {num(fix.error_after)} after "
                 f"({metric.rule(fix.tol)}), measured with the plan applied")
    cost = f"  cost: {plural(fix.evaluations, 'full-model evaluation')}"
    if fix.candidates:
        cost += f" (bound {fix.bound} for one culprit)"
    cost += f", {plural(fix.compilations, 'per-module compilation')}, {plural(len(fix.candidates), 'candidate')}"
    lines.append(cost)
    if fix.rule is not None:
        r = fix.rule
        kept = ", ".join(short(n, 40) for n in r.keep_fp32[:6]) + (f", ... {len(r.keep_fp32) - 6} more" if len(r.keep_fp32) > 6 else "")
        lines.append(f"  rule-based autocast (keep FP32 where |x| > {r.threshold:g}) would keep "
                     f"{plural(len(r.keep_fp32), 'module')}{': ' + kept if kept else ''} — "
                     f"{fix.metric} {num(r.error)} ({'meets' if r.passed else 'misses'} tol)")
    steps = [[", ".join(s.keep_fp32) or "(nothing)", num(s.error), "pass" if s.passed else "fail",
              s.note + (f" ({s.failure})" if s.failure else "")] for s in fix.log]
    lines.append(tabulate(trim(steps, limit=30), headers=["kept in FP32", fix.metric, "result", "step"], disable_numparse=True))
    return "\n".join(lines)


def isolation_text(iso) -> str:
    culprits = {r.key for r in iso.culprits}
    rows = [["  " * r.depth + short(r.key) + (" *" if r.key in culprits else ""), r.module_type,
             "failed: " + r.failure if r.failure else num(r.error), r.backend_info or ""] for r in iso.rows]
    head = (f"isolate {iso.target}: {plural(len(iso.rows), 'module call')}, {plural(iso.compilations, 'compilation')}, "
            f"{plural(iso.reference_passes, 'reference pass', 'reference passes')}; local {iso.metric}, "
            f"{get_metric(iso.metric).rule(iso.tol)}")
    tail = f"\nculprits: {', '.join(sorted(culprits))}" if culprits else "\nno module above tolerance"
    return head + "\n" + tabulate(rows, headers=["module call", "type", f"local {iso.metric}", "backend"], disable_numparse=True) + tail
