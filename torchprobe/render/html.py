"""A self-contained HTML page for a :class:`~torchprobe.results.Report`.

Verdict per target, culprits and latent findings with their evidence, two inline SVG plots drawn
here (error along the network, FP16 headroom along the network) and a sortable per-module table.
No network access: CSS, SVG and the few lines of JS are inline. Nothing is computed here: the worst
leaf of each module call comes from :meth:`Report.call_errors`, every pass/fail from the metric.

    >>> rep = tp.report(model, x, targets=("eager:fp16", "strict:fp16"))
    >>> rep.to_html("report.html")          # or write_report_html(rep, "report.html")
    PosixPath('report.html')

How the plots read:

- The x axis is the module calls in the order they returned, in bands per block of the network
  (the top-level modules, split while one block holds more than :data:`SPLIT_SHARE` of the calls:
  ``embeddings | encoder.layer.0 | encoder.layer.1 | pooler``). A container's own call returns
  after its children and joins their band. Hovering a plot names the module call under the mouse.
- Leaves are the main series. A container's output is usually one of its children's (a block's
  last LayerNorm), so it would repeat its child's spike: containers are drawn apart, as faded
  squares off the line, and only a culprit or latent container is drawn in full.
- Propagated error (the whole model under the target) is a line: it accumulates along the network.
  Local error (each module alone on the reference's inputs) is one ring per module, never joined:
  the modules are independent, and autocast's exact FP32 modules sit in the "0 (exact)" band below
  the plot instead of pulling a line down into it. Values far below every tolerance (under
  :data:`FLOOR_DECADES` decades below it) are pinned to the plot's bottom edge.
- Culprits (▲) and latent findings (◇) are marked in a lane above the axis of both plots, in
  their target's colour, with a faint guide line through the plot.
- The headroom plot draws, when given, each module's margin: log2 of the factor by which its
  inputs may grow before it breaks under a target (:func:`report_html`'s ``margins``), on the same
  "doublings left" scale as the headroom.

Big models stay small: plot lines keep at most :data:`MAX_LINE_POINTS` points (the worst of each
stretch); hovered point markers are drawn for every call up to :data:`MARKER_LIMIT` calls, beyond
that only on culprits, latent findings, failures, local errors out of tolerance and the first
propagated point out of tolerance; runs of Inf/NaN become one bar; the table keeps
:data:`MAX_TABLE_ROWS` rows (culprits, latent findings and rows with non-finite values first, then
head and tail). 6000 calls make about 0.75 MB.
"""
from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from ..io.atomic import write_text
from ..formats import LOW_HEADROOM_BITS
from ..kinds import ErrorKind
from ..metrics import get_metric
from ..names import ROOT, CallKey
from .text import num, short, trim

MARKER_LIMIT = 150
MAX_LINE_POINTS = 1200
MAX_TABLE_ROWS = 3000
MAX_CULPRITS = 50
MAX_BANDS = 14  # blocks along the x axis
DENSE_TARGETS = 4  # from this many targets on, the table uses a smaller font and padding
TABLE_PX = 1190  # the table's width in a 1280 px window; names are abbreviated to fit it
SPLIT_SHARE = 0.4  # a block holding more than this share of the calls is split into its children
FLOOR_DECADES = 5  # error plot: values this many decades below the smallest tolerance are pinned
KINDS = (ErrorKind.PROPAGATED, ErrorKind.LOCAL)
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
REFERENCE_COLOR = "#7f1d1d"

# Plot geometry, in SVG user units (the SVG scales to the page width).
WIDTH, LEFT, RIGHT, TOP = 1100, 92, 16, 14
PLOT_HEIGHT = 250
LANE = 16
LABELS = 24  # height of the block labels under the axis

Margins = Mapping[str, float] | Mapping[str, Mapping[str, float]]


def write_report_html(rep: "Report", path: str | Path, margins: Margins | None = None) -> Path:
    """Write ``rep`` as one self-contained HTML file, atomically; returns the path."""
    return write_text(path, report_html(rep, margins))


def report_html(rep: "Report", margins: Margins | None = None) -> str:
    """The whole page as a string.

    ``margins`` (default: the report's own ``margins`` field, when it has one) is drawn in the
    headroom plot: ``{call key: factor}`` for one series, ``{target: {call key: factor}}``, or
    Margins results (``.target`` and ``.rows`` of ``.key``/``.module`` and ``.factor``). A factor is
    how much a module's inputs may grow before it breaks (``inf``: never, up to the largest factor
    tried); keys that name no call of the report are left out.

        >>> report_html(rep, margins={"encoder.layers.1.norm2": 1.0, "encoder.layers.0.norm2": 24.0})
    """
    measured = rep.call_errors()
    layout = _layout(rep, measured)
    cells = {(c.call_key, c.target, ErrorKind(c.kind)): c for c in measured}
    colors = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(rep.targets)}
    colors.setdefault(rep.reference, REFERENCE_COLOR)
    series = _margin_series(margins if margins is not None else getattr(rep, "margins", None))
    title = f"torchprobe report: {rep.model}"
    leaves = sum(not c.container for c in layout.calls)
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">reference {_e(rep.reference)} · metric {_e(rep.metric)} · '
        f"{len(layout.calls)} module calls ({leaves} leaves, {len(layout.calls) - leaves} containers) · "
        f"{len(rep.targets)} targets</p>",
        _reference_alert(rep),
        _verdicts(rep, colors),
        _culprits(rep),
        _latent(rep),
        _replay_failures(rep),
        "<h2>Error along the network</h2>",
        _error_plot(rep, layout, cells, colors),
        "<h2>FP16 headroom along the network</h2>",
        _headroom_plot(rep, layout, cells, colors, series),
        "<h2>Per-module table</h2>",
        _table(rep, layout, cells),
    ]
    names = [f"{c.key} ({c.module_type})" if c.module_type else c.key for c in layout.calls]
    data = json.dumps(names).replace("<", "\\u003c")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><main>\n" + "\n".join(b for b in body if b) + "\n</main>"
        f'<script type="application/json" id="tp-calls">{data}</script><script>{_JS}</script></body></html>\n'
    )


# -- layout: one entry per module call, blocks along the x axis ------------------------------------


@dataclass(frozen=True)
class _CallRow:
    """Reference statistics of one module call (worst over its output leaves), in call order."""

    key: str
    module: str
    module_type: str
    absmax: float | None
    headroom: float | None
    nan: int
    inf: int
    beyond: int
    container: bool  # another recorded module lies inside this one


@dataclass(frozen=True)
class _Block:
    """A band of consecutive calls along the x axis: calls ``first`` .. ``last`` of block ``name``."""

    name: str
    first: int
    last: int


@dataclass(frozen=True)
class _Layout:
    calls: list[_CallRow]
    blocks: list[_Block]
    x: "_Scale"


