"""A self-contained HTML page for a :class:`~torchprobe.findings.Report`.

Verdict per target, culprits with their evidence, two inline SVG plots drawn here (error along the
network, FP16 headroom along the network) and a sortable per-module table. No network access: CSS,
SVG and the few lines of JS are inline. Nothing is computed beyond picking the worst leaf of each
module call; every number is the report's own.

    >>> rep = tp.report(model, x, targets=("eager:fp16", "strict:fp16"))
    >>> rep.to_html("report.html")          # or write_report_html(rep, "report.html")
    PosixPath('report.html')

Big models stay small: plot lines keep at most :data:`MAX_LINE_POINTS` points (the worst of each
stretch); hovered point markers are drawn for every call up to :data:`MARKER_LIMIT` calls, beyond
that only on culprits, failures, local errors out of tolerance and the first propagated point out
of tolerance; runs of Inf/NaN become one bar; the table keeps :data:`MAX_TABLE_ROWS` rows (culprits
and rows with non-finite values first, then head and tail). 6000 calls make about 0.6 MB.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..atomic import write_text
from ..formats import LOW_HEADROOM_BITS
from ..metrics import get_metric, worst_value
from ..names import CallKey
from .text import num, trim

MARKER_LIMIT = 150
MAX_LINE_POINTS = 1200
MAX_TABLE_ROWS = 3000
MAX_CULPRITS = 50
KINDS = ("propagated", "local")
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")

# Plot geometry, in SVG user units (the SVG scales to the page width).
WIDTH, LEFT, RIGHT, TOP = 1100, 92, 16, 14
PLOT_HEIGHT = 250
LANE = 16


def write_report_html(rep: "Report", path: str | Path) -> Path:
    """Write ``rep`` as one self-contained HTML file, atomically; returns the path."""
    return write_text(path, report_html(rep))


def report_html(rep: "Report") -> str:
    """The whole page as a string."""
    calls = _call_rows(rep)
    cells = _error_cells(rep)
    colors = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(rep.targets)}
    title = f"torchprobe report: {rep.model}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">reference {_e(rep.reference)} · metric {_e(rep.metric)} · '
        f"{len(calls)} module calls · {len(rep.targets)} targets</p>",
        _verdicts(rep, colors),
        _culprits(rep),
        "<h2>Error along the network</h2>",
        _error_plot(rep, calls, cells, colors),
        "<h2>FP16 headroom along the network</h2>",
        _headroom_plot(rep, calls, cells, colors),
        "<h2>Per-module table</h2>",
        _table(rep, calls, cells),
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n" + "\n".join(body) + f"\n</main><script>{_JS}</script></body></html>\n"
    )


# -- aggregation: one entry per module call, the worst leaf --------------------------------------


@dataclass(frozen=True)
class _CallRow:
    """Reference statistics of one module call (worst over its output leaves), in call order."""

    key: str
    module_type: str
    absmax: float | None
    headroom: float | None
    nan: int
    inf: int
    beyond: int


@dataclass(frozen=True)
class _Cell:
    """One module call under one target and kind: worst metric value, failure, non-finite counts."""

    value: float | None
    failure: str | None
    nan: int
    inf: int


def _call_key(module: str, call: int) -> str:
    return str(CallKey(module, call))


def _call_rows(rep: "Report") -> list[_CallRow]:
    """Module calls in the order the reference returned them (then any only seen in errors)."""
    groups: dict[str, list] = {}
    for r in rep.rows:
        groups.setdefault(_call_key(r.module, r.call), []).append(r)
    out = []
    for key, rows in groups.items():
        fl = [r for r in rows if r.is_floating]
        out.append(_CallRow(
            key, rows[0].module_type,
            max((r.absmax for r in fl), default=None),
            min((r.headroom_bits for r in fl if r.headroom_bits is not None), default=None),
            sum(r.nan or 0 for r in fl), sum(r.inf or 0 for r in fl), sum(r.beyond_fp16 or 0 for r in fl),
        ))
    for e in rep.errors:
        key = _call_key(e.module, e.call)
        if key not in groups:
            groups[key] = []
            out.append(_CallRow(key, "", None, None, 0, 0, 0))
    return out


def _error_cells(rep: "Report") -> dict[tuple[str, str, str], _Cell]:
    """(call key, target, kind) -> the worst leaf of that module call."""
    grouped: dict[tuple[str, str, str], list] = {}
    for e in rep.errors:
        grouped.setdefault((_call_key(e.module, e.call), e.target, e.kind), []).append(e)
    out = {}
    for k, errs in grouped.items():
        failure = next((e.failure for e in errs if e.failure), None)
        value = None if failure else worst_value(rep.metric, [e.metrics for e in errs])
        out[k] = _Cell(value, failure, sum((e.stats.nan or 0) for e in errs if e.stats),
                      sum((e.stats.inf or 0) for e in errs if e.stats))
    return out


# -- verdicts and culprits ---------------------------------------------------------------------


def _verdicts(rep: "Report", colors: dict[str, str]) -> str:
    cards = []
    for o in rep.outcomes:
        verdict = "FAILED" if o.failure else ("OK" if o.passed else "DIVERGES")
        if o.failure:
            detail = _e(o.failure)
        else:
            err = "-" if o.output_error is None else num(o.output_error[rep.metric])
            detail = f"final {_e(rep.metric)} <b>{_e(err)}</b> (tol {_e(num(o.tol))})"
        top = rep.culprits_for(o.target)[:3]
        blame = ""
        if top:
            blame = "<div class=blame>culprits: " + ", ".join(
                f"<code>{_e(c.module)}</code> ({_e(c.reason)})" for c in top) + "</div>"
        cards.append(
            f'<div class="card v-{verdict.lower()}" style="border-top-color:{colors.get(o.target, PALETTE[-1])}">'
            f'<div class=target>{_e(o.target)}</div><div class=verdict>{verdict}</div>'
            f"<div>{detail}</div>{blame}</div>"
        )
    return '<section class="cards">' + "".join(cards) + "</section>"


def _culprits(rep: "Report") -> str:
    if not rep.culprits:
        text = "No culprit: every target is within tolerance." if rep else "No single module explains the divergence."
        return f"<h2>Culprits</h2><p>{text}</p>"
    rows = []
    for i, c in enumerate(rep.culprits[:MAX_CULPRITS], 1):
        prop = "-" if c.propagated_error is None else num(c.propagated_error)
        rows.append(
            f"<tr><td>{i}</td><td><code>{_e(c.key)}</code></td><td>{_e(c.module_type)}</td><td>{_e(c.target)}</td>"
            f'<td><span class="reason r-{_e(c.reason)}">{_e(c.reason)}</span></td>'
            f"<td>{_e(num(c.local_error))}</td><td>{_e(prop)}</td><td class=evidence>{_e(c.evidence)}</td></tr>"
        )
    more = f"<p class=note>... {len(rep.culprits) - MAX_CULPRITS} more</p>" if len(rep.culprits) > MAX_CULPRITS else ""
    return (
        "<h2>Culprits</h2><p class=sub>The modules that introduce the error (local error: the module alone, "
        "on the reference's exact inputs), most severe first.</p>"
        f"<table class=culprits><thead><tr><th>#</th><th>module</th><th>type</th><th>target</th><th>reason</th>"
        f"<th>local {_e(rep.metric)}</th><th>propagated</th><th>evidence</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{more}"
    )


# -- SVG primitives ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """Maps data values to pixels between ``lo`` and ``hi``, linear or log10.

    ``flip`` puts larger values at the bottom (for SQNR, where larger is better, so that up is
    always worse on error plots). Values beyond the ends are pinned to the edges.
    """

    lo: float
    hi: float
    px_lo: float
    px_hi: float
    log: bool = False

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        if math.isnan(v):
            return self.px_hi
        if self.log and v <= 0:
            return self.px_lo
        a, b = self._t(self.lo), self._t(self.hi)
        f = 0.0 if b == a else (self._t(min(max(v, self.lo), self.hi)) - a) / (b - a)
        return self.px_lo + f * (self.px_hi - self.px_lo)

    def ticks(self) -> list[float]:
        if self.log:
            a, b = round(math.log10(self.lo)), round(math.log10(self.hi))
            step = max(1, math.ceil((b - a) / 8))
            return [10.0**k for k in range(a, b + 1, step)]
        return _nice_ticks(self.lo, self.hi)


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    raw = (hi - lo) / n if hi > lo else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _log_range(values: Iterable[float]) -> tuple[float, float]:
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if not pos:
        return 1e-8, 1.0
    lo, hi = math.floor(math.log10(min(pos) / 2)), math.ceil(math.log10(max(pos) * 2))
    return 10.0**lo, 10.0 ** max(hi, lo + 1)


def _f(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _svg(height: float, parts: list[str], label: str) -> str:
    return (f'<svg class=plot viewBox="0 0 {WIDTH} {_f(height)}" role="img" aria-label="{_e(label)}">'
            + "".join(parts) + "</svg>")


def _x_axis(n: int, x: _Scale, y0: float, calls: list[_CallRow], culprits: set[str]) -> list[str]:
    """Module names under the plot when few (culprits in red), call indices otherwise."""
    parts = [f'<line class=axis x1="{LEFT}" y1="{_f(y0)}" x2="{WIDTH - RIGHT}" y2="{_f(y0)}"/>']
    if n <= 40:
        for i, c in enumerate(calls):
            name = c.key if len(c.key) <= 22 else "…" + c.key[-21:]
            cls = "xl hot" if c.key in culprits else "xl"
            parts.append(f'<text class="{cls}" transform="translate({_f(x(i))},{_f(y0 + 8)}) rotate(-35)">'
                         f"<title>{_e(c.key)}</title>{_e(name)}</text>")
    else:
        for t in _nice_ticks(0, n - 1, 10):
            parts.append(f'<text class=xt x="{_f(x(t))}" y="{_f(y0 + 14)}">{int(t)}</text>')
        parts.append(f'<text class=xn x="{WIDTH - RIGHT}" y="{_f(y0 + 28)}">module call (order of return)</text>')
    return parts


def _x_band(calls: list[_CallRow]) -> float:
    """Height under the plot for the x axis labels (rotated names when few calls)."""
    if len(calls) > 40:
        return 34
    return 22 + 3.6 * min(22, max((len(c.key) for c in calls), default=0))


def _y_axis(y: _Scale, fmt: Callable[[float], str], label: str) -> list[str]:
    parts = []
    for t in y.ticks():
        py = _f(y(t))
        parts.append(f'<line class=grid x1="{LEFT}" y1="{py}" x2="{WIDTH - RIGHT}" y2="{py}"/>'
                     f'<text class=yt x="{LEFT - 6}" y="{py}">{_e(fmt(t))}</text>')
    mid = (y.px_lo + y.px_hi) / 2
    parts.append(f'<text class=yl transform="translate(14,{_f(mid)}) rotate(-90)">{_e(label)}</text>')
    return parts


def _thin(points: list[tuple[int, float]], limit: int, is_worse: Callable[[float, float], bool]) -> list[tuple[int, float]]:
    """At most ``limit`` points: the worst point of each consecutive stretch."""
    if len(points) <= limit:
        return points
    out, size = [], len(points) / limit
    for b in range(limit):
        chunk = points[int(b * size):int((b + 1) * size)]
        if chunk:
            best = chunk[0]
            for p in chunk[1:]:
                if is_worse(p[1], best[1]):
                    best = p
            out.append(best)
    return out


def _polyline(pts: list[tuple[float, float]], color: str, dashed: bool, name: str) -> str:
    if not pts:
        return ""
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    coords = " ".join(f"{_f(a)},{_f(b)}" for a, b in pts)
    return f'<polyline class=series points="{coords}" stroke="{color}"{dash}><title>{_e(name)}</title></polyline>'


def _marker(px: float, py: float, color: str, title: str, hollow: bool = False, r: float = 3.2) -> str:
    fill = "#fff" if hollow else color
    return f'<circle cx="{_f(px)}" cy="{_f(py)}" r="{r}" fill="{fill}" stroke="{color}"><title>{_e(title)}</title></circle>'


def _legend(items: list[tuple[str, str, str]]) -> str:
    """HTML legend: (color, 'solid'|'dashed'|'dot'|'ring'|'band', label)."""
    out = []
    for color, style, label in items:
        if style in ("solid", "dashed"):
            dash = ' stroke-dasharray="5 4"' if style == "dashed" else ""
            sample = f'<line x1="1" y1="6" x2="27" y2="6" stroke="{color}" stroke-width="2"{dash}/>'
        elif style == "band":
            sample = f'<rect x="1" y="1" width="26" height="10" fill="{color}"/>'
        else:
            fill = "#fff" if style == "ring" else color
            sample = f'<circle cx="14" cy="6" r="4" fill="{fill}" stroke="{color}" stroke-width="1.5"/>'
        out.append(f'<span class=key><svg width="28" height="12">{sample}</svg>{_e(label)}</span>')
    return '<div class=legend>' + "".join(out) + "</div>"


# -- plot 1: error per module call -----------------------------------------------------------------


def _display(metric: str, v: float) -> float:
    """The plotted value: cosine is shown as 1 - cosine so that every error plot is 'up is worse'."""
    return 1.0 - v if get_metric(metric).similarity else v


def _error_plot(rep: "Report", calls: list[_CallRow], cells: dict, colors: dict[str, str]) -> str:
    metric, n = rep.metric, len(calls)
    if not rep.errors or n == 0:
        return "<p>No per-module error was measured.</p>"
    culprit_keys = {(c.key, c.target) for c in rep.culprits}
    tols = {o.target: o.tol for o in rep.outcomes}
    series = {(t, k): [(i, cells[(c.key, t, k)]) for i, c in enumerate(calls) if (c.key, t, k) in cells]
              for t in rep.targets for k in KINDS}
    values = [cell.value for pts in series.values() for _, cell in pts if cell.value is not None]
    shown = [_display(metric, v) for v in values if math.isfinite(v)] + [_display(metric, _tol_value(metric, t)) for t in tols.values()]
    top = TOP + 14  # the band above the plot holds non-finite and failed points
    bottom = top + PLOT_HEIGHT
    zero_y = bottom + 12  # the band below holds exact matches (zero error)
    x = _Scale(0, max(n - 1, 1), LEFT + 8, WIDTH - RIGHT - 8)
    y, label, fmt = _error_axis(metric, shown, top, bottom)
    is_worse = get_metric(metric).worse

    def py(v: float) -> float:
        if _nonfinite(metric, v):
            return TOP + 4
        return zero_y if metric != "sqnr" and _display(metric, v) <= 0 else y(_display(metric, v))

    parts = _y_axis(y, fmt, label)
    parts.append(f'<rect class=band x="{LEFT}" y="{TOP - 2}" width="{WIDTH - RIGHT - LEFT}" height="12"/>'
                 f'<text class=yt x="{LEFT - 6}" y="{TOP + 4}">inf/NaN</text>')
    parts.append(f'<rect class=zband x="{LEFT}" y="{bottom + 6}" width="{WIDTH - RIGHT - LEFT}" height="12"/>'
                 f'<text class=yt x="{LEFT - 6}" y="{zero_y}">0 (exact)</text>')
    parts += _x_axis(n, x, zero_y + 8, calls, {c.key for c in rep.culprits})
    parts += _tol_lines(metric, tols, y)
    legend = []
    for (t, kind), pts in series.items():
        if not pts:
            continue
        color = colors.get(t, PALETTE[-1])
        legend.append((color, "solid" if kind == "propagated" else "dashed", f"{t} {kind}"))
        measured = [(i, c.value) for i, c in pts if c.value is not None]
        line = _thin(measured, MAX_LINE_POINTS, is_worse)
        parts.append(_polyline([(x(i), py(v)) for i, v in line], color, kind == "local", f"{t} {kind}"))
        for i, c, big in _markers(pts, kind, metric, tols[t], n, {k for k, tt in culprit_keys if tt == t}, calls):
            call = calls[i]
            if c.failure:
                parts.append(_marker(x(i), TOP + 4, color, f"{call.key}: failed under {t} ({kind}): {c.failure}", hollow=True, r=4))
            else:
                title = f"{call.key} ({call.module_type}) · {t} {kind}: {metric} {num(c.value)}"
                parts.append(_marker(x(i), py(c.value), color, title, hollow=kind == "local", r=3.6 if big else 2.6))
    legend.append(("#9ca3af", "dashed", "tolerance"))
    note = "" if n <= MARKER_LIMIT else (f"<p class=note>{n} calls: markers only on culprits, failures, local errors out of "
                                         "tolerance and where each propagated line first leaves it; hover a line for its name.</p>")
    return '<figure>' + _svg(zero_y + 8 + _x_band(calls), parts, "error per module call") + _legend(legend) + note + "</figure>"


def _error_axis(metric: str, shown: list[float], top: float, bottom: float) -> tuple[_Scale, str, Callable[[float], str]]:
    """Y scale, label and tick format: log for distances (and 1 - cosine), linear dB for SQNR."""
    if metric == "sqnr":
        finite = [v for v in shown if math.isfinite(v)] or [0.0, 1.0]
        lo, hi = min(finite), max(finite)
        pad = max((hi - lo) * 0.05, 1.0)
        return _Scale(lo - pad, hi + pad, top, bottom), "SQNR dB (down is better)", lambda v: f"{v:g}"
    lo, hi = _log_range(shown)
    label = ("1 − cosine" if metric == "cosine" else metric) + " (log)"
    return _Scale(lo, hi, bottom, top, log=True), label, lambda v: f"1e{round(math.log10(v))}"


def _tol_lines(metric: str, tols: dict[str, float], y: _Scale) -> list[str]:
    """One dashed line per distinct tolerance, labelled with the targets that use it."""
    parts = []
    for tol, targets in _group_tols(tols).items():
        ty = y(_display(metric, _tol_value(metric, tol)))
        names = _e(", ".join(targets))
        parts.append(f'<line class=tol x1="{LEFT}" y1="{_f(ty)}" x2="{WIDTH - RIGHT}" y2="{_f(ty)}"><title>tolerance {_e(num(tol))} '
                     f'({names})</title></line><text class=toll x="{WIDTH - RIGHT - 4}" y="{_f(ty - 4)}">tol {_e(num(tol))} · {names}</text>')
    return parts


def _markers(pts: list[tuple[int, _Cell]], kind: str, metric: str, tol: float, n: int, culprits: set[str],
             calls: list[_CallRow]) -> list[tuple[int, _Cell, bool]]:
    """Which points of one series get a hovered marker: (index, cell, out of tolerance).

    Every point when the network is small; otherwise culprits, failures, local errors out of
    tolerance and the first propagated point out of tolerance, at most MARKER_LIMIT.
    """
    out, left = [], False
    for i, c in pts:
        bad = c.failure is not None or _nonfinite(metric, c.value) or not get_metric(metric).passes(c.value, tol)
        first = kind == "propagated" and bad and not left
        left = left or (kind == "propagated" and bad)
        notable = c.failure is not None or calls[i].key in culprits or (bad and kind == "local") or first
        if n <= MARKER_LIMIT or len(pts) == 1 or notable:
            out.append((i, c, bad))
    return out if n <= MARKER_LIMIT else out[:MARKER_LIMIT]


def _nonfinite(metric: str, v: float) -> bool:
    """A NaN or infinitely bad error value (drawn in the band above the plot)."""
    worst_end = -math.inf if get_metric(metric).higher_is_better else math.inf
    return math.isnan(v) or v == worst_end


def _tol_value(metric: str, tol: float) -> float:
    """The metric value at the tolerance boundary (cosine: 1 - tol)."""
    return get_metric(metric).bound(tol)


def _group_tols(tols: dict[str, float]) -> dict[float, list[str]]:
    out: dict[float, list[str]] = {}
    for t, tol in tols.items():
        out.setdefault(tol, []).append(t)
    return out


# -- plot 2: FP16 headroom ---------------------------------------------------------------------


def _headroom_plot(rep: "Report", calls: list[_CallRow], cells: dict, colors: dict[str, str]) -> str:
    n = len(calls)
    pts = [(i, c.headroom) for i, c in enumerate(calls) if c.headroom is not None and not math.isnan(c.headroom)]
    if not pts:
        return "<p>No floating-point module output in the reference.</p>"
    finite = [h for _, h in pts if math.isfinite(h)] or [0.0]
    lo, hi = min(min(finite), -1.0), max(max(finite), 2.0)
    pad = (hi - lo) * 0.06
    lanes = [t for t in rep.targets if any(_has_nonfinite(cells.get((c.key, t, k))) for c in calls for k in KINDS)]
    bottom = TOP + PLOT_HEIGHT
    lane_top = bottom + 8
    axis_y = lane_top + LANE * len(lanes) + (4 if lanes else 0)
    x = _Scale(0, max(n - 1, 1), LEFT + 8, WIDTH - RIGHT - 8)
    y = _Scale(lo - pad, hi + pad, bottom, TOP)
    parts = [f'<rect class=danger x="{LEFT}" y="{_f(y(0))}" width="{WIDTH - RIGHT - LEFT}" height="{_f(bottom - y(0))}"/>']
    parts += _y_axis(y, lambda v: f"{v:g}", "headroom to FP16 max (bits)")
    zy, ly = _f(y(0)), _f(y(LOW_HEADROOM_BITS))
    parts.append(f'<line class=zero x1="{LEFT}" y1="{zy}" x2="{WIDTH - RIGHT}" y2="{zy}"><title>0 bits: absmax = 65504</title></line>'
                 f'<text class=toll x="{WIDTH - RIGHT - 4}" y="{_f(y(0) + 12)}">beyond FP16 max (65504)</text>'
                 f'<line class=low x1="{LEFT}" y1="{ly}" x2="{WIDTH - RIGHT}" y2="{ly}"><title>{LOW_HEADROOM_BITS:g} bit: one doubling from overflow</title></line>')
    parts += _x_axis(n, x, axis_y, calls, {c.key for c in rep.culprits})
    line = _thin(pts, MAX_LINE_POINTS, lambda a, b: a < b)
    parts.append(_polyline([(x(i), y(h)) for i, h in line], "#374151", False, "reference headroom (bits)"))
    for i, h in pts:
        c = calls[i]
        bad = c.nan or c.inf or c.beyond
        if bad or (n <= MARKER_LIMIT):
            title = f"{c.key} ({c.module_type}): absmax {num(c.absmax)}, headroom {num(h)} bits"
            if bad:
                title += f"; reference has {c.beyond} values beyond 65504, {c.inf} Inf, {c.nan} NaN"
            parts.append(_marker(x(i), y(h), "#dc2626" if bad else "#374151", title, r=4.5 if bad else 2.4))
    for li, t in enumerate(lanes):
        cy = lane_top + LANE * li + LANE / 2
        parts.append(f'<text class=yt x="{LEFT - 6}" y="{_f(cy)}">{_e(t)}</text>'
                     f'<line class=grid x1="{LEFT}" y1="{_f(cy)}" x2="{WIDTH - RIGHT}" y2="{_f(cy)}"/>')
        for kind in KINDS:
            hit = [i for i, c in enumerate(calls) if _has_nonfinite(cells.get((c.key, t, kind)))]
            if n <= MARKER_LIMIT:
                for i in hit:
                    cell = cells[(calls[i].key, t, kind)]
                    title = f"{calls[i].key} under {t} ({kind}): {cell.inf} Inf, {cell.nan} NaN"
                    parts.append(_marker(x(i), cy, colors[t], title, hollow=kind == "local", r=4))
                continue
            for a, b in _runs(hit):
                span = calls[a].key if a == b else f"{calls[a].key} … {calls[b].key} ({b - a + 1} calls)"
                fill = "#fff" if kind == "local" else colors[t]
                parts.append(f'<rect x="{_f(x(a) - 2)}" y="{_f(cy - 4)}" width="{_f(x(b) - x(a) + 4)}" height="8" fill="{fill}" '
                             f'stroke="{colors[t]}"><title>{_e(span)} under {_e(t)} ({kind}): Inf/NaN</title></rect>')
    legend = [("#374151", "solid", "reference headroom (min over leaves)"), ("#dc2626", "dot", "reference output beyond FP16 / Inf / NaN"),
              ("#fde2e2", "band", "does not fit FP16")]
    legend += [(colors[t], "dot", f"{t}: Inf/NaN in module output (ring: local)") for t in lanes]
    return '<figure>' + _svg(axis_y + _x_band(calls), parts, "FP16 headroom per module call") + _legend(legend) + "</figure>"


def _has_nonfinite(cell: _Cell | None) -> bool:
    return cell is not None and bool(cell.nan or cell.inf)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive stretches of sorted indices as (first, last)."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


# -- table ---------------------------------------------------------------------------------------


def _table(rep: "Report", calls: list[_CallRow], cells: dict) -> str:
    culprits = {c.key for c in rep.culprits}
    tols = {o.target: o.tol for o in rep.outcomes}
    head = ["#", "module call", "type", "ref absmax", "headroom\nbits", "ref NaN/Inf\n/>65504"]
    head += [f"{t}\n{'prop.' if k == 'propagated' else k}" for t in rep.targets for k in ("local", "propagated")]
    rows, flags = [], []
    for i, c in enumerate(calls):
        star = " ★" if c.key in culprits else ""
        bad = " class=bad" if c.nan or c.inf or c.beyond else ""
        cols = [f"<td>{i}</td><td><code>{_e(c.key)}</code>{star}</td><td>{_e(c.module_type)}</td>",
                f"<td>{num(c.absmax)}</td><td>{num(c.headroom)}</td><td{bad}>{c.nan}/{c.inf}/{c.beyond}</td>"]
        for t in rep.targets:
            for k in ("local", "propagated"):
                cols.append(_value_cell(cells.get((c.key, t, k)), rep.metric, tols[t]))
        cls = ' class=culprit' if c.key in culprits else ""
        rows.append([f"<tr{cls}>" + "".join(cols) + "</tr>"])
        flags.append(bool(star) or bool(bad))
    kept = trim(rows, flags, MAX_TABLE_ROWS)
    body = "".join(r[0] if r[0].startswith("<tr") else f'<tr class=gap><td colspan="{len(head)}">{_e(r[0])}</td></tr>' for r in kept)
    ths = "".join(f"<th>{'<br>'.join(_e(p) for p in h.split(chr(10)))}</th>" for h in head)
    return (f"<p class=sub>Worst output leaf per module call; click a header to sort. ★ culprit.</p>"
            f"<div class=scroll><table class=sortable><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table></div>")


def _value_cell(cell: _Cell | None, metric: str, tol: float) -> str:
    if cell is None:
        return "<td>-</td>"
    if cell.failure:
        return f'<td class=bad title="{_e(cell.failure)}">failed</td>'
    out = " class=bad" if not get_metric(metric).passes(cell.value, tol) else ""
    return f"<td{out}>{num(cell.value)}</td>"


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bad:#fde2e2;--hl:#fff7d6}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#f8fafc;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1320px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.sub,.note{color:var(--muted);margin:4px 0 10px}.note{font-size:12px}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.card{flex:1 1 240px;border:1px solid var(--line);border-top:4px solid;border-radius:6px;padding:10px 12px}
.card .target{font-weight:600}.card .verdict{font-size:20px;font-weight:700;letter-spacing:.02em}
.v-ok .verdict{color:#047857}.v-diverges .verdict{color:#b91c1c}.v-failed .verdict{color:#7c2d12}
.blame{margin-top:4px;color:var(--muted)}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:4px 7px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#f3f4f6;position:sticky;top:0;vertical-align:bottom}
td:nth-child(2),th:nth-child(2),td:nth-child(3),th:nth-child(3){text-align:left}
table.culprits td,table.culprits th{text-align:left}
table.culprits td.evidence{white-space:normal;max-width:520px}
.sortable th{cursor:pointer;user-select:none}.sortable th:hover{background:#e5e7eb}
.sortable th.asc:after{content:" ▲"}.sortable th.desc:after{content:" ▼"}
tr.culprit td{background:var(--hl)}table td.bad,tr.culprit td.bad{background:var(--bad);color:#991b1b}
tr.gap td{text-align:center;color:var(--muted);font-style:italic}
.scroll{max-height:720px;overflow:auto;border:1px solid var(--line)}
.reason{padding:1px 7px;border-radius:9px;background:#e5e7eb;font-size:12px}
.r-overflow,.r-nan,.r-error{background:#fee2e2;color:#991b1b}.r-underflow{background:#e0e7ff;color:#3730a3}
figure{margin:0}svg.plot{width:100%;height:auto;display:block}
svg text{font-size:11px;fill:#4b5563}
.axis{stroke:#9ca3af}.grid{stroke:#eef0f3}
.yt{text-anchor:end;dominant-baseline:middle}.xt{text-anchor:middle}.xl,.xn{text-anchor:end}.hot{fill:#b91c1c;font-weight:700}
.yl{text-anchor:middle;font-size:12px;fill:#374151}
.toll{text-anchor:end;font-size:10.5px;fill:#6b7280;paint-order:stroke;stroke:#fff;stroke-width:3px}
.tol,.low{stroke:#9ca3af;stroke-dasharray:6 4}.zero{stroke:#b91c1c;stroke-width:1.2}
.band{fill:#fef2f2}.zband{fill:#f0fdf4}.danger{fill:#fde2e2;opacity:.55}
.series{fill:none;stroke-width:1.8;stroke-linejoin:round}
circle{stroke-width:1.4}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12px;color:#374151;margin:2px 0 4px 92px}
.key{display:inline-flex;align-items:center;gap:5px}
"""

_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.filter.call(body.rows, function (r) { return r.className !== "gap"; });
      function key(r) {
        var t = r.cells[col].textContent.replace("\u2605", "").trim();
        var v = t === "inf" ? Infinity : t === "-inf" ? -Infinity : parseFloat(t);
        return isNaN(v) || !/^[-+0-9.ei]/.test(t) ? t : v;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c;
        if (typeof x === typeof y) c = x < y ? -1 : x > y ? 1 : 0;
        else c = typeof x === "number" ? -1 : 1;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""