def _layout(rep: "Report", measured: tuple["CallError", ...]) -> _Layout:
    calls = _call_rows(rep, measured)
    x = _Scale(0, max(len(calls) - 1, 1), LEFT + 8, WIDTH - RIGHT - 8)
    return _Layout(calls, _blocks([c.module for c in calls]), x)


def _call_rows(rep: "Report", measured: tuple["CallError", ...]) -> list[_CallRow]:
    """Module calls in the order the reference returned them (then any only seen in errors)."""
    groups: dict[str, list] = {}
    for r in rep.rows:
        groups.setdefault(str(CallKey(r.module, r.call)), []).append(r)
    extra = [c for c in measured if c.call_key not in groups]
    modules = {rows[0].module for rows in groups.values()} | {c.module for c in extra}
    inside = _containers(modules)
    out = []
    for key, rows in groups.items():
        fl = [r for r in rows if r.is_floating]
        out.append(_CallRow(
            key, rows[0].module, rows[0].module_type,
            max((r.absmax for r in fl), default=None),
            min((r.headroom_bits for r in fl if r.headroom_bits is not None), default=None),
            sum(r.nan or 0 for r in fl), sum(r.inf or 0 for r in fl), sum(r.beyond_fp16 or 0 for r in fl),
            rows[0].module in inside,
        ))
    for c in extra:
        if c.call_key not in groups:
            groups[c.call_key] = []
            out.append(_CallRow(c.call_key, c.module, "", None, None, 0, 0, 0, c.module in inside))
    return out


def _containers(modules: Iterable[str]) -> set[str]:
    """The modules that hold another of ``modules`` (the root holds every other one)."""
    names = set(modules)
    out = {ROOT} if len(names - {ROOT}) else set()
    for n in names - {ROOT}:
        parts = n.split(".")
        out.update(".".join(parts[:k]) for k in range(1, len(parts)))
    return out & names


def _child_of(module: str, block: str) -> str:
    """The block one level below ``block`` that holds ``module`` (``module`` itself at the bottom)."""
    if module == block:
        return block
    rest = module if block == ROOT else module[len(block) + 1:]
    head = rest.split(".", 1)[0]
    return head if block == ROOT else f"{block}.{head}"


def _holds(outer: str, inner: str) -> bool:
    return outer != inner and (outer == ROOT or inner.startswith(outer + "."))


def _bands(labels: list[str]) -> list[_Block]:
    """Consecutive runs of one label; a container's own call joins the band before it, and a run of
    at most two calls between two runs of one block (a shared module called inside it) joins them."""
    out: list[_Block] = []
    for i, label in enumerate(labels):
        if out and (out[-1].name == label or _holds(label, out[-1].name)):
            out[-1] = _Block(out[-1].name, out[-1].first, i)
        elif len(out) >= 2 and out[-2].name == label and out[-1].last - out[-1].first < 2:
            out.pop()
            out[-1] = _Block(label, out[-1].first, i)
        else:
            out.append(_Block(label, i, i))
    return out


def _parent(block: str) -> str:
    return block.rpartition(".")[0] or ROOT


def _blocks(modules: list[str]) -> list[_Block]:
    """Bands along the x axis: the top-level modules; while one block holds more than SPLIT_SHARE
    of the calls, it is split into its children, and so are its siblings at least half its size
    (so that ``stages.0`` and ``stages.1`` are split alike)."""
    if not modules:
        return []
    labels = [_child_of(m, ROOT) for m in modules]
    while True:
        counts = Counter(labels)
        big, size = counts.most_common(1)[0]
        if size <= SPLIT_SHARE * len(labels):
            break
        alike = {b for b, k in counts.items() if b == big or (b != ROOT and _parent(b) == _parent(big) and 2 * k >= size)}
        split = [_child_of(m, label) if label in alike else label for m, label in zip(modules, labels)]
        if split == labels or len(_bands(split)) > MAX_BANDS:
            break
        labels = split
    return _bands(labels)


def _fit(name: str, chars: int) -> str:
    """A block label in at most ``chars`` characters: the whole name, else its last components,
    else the start of the last component ('' when not even four characters fit)."""
    if len(name) <= chars:
        return name
    parts = name.split(".")
    for k in range(1, len(parts)):
        tail = ".".join(parts[k:])
        if len(tail) + 1 <= chars:
            return "…" + tail
    return parts[-1][:chars - 1] + "…" if chars >= 4 else ""


# -- verdicts, culprits, latent findings ---------------------------------------------------------


def _reference_alert(rep: "Report") -> str:
    if rep.reference_finite:
        return ""
    origin = (f" NaN/Inf first appears in <code title=\"{_e(rep.culprits[0].key)}\">{_e(short(rep.culprits[0].key, 60))}</code>."
              if rep.culprits else "")
    return (f'<div class=alert><b>The {_e(rep.reference)} reference is not finite</b>: its output holds NaN/Inf, so no '
            f"target can be judged against it.{origin} Fix the model (or its inputs) first.</div>")


def _verdicts(rep: "Report", colors: dict[str, str]) -> str:
    cards = []
    for o in rep.outcomes:
        if not rep.reference_finite:
            verdict, detail = "NOT JUDGED", f"the {_e(rep.reference)} reference is not finite: nothing to compare against"
        elif o.failure:
            verdict, detail = "FAILED", _e(o.failure)
        else:
            verdict = "OK" if o.passed else "DIVERGES"
            err = "-" if o.output_error is None else num(o.output_error[rep.metric])
            detail = f"final {_e(rep.metric)} <b>{_e(err)}</b> ({_e(get_metric(rep.metric).rule(o.tol))})"
        blame = ""
        top = rep.culprits_for(o.target)[:3]
        if top:
            blame = "<div class=blame>culprits: " + ", ".join(f"{_code(c.module, 40)} ({_e(c.reason)})" for c in top) + "</div>"
        hidden = rep.latent_for(o.target)
        if hidden:
            blame += (f"<div class=blame>latent: {len(hidden)} broken inside, masked: "
                      + ", ".join(f"{_code(c.module, 40)} ({_e(c.reason)})" for c in hidden[:3]) + "</div>")
        cls = verdict.lower().replace(" ", "-")
        cards.append(
            f'<div class="card v-{cls}" style="border-top-color:{colors.get(o.target, PALETTE[-1])}">'
            f'<div class=target>{_e(o.target)}</div><div class=verdict>{verdict}</div>'
            f"<div>{detail}</div>{blame}</div>"
        )
    return '<section class="cards">' + "".join(cards) + "</section>"


def _culprits(rep: "Report") -> str:
    if not rep.reference_finite:
        head = f"<h2>Where NaN/Inf first appears in the {_e(rep.reference)} reference</h2>"
        if not rep.culprits:
            return head + "<p>No module produces NaN/Inf from finite inputs: the model's inputs already hold them.</p>"
        rows = [f"<tr><td>{i}</td><td>{_code(c.key, 56)}</td><td>{_abbr(c.module_type, 24)}</td>"
                f'<td><span class="reason r-{_e(c.reason)}">{_e(c.reason)}</span></td><td class=evidence>{_e(c.evidence)}</td></tr>'
                for i, c in enumerate(rep.culprits[:MAX_CULPRITS], 1)]
        return (head + "<p class=sub>The module calls that produce NaN/Inf from finite inputs in the reference run, "
                "in call order.</p><table class=culprits><thead><tr><th>#</th><th>module</th><th>type</th><th>reason</th>"
                f"<th>evidence</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    if not rep.culprits:
        text = "No culprit: every target is within tolerance." if rep else "No single module explains the divergence."
        return f"<h2>Culprits</h2><p>{text}</p>"
    rows = []
    for i, c in enumerate(rep.culprits[:MAX_CULPRITS], 1):
        prop = "-" if c.propagated_error is None else num(c.propagated_error)
        rows.append(
            f"<tr><td>{i}</td><td>{_code(c.key, 44)}</td><td>{_abbr(c.module_type, 20)}</td><td>{_e(c.target)}</td>"
            f'<td><span class="reason r-{_e(c.reason)}">{_e(c.reason)}</span></td>'
            f"<td>{_e(num(c.local_error))}</td><td>{_e(prop)}</td><td class=evidence>{_e(c.evidence)}</td></tr>"
        )
    more = f"<p class=note>... {len(rep.culprits) - MAX_CULPRITS} more</p>" if len(rep.culprits) > MAX_CULPRITS else ""
    return (
        "<h2>Culprits</h2><p class=sub>The modules that introduce the error (local error: the module alone, "
        "on the reference's exact inputs), most severe first. ▲ on the plots.</p>"
        f"<table class=culprits><thead><tr><th>#</th><th>module</th><th>type</th><th>target</th><th>reason</th>"
        f"<th>local {_e(rep.metric)}</th><th>propagated</th><th>evidence</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{more}"
    )


def _latent(rep: "Report") -> str:
    if not rep.latent:
        return ""
    rows = []
    for i, c in enumerate(rep.latent[:MAX_CULPRITS], 1):
        prop = "-" if c.propagated_error is None else num(c.propagated_error)
        masked = _code(c.masked_by, 36) if c.masked_by else "<span class=muted>not visible in the measured calls</span>"
        rows.append(
            f"<tr><td>{i}</td><td>{_code(c.key, 44)}</td><td>{_abbr(c.module_type, 20)}</td><td>{_e(c.target)}</td>"
            f'<td><span class="reason r-{_e(c.reason)}">{_e(c.reason)}</span></td>'
            f"<td>{_e(num(c.local_error))}</td><td>{_e(prop)}</td><td>{masked}</td></tr>"
            f"<tr class=ev><td></td><td colspan=7 class=evidence>{_e(c.evidence)}</td></tr>"
        )
    more = f"<p class=note>... {len(rep.latent) - MAX_CULPRITS} more</p>" if len(rep.latent) > MAX_CULPRITS else ""
    return (
        '<h2 id="latent">Within tolerance, but broken inside — masked downstream</h2><p class=sub>Latent findings: under a '
        "target whose final output passes, these modules overflow, produce NaN/Inf, flush most of their values to zero "
        "or exceed the tolerance alone; a later module (masked downstream by ...: where the propagated error is back "
        "within tolerance) hides it. They do not change the verdict. ◇ on the plots.</p>"
        f"<table class=culprits><thead><tr><th>#</th><th>module</th><th>type</th><th>target</th><th>reason</th>"
        f"<th>local {_e(rep.metric)}</th><th>propagated</th><th>masked downstream by</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{more}"
    )


def _replay_failures(rep: "Report") -> str:
    if not rep.replay_failures:
        return ""
    shown = "; ".join(_e(f) for f in rep.replay_failures[:3])
    more = f" ... {len(rep.replay_failures) - 3} more" if len(rep.replay_failures) > 3 else ""
    return (f"<p class=note>{len(rep.replay_failures)} module call(s) could not be replayed alone by torchprobe "
            f"(not findings; logged with tracebacks): {shown}{more}</p>")


def _code(name: str, width: int) -> str:
    """``name`` in code font, abbreviated in the middle to ``width`` characters, in full on hover."""
    shown = short(name, width)
    title = f' title="{_e(name)}"' if shown != name else ""
    return f"<code{title}>{_e(shown)}</code>"


# -- SVG primitives ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """Maps data values to pixels between ``lo`` and ``hi``, linear or log10.

    ``px_lo`` may be below ``px_hi`` on screen (error plots put worse values up). Values beyond the
    ends are pinned to the edges.
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


def _log_range(values: Iterable[float], floor: float = 0.0) -> tuple[float, float]:
    """A log range around the positive finite ``values``, not reaching below ``floor``."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    if not pos:
        return 1e-8, 1.0
    low = max(min(pos) / 2, floor) if floor > 0 else min(pos) / 2
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(max(pos) * 2))
    return 10.0**lo, 10.0 ** max(hi, lo + 1)


def _f(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _svg(height: float, parts: list[str], label: str, layout: _Layout, hover_y: float) -> str:
    """The plot, with the hover cursor and the label of the call under the mouse (see _JS)."""
    x = layout.x
    cursor = (f'<line class=cursor x1="0" y1="{TOP}" x2="0" y2="{_f(hover_y)}"/>'
              f'<text class=tip x="0" y="{TOP + 10}"></text>')
    return (f'<svg class=plot viewBox="0 0 {WIDTH} {_f(height)}" role="img" aria-label="{_e(label)}" '
            f'data-x0="{_f(x.px_lo)}" data-x1="{_f(x.px_hi)}" data-n="{len(layout.calls)}">'
            + "".join(parts) + cursor + "</svg>")


def _band_px(layout: _Layout, b: _Block) -> tuple[float, float]:
    n, x = len(layout.calls), layout.x
    half = (x.px_hi - x.px_lo) / max(n - 1, 1) / 2
    return max(LEFT, x(b.first) - half), min(WIDTH - RIGHT, x(b.last) + half)


def _block_shading(layout: _Layout, top: float, bottom: float) -> list[str]:
    """Alternate shading per block behind the plot."""
    parts = []
    for k, b in enumerate(layout.blocks):
        a, z = _band_px(layout, b)
        if k % 2:
            parts.append(f'<rect class=blk x="{_f(a)}" y="{_f(top)}" width="{_f(z - a)}" height="{_f(bottom - top)}"/>')
        elif k:
            parts.append(f'<line class=blksep x1="{_f(a)}" y1="{_f(top)}" x2="{_f(a)}" y2="{_f(bottom)}"/>')
    return parts


def _x_axis(layout: _Layout, y0: float) -> list[str]:
    """The axis line and one label per block (abbreviated to its band, in full on hover)."""
    parts = [f'<line class=axis x1="{LEFT}" y1="{_f(y0)}" x2="{WIDTH - RIGHT}" y2="{_f(y0)}"/>']
    for b in layout.blocks:
        a, z = _band_px(layout, b)
        span = f"calls {b.first}–{b.last}" if b.last > b.first else f"call {b.first}"
        shown = _fit(b.name, int((z - a - 4) / 6.2))
        text = f'<text class=bl x="{_f((a + z) / 2)}" y="{_f(y0 + 15)}">{_e(shown)}</text>' if shown else ""
        parts.append(f'<g class=block><title>{_e(b.name)} ({span})</title>'
                     f'<rect class=bh x="{_f(a)}" y="{_f(y0)}" width="{_f(z - a)}" height="{LABELS}"/>{text}</g>'
                     f'<line class=tick x1="{_f(a)}" y1="{_f(y0)}" x2="{_f(a)}" y2="{_f(y0 + 5)}"/>')
    parts.append(f'<text class=xn x="{WIDTH - RIGHT}" y="{_f(y0 + LABELS + 8)}">module calls in order of return, by block</text>')
    return parts


def _findings(rep: "Report") -> list[tuple["Culprit", bool]]:
    """Culprits and latent findings to mark on the plots: (finding, is latent)."""
    return [(c, False) for c in rep.culprits[:MAX_CULPRITS]] + [(c, True) for c in rep.latent[:MAX_CULPRITS]]


def _finding_lane(rep: "Report", layout: _Layout, colors: dict[str, str], lane_y: float,
                  top: float, bottom: float) -> tuple[list[str], list[str]]:
    """(guide lines behind the plot, markers in the lane at ``lane_y``): ▲ culprit, ◇ latent."""
    index = {c.key: i for i, c in enumerate(layout.calls)}
    guides, marks = [], []
    stacked: Counter = Counter()
    for c, latent in _findings(rep):
        i = index.get(c.key)
        if i is None:
            continue
        px = layout.x(i)
        dx = 7 * stacked[i]
        stacked[i] += 1
        color = colors.get(c.target, PALETTE[-1])
        cls = "fg lat" if latent else "fg"
        guides.append(f'<line class="{cls}" x1="{_f(px)}" y1="{_f(top)}" x2="{_f(px)}" y2="{_f(bottom)}"/>')
        where = f"; masked downstream by {c.masked_by}" if latent and c.masked_by else ""
        what = "latent" if latent else ("NaN/Inf origin" if not rep.reference_finite else "culprit")
        title = f"{what} under {c.target}: {c.key} ({c.module_type}): {c.reason}: {c.evidence}{where}"
        cx, cy = px + dx, lane_y
        if latent:
            shape = f'<path class="fmark lat" d="M{_f(cx)},{_f(cy - 5)}l5,5l-5,5l-5,-5z" fill="#fff" stroke="{color}">'
        else:
            shape = f'<path class=fmark d="M{_f(cx)},{_f(cy - 5)}l5.5,9.5h-11z" fill="{color}" stroke="{color}">'
        marks.append(f"{shape}<title>{_e(title)}</title></path>")
    return guides, marks


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


def _polyline(pts: list[tuple[float, float]], color: str, dashed: bool, name: str, cls: str = "series") -> str:
    if not pts:
        return ""
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    coords = " ".join(f"{_f(a)},{_f(b)}" for a, b in pts)
    return f'<polyline class="{cls}" points="{coords}" stroke="{color}"{dash}><title>{_e(name)}</title></polyline>'


def _dots(pts: list[tuple[float, float]], color: str, name: str) -> str:
    """Unjoined points as one path (round caps on zero-length segments)."""
    if not pts:
        return ""
    d = "".join(f"M{_f(a)},{_f(b)}h0" for a, b in pts)
    return f'<path class=dots d="{d}" stroke="{color}"><title>{_e(name)}</title></path>'


def _marker(px: float, py: float, color: str, title: str, hollow: bool = False, r: float = 3.2) -> str:
    fill = "#fff" if hollow else color
    return f'<circle cx="{_f(px)}" cy="{_f(py)}" r="{r}" fill="{fill}" stroke="{color}"><title>{_e(title)}</title></circle>'


def _square(px: float, py: float, color: str, title: str, hollow: bool = False, full: bool = False) -> str:
    """A container's point: a small square, faded unless ``full`` (a culprit or latent container)."""
    fill = "#fff" if hollow else color
    cls = "ct full" if full else "ct"
    return (f'<rect class="{cls}" x="{_f(px - 2.6)}" y="{_f(py - 2.6)}" width="5.2" height="5.2" fill="{fill}" '
            f'stroke="{color}"><title>{_e(title)}</title></rect>')


def _legend(items: list[tuple[str, str, str]]) -> str:
    """HTML legend: (color, 'solid'|'dashed'|'dotted'|'dot'|'ring'|'square'|'band'|'tri'|'diamond', label)."""
    out = []
    for color, style, label in items:
        if style in ("solid", "dashed", "dotted"):
            dash = {"solid": "", "dashed": ' stroke-dasharray="5 4"', "dotted": ' stroke-dasharray="2 3"'}[style]
            sample = f'<line x1="1" y1="6" x2="27" y2="6" stroke="{color}" stroke-width="2"{dash}/>'
        elif style == "band":
            sample = f'<rect x="1" y="1" width="26" height="10" fill="{color}"/>'
        elif style == "square":
            sample = f'<rect x="10" y="2" width="8" height="8" fill="{color}" stroke="{color}" opacity=".45"/>'
        elif style == "tri":
            sample = f'<path d="M14,1l6,10h-12z" fill="{color}"/>'
        elif style == "diamond":
            sample = f'<path d="M14,0.5l5.5,5.5l-5.5,5.5l-5.5,-5.5z" fill="#fff" stroke="{color}" stroke-width="1.6"/>'
        else:
            fill = "#fff" if style == "ring" else color
            sample = f'<circle cx="14" cy="6" r="4" fill="{fill}" stroke="{color}" stroke-width="1.5"/>'
        out.append(f'<span class=key><svg width="28" height="12">{sample}</svg>{_e(label)}</span>')
    return '<div class=legend>' + "".join(out) + "</div>"


def _finding_legend(rep: "Report") -> list[tuple[str, str, str]]:
    out = []
    if rep.culprits:
        out.append(("#374151", "tri", "NaN/Inf origin in the reference" if not rep.reference_finite else "culprit"))
    if rep.latent:
        out.append(("#374151", "diamond", "latent (broken inside, masked)"))
    return out


# -- plot 1: error per module call -----------------------------------------------------------------


def _display(metric: str, v: float) -> float:
    """The plotted value: cosine is shown as 1 - cosine so that every error plot is 'up is worse'."""
    return 1.0 - v if get_metric(metric).similarity else v


def _error_plot(rep: "Report", layout: _Layout, cells: dict, colors: dict[str, str]) -> str:
    metric, calls, n, x = rep.metric, layout.calls, len(layout.calls), layout.x
    m = get_metric(metric)
    if not rep.errors or n == 0:
        return "<p>No per-module error was measured.</p>"
    tols = {o.target: o.tol for o in rep.outcomes}
    marked = {(c.key, c.target) for c, _ in _findings(rep)}
    series = {(t, k): [(i, cells[(c.key, t, k)]) for i, c in enumerate(calls) if (c.key, t, k) in cells]
              for t in rep.targets for k in KINDS}
    values = [cell.value for pts in series.values() for _, cell in pts if cell.value is not None]
    bounds = [_display(metric, m.bound(tol)) for tol in tols.values()]
    shown = [_display(metric, v) for v in values if math.isfinite(v)] + bounds
    floor = min((b for b in bounds if b > 0), default=0.0) * 10.0**-FLOOR_DECADES
    top = TOP + 14  # the band above the plot holds non-finite and failed points
    bottom = top + PLOT_HEIGHT
    zero_y = bottom + 12  # the band below holds exact matches (zero error)
    has_findings = bool(_findings(rep))
    axis_y = zero_y + 8 + (LANE + 2 if has_findings else 0)
    y, label, fmt = _error_axis(metric, shown, top, bottom, floor)

    def py(v: float) -> float:
        if _nonfinite(metric, v):
            return TOP + 4
        return zero_y if metric != "sqnr" and _display(metric, v) <= 0 else y(_display(metric, v))

    parts = _block_shading(layout, TOP - 2, zero_y + 6)
    parts += _y_axis(y, fmt, label)
    parts.append(f'<rect class=band x="{LEFT}" y="{TOP - 2}" width="{WIDTH - RIGHT - LEFT}" height="12"/>'
                 f'<text class=yt x="{LEFT - 6}" y="{TOP + 4}">inf/NaN</text>')
    parts.append(f'<rect class=zband x="{LEFT}" y="{bottom + 6}" width="{WIDTH - RIGHT - LEFT}" height="12"/>'
                 f'<text class=yt x="{LEFT - 6}" y="{zero_y}">0 (exact)</text>')
    parts += _tol_lines(metric, tols, y)
    guides, marks = _finding_lane(rep, layout, colors, zero_y + 8 + LANE / 2, TOP - 2, zero_y + 6)
    parts += guides
    legend, containers = [], False
    for (t, kind), pts in series.items():
        if not pts:
            continue
        color = colors.get(t, PALETTE[-1])
        local = kind == ErrorKind.LOCAL
        legend.append((color, "ring" if local else "solid", f"{t} {'local (each module alone)' if local else 'propagated'}"))
        leaf = [(i, c) for i, c in pts if not calls[i].container]
        measured = _thin([(i, c.value) for i, c in leaf if c.value is not None], MAX_LINE_POINTS, m.worse)
        if not local:
            parts.append(_polyline([(x(i), py(v)) for i, v in measured], color, False, f"{t} {kind}"))
        elif n > MARKER_LIMIT:
            parts.append(_dots([(x(i), py(v)) for i, v in measured], color, f"{t} {kind}"))
        keys = {k for k, tt in marked if tt == t}
        for i, c, big in _markers(leaf, kind, metric, tols[t], n, keys, calls):
            call = calls[i]
            if c.failure:
                parts.append(_marker(x(i), TOP + 4, color, f"{call.key}: failed under {t} ({kind}): {c.failure}", hollow=True, r=4))
            else:
                title = f"{call.key} ({call.module_type}) · {t} {kind}: {metric} {num(c.value)}"
                parts.append(_marker(x(i), py(c.value), color, title, hollow=local, r=3.6 if big else 2.6))
        for i, c in pts:
            call = calls[i]
            if not call.container or not (n <= MARKER_LIMIT or c.failure or call.key in keys):
                continue
            containers = True
            what = f"failed: {c.failure}" if c.failure else f"{metric} {num(c.value)}"
            title = f"{call.key} ({call.module_type}, container) · {t} {kind}: {what}"
            parts.append(_square(x(i), TOP + 4 if c.failure else py(c.value), color, title, hollow=local, full=call.key in keys))
    parts += marks
    parts += _x_axis(layout, axis_y)
    if containers:
        legend.append(("#6b7280", "square", "container (its output is mostly a child's: drawn apart)"))
    legend += _finding_legend(rep)
    legend.append(("#9ca3af", "dashed", "tolerance"))
    note = "" if n <= MARKER_LIMIT else (f"<p class=note>{n} calls: markers only on culprits, latent findings, failures, local "
                                         "errors out of tolerance and where each propagated line first leaves it.</p>")
    return ('<figure>' + _svg(axis_y + LABELS + 12, parts, "error per module call", layout, zero_y + 6)
            + _legend(legend) + note + "</figure>")


def _error_axis(metric: str, shown: list[float], top: float, bottom: float,
                floor: float = 0.0) -> tuple[_Scale, str, Callable[[float], str]]:
    """Y scale, label and tick format: log for distances (and 1 - cosine), linear dB for SQNR."""
    if metric == "sqnr":
        finite = [v for v in shown if math.isfinite(v)] or [0.0, 1.0]
        lo, hi = min(finite), max(finite)
        pad = max((hi - lo) * 0.05, 1.0)
        return _Scale(lo - pad, hi + pad, top, bottom), "SQNR dB (down is better)", lambda v: f"{v:g}"
    lo, hi = _log_range(shown, floor)
    label = ("1 − cosine" if metric == "cosine" else metric) + " (log)"
    return _Scale(lo, hi, bottom, top, log=True), label, lambda v: f"1e{round(math.log10(v))}"


def _tol_lines(metric: str, tols: dict[str, float], y: _Scale) -> list[str]:
    """One dashed line per distinct tolerance, labelled with the targets that use it."""
    parts = []
    for tol, targets in _group_tols(tols).items():
        ty = y(_display(metric, get_metric(metric).bound(tol)))
        names = _e(", ".join(targets))
        parts.append(f'<line class=tol x1="{LEFT}" y1="{_f(ty)}" x2="{WIDTH - RIGHT}" y2="{_f(ty)}"><title>tolerance {_e(num(tol))} '
                     f'({names})</title></line><text class=toll x="{WIDTH - RIGHT - 4}" y="{_f(ty - 4)}">tol {_e(num(tol))} · {names}</text>')
    return parts


def _markers(pts: list[tuple[int, "CallError"]], kind: str, metric: str, tol: float, n: int, marked: set[str],
             calls: list[_CallRow]) -> list[tuple[int, "CallError", bool]]:
    """Which points of one series get a hovered marker: (index, cell, out of tolerance).

    Every point when the network is small; otherwise culprits, latent findings, failures, local
    errors out of tolerance and the first propagated point out of tolerance, at most MARKER_LIMIT.
    """
    out, left = [], False
    for i, c in pts:
        bad = c.failure is not None or _nonfinite(metric, c.value) or not get_metric(metric).passes(c.value, tol)
        first = kind == ErrorKind.PROPAGATED and bad and not left
        left = left or (kind == ErrorKind.PROPAGATED and bad)
        notable = c.failure is not None or calls[i].key in marked or (bad and kind == ErrorKind.LOCAL) or first
        if n <= MARKER_LIMIT or len(pts) == 1 or notable:
            out.append((i, c, bad))
    return out if n <= MARKER_LIMIT else out[:MARKER_LIMIT]


def _nonfinite(metric: str, v: float) -> bool:
    """A NaN or infinitely bad error value (drawn in the band above the plot)."""
    worst_end = -math.inf if get_metric(metric).higher_is_better else math.inf
    return math.isnan(v) or v == worst_end


def _group_tols(tols: dict[str, float]) -> dict[float, list[str]]:
    out: dict[float, list[str]] = {}
    for t, tol in tols.items():
        out.setdefault(tol, []).append(t)
    return out


# -- plot 2: FP16 headroom ---------------------------------------------------------------------


def _margin_series(margins: object) -> dict[str, dict[str, float]]:
    """Margins as {series label: {call key: factor}}, from either mapping shape or Margins-like
    objects (``.rows`` of items with ``.key`` or ``.module`` and ``.factor``, an optional ``.target``)."""
    if margins is None:
        return {}
    if isinstance(margins, Mapping):
        if margins and all(isinstance(v, Mapping) for v in margins.values()):
            return {str(t): {str(k): float(f) for k, f in m.items()} for t, m in margins.items()}
        return {"margin": {str(k): float(f) for k, f in margins.items()}}
    many = margins if isinstance(margins, (list, tuple)) else [margins]
    out = {}
    for mg in many:
        rows = getattr(mg, "rows", None)
        if rows is None:
            from ..errors import InvalidArgument

            raise InvalidArgument(f"margins={type(mg).__name__}: give {{call key: factor}}, {{target: {{call key: factor}}}} "
                                  "or Margins results")
        out[str(getattr(mg, "target", "margin"))] = {str(getattr(r, "key", None) or r.module): float(r.factor) for r in rows}
    return out


def _bits(factor: float) -> float:
    """A growth factor as doublings (log2), the headroom plot's unit."""
    return math.inf if math.isinf(factor) else math.log2(factor)


def _headroom_plot(rep: "Report", layout: _Layout, cells: dict, colors: dict[str, str],
                   margins: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Reference headroom per call; each margin series ({label: {call key: factor}}) on the same axis."""
    calls, n, x = layout.calls, len(layout.calls), layout.x
    index = {c.key: i for i, c in enumerate(calls)}
    pts = [(i, c.headroom) for i, c in enumerate(calls) if c.headroom is not None and not math.isnan(c.headroom)]
    mpts = {label: sorted((index[k], f) for k, f in m.items() if k in index and not math.isnan(f))
            for label, m in (margins or {}).items()}
    mpts = {label: p for label, p in mpts.items() if p}
    if not pts and not mpts:
        return "<p>No floating-point module output in the reference.</p>"
    finite = [h for _, h in pts if math.isfinite(h)] + [_bits(f) for p in mpts.values() for _, f in p if math.isfinite(f)]
    finite = finite or [0.0]
    lo, hi = min(min(finite), -1.0), max(max(finite), 2.0)
    pad = (hi - lo) * 0.06
    lanes = [t for t in rep.targets if any(_has_nonfinite(cells.get((c.key, t, k))) for c in calls for k in KINDS)]
    has_findings = bool(_findings(rep))
    bottom = TOP + PLOT_HEIGHT
    lane_top = bottom + 8
    finding_y = lane_top + LANE * len(lanes) + LANE / 2
    axis_y = lane_top + LANE * (len(lanes) + has_findings) + (4 if lanes or has_findings else 0)
    y = _Scale(lo - pad, hi + pad, bottom, TOP)
    parts = _block_shading(layout, TOP, bottom)
    parts.append(f'<rect class=danger x="{LEFT}" y="{_f(y(0))}" width="{WIDTH - RIGHT - LEFT}" height="{_f(bottom - y(0))}"/>')
    parts += _y_axis(y, lambda v: f"{v:g}", "bits = doublings left")
    zy, ly = _f(y(0)), _f(y(LOW_HEADROOM_BITS))
    parts.append(f'<line class=zero x1="{LEFT}" y1="{zy}" x2="{WIDTH - RIGHT}" y2="{zy}"><title>0 bits: absmax = 65504</title></line>'
                 f'<text class=toll x="{WIDTH - RIGHT - 4}" y="{_f(y(0) + 12)}">beyond FP16 max (65504)</text>'
                 f'<line class=low x1="{LEFT}" y1="{ly}" x2="{WIDTH - RIGHT}" y2="{ly}"><title>{LOW_HEADROOM_BITS:g} bit: one doubling from overflow</title></line>')
    guides, marks = _finding_lane(rep, layout, colors, finding_y, TOP, bottom)
    parts += guides
    leaf = [(i, h) for i, h in pts if not calls[i].container]
    line = _thin(leaf, MAX_LINE_POINTS, lambda a, b: a < b)
    parts.append(_polyline([(x(i), y(h)) for i, h in line], "#374151", False, "reference headroom (bits)"))
    containers = False
    for i, h in pts:
        c = calls[i]
        bad = c.nan or c.inf or c.beyond
        if not (bad or n <= MARKER_LIMIT):
            continue
        title = f"{c.key} ({c.module_type}{', container' if c.container else ''}): absmax {num(c.absmax)}, headroom {num(h)} bits"
        if bad:
            title += f"; reference has {c.beyond} values beyond 65504, {c.inf} Inf, {c.nan} NaN"
        color = "#dc2626" if bad else "#374151"
        if c.container:
            containers = True
            parts.append(_square(x(i), y(h), color, title))
        else:
            parts.append(_marker(x(i), y(h), color, title, r=4.5 if bad else 2.4))
    legend = [("#374151", "solid", "reference headroom (min over leaves)"), ("#dc2626", "dot", "reference output beyond FP16 / Inf / NaN"),
              ("#fde2e2", "band", "does not fit FP16")]
    for k, (label, p) in enumerate(mpts.items()):
        color = colors.get(label, PALETTE[(len(rep.targets) + k) % len(PALETTE)])
        parts += _margin_line(label, p, calls, x, y, color)
        legend.append((color, "dotted", f"margin{'' if label == 'margin' else ' under ' + label}: "
                                        "input growth it survives (log2 factor; hollow at the top: never broke)"))
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
                    parts.append(_marker(x(i), cy, colors[t], title, hollow=kind == ErrorKind.LOCAL, r=4))
                continue
            for a, b in _runs(hit):
                span = calls[a].key if a == b else f"{calls[a].key} … {calls[b].key} ({b - a + 1} calls)"
                fill = "#fff" if kind == ErrorKind.LOCAL else colors[t]
                parts.append(f'<rect x="{_f(x(a) - 2)}" y="{_f(cy - 4)}" width="{_f(x(b) - x(a) + 4)}" height="8" fill="{fill}" '
                             f'stroke="{colors[t]}"><title>{_e(span)} under {_e(t)} ({kind}): Inf/NaN</title></rect>')
    parts += marks
    parts += _x_axis(layout, axis_y)
    if containers:
        legend.append(("#6b7280", "square", "container"))
    legend += [(colors[t], "dot", f"{t}: Inf/NaN in module output (ring: local)") for t in lanes]
    legend += _finding_legend(rep)
    return ('<figure>' + _svg(axis_y + LABELS + 12, parts, "FP16 headroom per module call", layout, bottom)
            + _legend(legend) + "</figure>")


def _margin_line(label: str, pts: list[tuple[int, float]], calls: list[_CallRow], x: _Scale, y: _Scale,
                 color: str) -> list[str]:
    """One margin series: a dotted line through the finite margins, a diamond per module (the
    weakest MARKER_LIMIT when there are more), inf (never broke) pinned to the top edge."""
    under = "" if label == "margin" else f" under {label}"
    finite = [(i, _bits(f)) for i, f in pts if math.isfinite(f)]
    line = _thin(finite, MAX_LINE_POINTS, lambda a, b: a < b)
    parts = [_polyline([(x(i), y(b)) for i, b in line], color, False, f"margin{under} (log2 factor)", cls="series mline")]
    shown = pts if len(pts) <= MARKER_LIMIT else sorted(pts, key=lambda p: p[1])[:MARKER_LIMIT]
    for i, f in shown:
        c = calls[i]
        py = y.px_hi if math.isinf(f) else y(_bits(f))
        if math.isinf(f):
            title = f"{c.key} ({c.module_type}): margin{under}: no break up to the largest factor tried"
        else:
            title = f"{c.key} ({c.module_type}): inputs may grow ×{num(f)} before it breaks{under} ({num(_bits(f))} doublings)"
        fill = "#fff" if math.isinf(f) else color
        parts.append(f'<path class=mmark d="M{_f(x(i))},{_f(py - 4)}l4,4l-4,4l-4,-4z" fill="{fill}" stroke="{color}">'
                     f"<title>{_e(title)}</title></path>")
    return parts


def _has_nonfinite(cell: "CallError | None") -> bool:
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


def _name_width(targets: int) -> int:
    """Characters of a module name in the table, so that the table fits a 1280 px wide window.

    Measured in Chromium: the fixed columns take ``base`` px, each target's column pair
    ``per_target``, each character of a name ``per_char`` (smaller in the dense table)."""
    base, per_target, per_char = (396, 120, 6.92) if targets >= DENSE_TARGETS else (462, 140, 7.53)
    return int(max(16, min(60, (TABLE_PX - base - per_target * targets - 30) / per_char)))


def _table(rep: "Report", layout: _Layout, cells: dict) -> str:
    culprits = {c.key for c in rep.culprits}
    latent = {c.key for c in rep.latent} - culprits
    tols = {o.target: o.tol for o in rep.outcomes}
    width = _name_width(len(rep.targets))
    head = ["#", "module call", "type", "ref absmax", "headroom\nbits", "ref NaN/Inf\n/>65504"]
    head += ["local" if k == ErrorKind.LOCAL else "prop." for _ in rep.targets for k in (ErrorKind.LOCAL, ErrorKind.PROPAGATED)]
    rows, flags = [], []
    for i, c in enumerate(layout.calls):
        mark = " ★" if c.key in culprits else " ◇" if c.key in latent else ""
        bad = " class=bad" if c.nan or c.inf or c.beyond else ""
        cols = [f"<td>{i}</td><td>{_code(c.key, width)}{mark}</td><td>{_abbr(c.module_type, 18)}</td>",
                f"<td>{num(c.absmax)}</td><td>{num(c.headroom)}</td><td{bad}>{c.nan}/{c.inf}/{c.beyond}</td>"]
        for t in rep.targets:
            for k in (ErrorKind.LOCAL, ErrorKind.PROPAGATED):
                cols.append(_value_cell(cells.get((c.key, t, k)), rep.metric, tols[t]))
        cls = [name for name, on in (("culprit", c.key in culprits), ("latent", c.key in latent), ("ct", c.container)) if on]
        rows.append([f"<tr{' class=' + chr(34) + ' '.join(cls) + chr(34) if cls else ''}>" + "".join(cols) + "</tr>"])
        flags.append(bool(mark) or bool(bad))
    kept = trim(rows, flags, MAX_TABLE_ROWS)
    body = "".join(r[0] if r[0].startswith("<tr") else f'<tr class=gap><td colspan="{len(head)}">{_e(r[0])}</td></tr>' for r in kept)
    ths = "".join(f"<th>{'<br>'.join(_e(p) for p in h.split(chr(10)))}</th>" for h in head)
    groups = '<th colspan="6" class=grp></th>' + "".join(f'<th colspan="2" class=grp>{_e(t)}</th>' for t in rep.targets)
    return (f"<p class=sub>Worst output leaf per module call; click a header to sort. ★ culprit, ◇ latent; containers "
            f"in grey. Long names are abbreviated in the middle: hover for the full name.</p>"
            f"<div class=scroll><table class=\"sortable{' dense' if len(rep.targets) >= DENSE_TARGETS else ''}\"><thead><tr class=groups>{groups}</tr><tr>{ths}</tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _abbr(text: str, width: int) -> str:
    shown = short(text, width)
    return _e(text) if shown == text else f'<span title="{_e(text)}">{_e(shown)}</span>'


def _value_cell(cell: "CallError | None", metric: str, tol: float) -> str:
    if cell is None:
        return "<td>-</td>"
    if cell.failure:
        return f'<td class=bad title="{_e(cell.failure)}">failed</td>'
    out = " class=bad" if not get_metric(metric).passes(cell.value, tol) else ""
    return f"<td{out}>{num(cell.value)}</td>"


def _e(s: object) -> str:
    return html.escape(str(s), quote=True)


_CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--bad:#fde2e2;--hl:#fff7d6;--lat:#fef3c7}
*{box-sizing:border-box}
body{margin:0;color:var(--fg);background:#f8fafc;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1320px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.sub,.note,.muted{color:var(--muted)}.sub,.note{margin:4px 0 10px}.note{font-size:12px}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
.alert{margin:14px 0 0;padding:10px 14px;border:1px solid #fca5a5;border-left:5px solid #b91c1c;border-radius:6px;background:#fef2f2;color:#7f1d1d}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}
.card{flex:1 1 240px;min-width:0;border:1px solid var(--line);border-top:4px solid;border-radius:6px;padding:10px 12px}
.card .target{font-weight:600}.card .verdict{font-size:20px;font-weight:700;letter-spacing:.02em}
.v-ok .verdict{color:#047857}.v-diverges .verdict{color:#b91c1c}.v-failed .verdict{color:#7c2d12}.v-not-judged .verdict{color:#7f1d1d}
.blame{margin-top:4px;color:var(--muted);overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{padding:4px 7px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#f3f4f6;vertical-align:bottom}thead{position:sticky;top:0;z-index:1}
.sortable th.grp{text-align:center;border-bottom:0;padding-bottom:0;font-weight:600}.sortable th.grp+th.grp{border-left:2px solid #fff}
td:nth-child(2),th:nth-child(2),td:nth-child(3),th:nth-child(3){text-align:left}
table.culprits td,table.culprits th{text-align:left}
table.culprits td.evidence{white-space:normal;overflow-wrap:anywhere;min-width:240px}
table.culprits tr.ev td{color:var(--muted);padding-top:0}table.culprits tr:has(+ tr.ev) td{border-bottom:0}
.sortable th{cursor:pointer;user-select:none}.sortable th:hover{background:#e5e7eb}.sortable th.grp{cursor:default;background:#f3f4f6}
.sortable th.asc:after{content:" ▲"}.sortable th.desc:after{content:" ▼"}
tr.culprit td{background:var(--hl)}tr.latent td{background:var(--lat)}
.sortable tbody tr{background:#fff}.sortable tbody tr.culprit{background:var(--hl)}.sortable tbody tr.latent{background:var(--lat)}
.sortable tbody td:nth-child(2),.sortable thead tr:last-child th:nth-child(2){position:sticky;left:0;background:inherit}
.sortable thead tr:last-child th:nth-child(2){background:#f3f4f6}
table td.bad,tr.culprit td.bad,tr.latent td.bad{background:var(--bad);color:#991b1b}
tr.ct td:nth-child(2) code,tr.ct td:nth-child(3){color:var(--muted)}
.dense{font-size:11.5px}.dense th,.dense td{padding:3px 4px}.dense code{font-size:11.5px}
tr.gap td{text-align:center;color:var(--muted);font-style:italic}
.scroll{max-height:720px;overflow:auto;border:1px solid var(--line)}
.reason{padding:1px 7px;border-radius:9px;background:#e5e7eb;font-size:12px}
.r-overflow,.r-nan,.r-error{background:#fee2e2;color:#991b1b}.r-underflow{background:#e0e7ff;color:#3730a3}
figure{margin:0}svg.plot{width:100%;height:auto;display:block}
svg text{font-size:11px;fill:#4b5563}
.axis{stroke:#9ca3af}.grid{stroke:#eef0f3}.tick{stroke:#9ca3af}
.blk{fill:#f3f5f8}.blksep{stroke:#eef0f3}.bh{fill:transparent}.block:hover .bh{fill:#eef2ff}
.bl{text-anchor:middle;font-size:11px;fill:#374151}
.yt{text-anchor:end;dominant-baseline:middle}.xt{text-anchor:middle}.xn{text-anchor:end;font-size:10.5px;fill:#9ca3af}
.yl{text-anchor:middle;font-size:12px;fill:#374151}
.toll,.tip{text-anchor:end;font-size:10.5px;fill:#6b7280;paint-order:stroke;stroke:#fff;stroke-width:3px}
.tip{font-size:11.5px;fill:#111827;display:none}.cursor{stroke:#6b7280;stroke-dasharray:2 2;display:none;pointer-events:none}
.tol,.low{stroke:#9ca3af;stroke-dasharray:6 4}.zero{stroke:#b91c1c;stroke-width:1.2}
.band{fill:#fef2f2}.zband{fill:#f0fdf4}.danger{fill:#fde2e2;opacity:.55}
.series{fill:none;stroke-width:1.8;stroke-linejoin:round}.mline{stroke-width:1.3;stroke-dasharray:2 3}
.dots{fill:none;stroke-width:4;stroke-linecap:round;opacity:.6}
.ct{opacity:.4;stroke-width:1.2}.ct.full{opacity:1;stroke-width:1.6}
.fg{stroke:#dc2626;stroke-width:1;opacity:.3}.fg.lat{stroke:#d97706;stroke-dasharray:3 3;opacity:.5}
.fmark{stroke-width:1.6}.mmark{stroke-width:1;opacity:.85}
circle{stroke-width:1.4}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12px;color:#374151;margin:2px 0 4px 92px}
.key{display:inline-flex;align-items:center;gap:5px}
"""

_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.tHead.rows[table.tHead.rows.length - 1].cells;
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("asc");
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(asc ? "asc" : "desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.filter.call(body.rows, function (r) { return r.className !== "gap"; });
      function key(r) {
        var t = r.cells[col].textContent.replace(/[\\u2605\\u25c7]/g, "").trim();
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
var tpCalls = JSON.parse(document.getElementById("tp-calls").textContent);
document.querySelectorAll("svg.plot[data-n]").forEach(function (svg) {
  var x0 = +svg.dataset.x0, x1 = +svg.dataset.x1, n = +svg.dataset.n;
  var cursor = svg.querySelector(".cursor"), tip = svg.querySelector(".tip");
  function hide() { cursor.style.display = tip.style.display = "none"; }
  svg.addEventListener("mouseleave", hide);
  svg.addEventListener("mousemove", function (ev) {
    var pt = svg.createSVGPoint();
    pt.x = ev.clientX; pt.y = ev.clientY;
    var p = pt.matrixTransform(svg.getScreenCTM().inverse());
    var step = n > 1 ? (x1 - x0) / (n - 1) : 1;
    if (p.x < x0 - step / 2 - 4 || p.x > x1 + step / 2 + 4 || !n) { hide(); return; }
    var i = Math.max(0, Math.min(n - 1, Math.round((p.x - x0) / step)));
    var x = n > 1 ? x0 + i * step : x0;
    cursor.setAttribute("x1", x); cursor.setAttribute("x2", x); cursor.style.display = "inline";
    tip.textContent = "#" + i + " " + tpCalls[i];
    tip.setAttribute("x", x < (x0 + x1) / 2 ? x + 6 : x - 6);
    tip.style.textAnchor = x < (x0 + x1) / 2 ? "start" : "end";
    tip.style.display = "inline";
  });
});
"""
