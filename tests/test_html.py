"""Tests for torchprobe.render.html: the self-contained HTML report, structurally and in Chromium."""
from __future__ import annotations

import copy
import dataclasses
import html
import json
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe.capture import Row
from torchprobe.kinds import ErrorKind, Reason
from torchprobe.names import is_within
from torchprobe.results import Culprit, ModuleError, Report, TargetOutcome
from torchprobe.metrics import ErrorMetrics
from torchprobe.render.html import MAX_LINE_POINTS, MAX_TABLE_ROWS, report_html, write_report_html
from torchprobe.render.text import module_table, num

TARGETS = ("eager:fp16", "autocast:fp16", "eager:bf16")


class Net(nn.Module):
    """Linear -> LayerNorm -> Linear; the first Linear's output goes beyond FP16 max (~7e4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 4)
        with torch.no_grad():
            self.proj.weight.mul_(40000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.proj(x)))


@pytest.fixture(scope="module")
def rep() -> Report:
    torch.manual_seed(0)
    return tp.report(Net(), torch.randn(8, 16), targets=TARGETS)


@pytest.fixture(scope="module")
def page(rep: Report, tmp_path_factory) -> tuple[Report, str, object]:
    path = rep.to_html(tmp_path_factory.mktemp("html") / "report.html")
    return rep, path.read_text(encoding="utf-8"), path


def svgs(text: str) -> list[str]:
    return re.findall(r"<svg class=plot.*?</svg>", text, flags=re.S)


# ------------------------------------------------------------------------------ structure


def test_written_atomically_and_returns_path(rep: Report, tmp_path) -> None:
    path = write_report_html(rep, tmp_path / "r.html")
    assert path == tmp_path / "r.html" and path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left behind
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_verdicts_and_culprits(page) -> None:
    rep, text, _ = page
    assert rep.culprits, "the test model must produce culprits"
    assert not rep.outcome("eager:fp16").passed and rep.outcome("eager:bf16").passed
    assert "DIVERGES" in text and ">OK<" in text
    assert f"torchprobe report: {rep.model}" in text
    for c in rep.culprits:
        assert f"<code>{html.escape(c.module)}</code>" in text
        assert html.escape(c.evidence) in text
    assert "proj" in {c.module for c in rep.culprits}
    assert "class=culprit" in text  # highlighted table row


def test_failed_target_is_shown(rep: Report) -> None:
    failed = TargetOutcome("strict:bf16", 0.05, None, False, failure="the model failed under strict:bf16 (in norm): boom")
    text = report_html(dataclasses.replace(rep, targets=(*rep.targets, "strict:bf16"), outcomes=(*rep.outcomes, failed)))
    assert "FAILED" in text and "boom" in text


def test_plots_have_a_line_per_target_and_kind(page) -> None:
    rep, text, _ = page
    error_plot, headroom_plot = svgs(text)
    for t in rep.targets:
        # propagated error accumulates along the network: a line; local errors are independent: rings, never joined
        assert re.search(rf"<polyline[^>]*points=\"[^\"]+\"[^>]*><title>{re.escape(t)} propagated</title>", error_plot), t
        assert f"<title>{t} local</title>" not in error_plot
        assert re.search(rf'<circle [^>]*fill="#fff"[^>]*><title>\w+ \(\w+\) · {re.escape(t)} local: rel_l2 ', error_plot), t
    assert error_plot.count("<line class=tol ") == 2  # fp16 tol 0.01 and bf16 tol 0.05
    assert "<polyline" in headroom_plot and "class=zero" in headroom_plot
    # hover titles name the module; the reference overflow of proj and the target Inf are marked
    assert "<title>proj (Linear) · eager:fp16 propagated: rel_l2 inf</title>" in error_plot
    assert re.search(r"<title>proj \(Linear\): absmax [^<]*; reference has \d+ values beyond 65504", headroom_plot)
    assert re.search(r"<title>norm under eager:fp16 \(propagated\): \d+ Inf, \d+ NaN</title>", headroom_plot)
    # the culprit is marked in the lane of both plots, in its target's colour
    for plot in (error_plot, headroom_plot):
        assert re.search(r"<path class=fmark [^>]*><title>culprit under eager:fp16: proj \(Linear\): overflow", plot)


def test_table_has_every_call_and_target_column(page) -> None:
    rep, text, _ = page
    table = text[text.index('<table class="sortable'):]
    for key in ("proj", "norm", "head", "(root)"):
        assert f"<code>{key}</code>" in table
    groups = re.findall(r'<th colspan="2" class=grp>([^<]*)</th>', table)
    assert groups == list(rep.targets)
    assert table.count("<th>local</th>") == table.count("<th>prop.</th>") == len(rep.targets)


def test_self_contained(page) -> None:
    _, text, _ = page
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"\b(src|href)\s*=", text)
    assert "@import" not in text and "url(" not in text


def test_text_is_escaped(rep: Report) -> None:
    evil = "<script>alert(1)</script> & \"x\""
    bad = dataclasses.replace(rep.culprits[0], evidence=evil, module="a<b>")
    text = report_html(dataclasses.replace(rep, culprits=(bad, *rep.culprits[1:]), model="M<i>"))
    assert "<script>alert" not in text and "a<b>" not in text and "M<i>" not in text
    assert html.escape(evil) in text and "a&lt;b&gt;" in text and "M&lt;i&gt;" in text
    assert text.count("<script>") == 1  # only the page's own sorting script


def test_json_round_trip_renders_the_same(rep: Report, tmp_path) -> None:
    again = Report.from_json(rep.to_json(tmp_path / "r.json"))
    assert report_html(again) == report_html(rep)


@pytest.mark.parametrize("metric", ["cosine", "sqnr", "max_abs"])
def test_other_metrics(metric: str) -> None:
    torch.manual_seed(0)
    r = tp.report(Net(), torch.randn(8, 16), targets=("eager:fp16", "eager:bf16"), metric=metric)
    text = report_html(r)
    assert len(svgs(text)) == 2 and "DIVERGES" in text
    label = {"cosine": "1 − cosine (log)", "sqnr": "SQNR dB (down is better)", "max_abs": "max_abs (log)"}[metric]
    assert label in text


def synthetic(calls: int, targets=("eager:fp16", "strict:fp16")) -> Report:
    """A report with ``calls`` module calls, built directly (no model run)."""
    rows, errors = [], []
    for i in range(calls):
        name = f"layers.{i}"
        absmax = 1e5 if i == calls // 2 else 1.0 + i % 7
        rows.append(Row(dtype="float32", shape=(2, 8), numel=16, min=-absmax, max=absmax, absmax=absmax, mean=0.0,
                        rms=1.0, nan=0, inf=0, beyond_fp16=int(absmax > 65504), subnormal_fp16=0, flush_fp16=0,
                        subnormal_bf16=0, flush_bf16=0, headroom_bits=math.log2(65504 / absmax),
                        key=name, module=name, call=0, leaf="", module_type="Linear"))
        for t in targets:
            for kind in ("local", "propagated"):
                broken = kind == "propagated" and i >= calls // 2  # Inf from the culprit on
                v = math.inf if broken else 1e-4 * (1 + i % 13)
                stats = dataclasses.replace(rows[-1], inf=3) if broken else None
                errors.append(ModuleError(name, name, 0, t, kind, ErrorMetrics(v, v, 1 - v, 40.0, 0.0), stats))
    culprit = Culprit(f"layers.{calls // 2}", f"layers.{calls // 2}", targets[0], "overflow", "beyond 65504", 1.0, 1.0, "Linear")
    outcomes = tuple(TargetOutcome(t, 1e-2, ErrorMetrics(0.1, 0.1, 0.9, 20.0, 0.0), False) for t in targets)
    return Report("Big", "fp32", "rel_l2", tuple(targets), tuple(rows), (), tuple(errors), outcomes, (culprit,))


def test_big_report_stays_small(tmp_path) -> None:
    rep = synthetic(6000)
    path = write_report_html(rep, tmp_path / "big.html")
    text = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 2_500_000, path.stat().st_size
    for points in re.findall(r'<polyline[^>]*points="([^"]*)"', text):
        assert len(points.split()) <= MAX_LINE_POINTS
    assert text.count("<circle") < 3000  # markers only where the error is out of tolerance
    assert text.count("<tr") <= MAX_TABLE_ROWS + 10 and "rows</td></tr>" in text  # trimmed, with a marker
    assert "layers.3000" in text  # the culprit row is kept
    # the Inf stretch of each target is one hovered bar in the headroom plot, not 3000 markers
    assert text.count("<title>layers.3000 … layers.5999 (3000 calls) under") == 2


# ------------------------------------------------------------------------------ Chromium


def chromium() -> str:
    exe = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")) if p and os.path.exists(p)), None)
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    return exe


def run_chromium(exe: str, profile, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120)


def test_renders_in_chromium(page, tmp_path) -> None:
    exe = chromium()
    rep, _, path = page
    shot = tmp_path / "shot.png"
    run_chromium(exe, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1800", path.as_uri())
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom = run_chromium(exe, tmp_path / "profile2", "--dump-dom", path.as_uri()).stdout
    assert "DIVERGES" in dom and rep.culprits[0].module in dom
    assert re.search(r"<svg[^>]*>.*<polyline[^>]*points=\"[\d., ]+\"", dom, flags=re.S)


def test_table_sorts_in_chromium(page, tmp_path) -> None:
    """Click 'ref absmax' twice (descending): proj, whose output reaches ~7e4, comes first."""
    exe = chromium()
    _, text, _ = page
    click = ('<script>var th = document.querySelectorAll("table.sortable thead tr:last-child th")[3]; th.click(); th.click();'
             'document.body.setAttribute("data-first", document.querySelector("table.sortable tbody tr td:nth-child(2)").textContent);'
             "</script></body>")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", click), encoding="utf-8")
    dom = run_chromium(exe, tmp_path / "profile", "--dump-dom", probe.as_uri()).stdout
    assert re.search(r'data-first="proj\b', dom)
    assert re.search(r'<th class="desc">ref absmax</th>', dom)


# ------------------------------------------------------------------------------ what users see
# Blocks on the x axis, containers apart from leaves, exact-zero local errors, long names,
# latent findings, a non-finite reference, margins.


class Pair(nn.Module):
    """Two output leaves: h, and h rounded through 2048 (FP16 spacing 2 there: a large error)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, (h + 2048.0) - 2048.0


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(x)
        return a + b


class Block(nn.Module):
    """Linear (its output beyond FP16 max) -> LayerNorm: the block's output is the LayerNorm's."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        with torch.no_grad():
            self.proj.weight.mul_(200000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 16)
        self.block = Block()
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def rel_l2(ref: torch.Tensor, test: torch.Tensor) -> float:
    r, t = ref.detach().double().numpy(), test.detach().double().numpy()
    return float(((t - r) ** 2).sum() ** 0.5 / (r**2).sum() ** 0.5)


def test_call_errors_is_the_worst_leaf_of_a_plain_hook() -> None:
    """Report.call_errors() against FP16 and FP32 copies read through a plain forward hook."""
    torch.manual_seed(0)
    model, x = PairNet().eval(), torch.randn(4, 16)
    rep = tp.report(model, x, targets=("eager:fp16",))
    seen = {}
    for name, dtype in (("ref", torch.float32), ("half", torch.float16)):
        m = copy.deepcopy(model).to(dtype)
        handle = m.pair.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
        m(x.to(dtype))
        handle.remove()
    leaves = [rel_l2(r, t) for r, t in zip(seen["ref"], seen["half"])]
    assert leaves[1] > 100 * leaves[0]  # the rounded leaf is the worst one
    cells = {(c.call_key, c.target, c.kind): c for c in rep.call_errors()}
    prop = cells[("pair", "eager:fp16", ErrorKind.PROPAGATED)]
    assert prop.leaves == 2 and prop.failure is None
    assert prop.value == pytest.approx(max(leaves), rel=1e-6)
    assert prop.metrics.rel_l2 == prop.value
    # call order (as the reference returned them), local before propagated
    assert [(c.call_key, str(c.kind)) for c in rep.call_errors()] == [
        ("pair.lin", "local"), ("pair.lin", "propagated"), ("pair", "local"), ("pair", "propagated"),
        ("(root)", "propagated")]
    # the text table and the HTML table show the same worst leaf
    line = next(l for l in module_table(rep).splitlines() if l.startswith("pair "))
    assert line.split()[-1] == num(prop.value)
    assert f"<td class=bad>{num(prop.value)}</td></tr>" in report_html(rep)


@pytest.fixture(scope="module")
def nested() -> Report:
    torch.manual_seed(0)
    return tp.report(Nested().eval(), torch.randn(8, 16), targets=("eager:fp16", "autocast:fp16"))


def test_containers_are_drawn_apart_from_leaves(nested: Report) -> None:
    """The container holding the culprit repeats its spike: it is a faded square, off the line,
    and the culprit is marked once per target."""
    rep = nested
    assert "block.proj" in {c.key for c in rep.culprits_for("eager:fp16")}
    assert "block" not in {c.key for c in rep.culprits}  # the container repeats its children's error
    error_plot, _ = svgs(report_html(rep))
    squares = re.findall(r'<rect class="(ct[^"]*)"[^>]*><title>([^ ]+) \(', error_plot)
    assert {k for _, k in squares} == {"block", "(root)"} and all(cls == "ct" for cls, _ in squares)
    circles = set(re.findall(r"<circle [^>]*><title>([^ ]+) \(", error_plot))
    assert circles == {"stem", "block.proj", "block.norm", "head"}
    leaves = ("stem", "block.proj", "block.norm", "head")
    for t in rep.targets:
        line = re.search(rf'<polyline[^>]*points="([^"]+)"[^>]*><title>{re.escape(t)} propagated</title>', error_plot).group(1)
        assert len(line.split()) == len(leaves)
    culprit_marks = re.findall(r"<path class=fmark [^>]*><title>culprit under ([^:]+:[^:]+): ([^ ]+)", error_plot)
    assert sorted(culprit_marks) == sorted((c.target, c.key) for c in rep.culprits)


def bert_report(targets=("autocast:fp16", "eager:fp16", "strict:fp16")) -> Report:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(cfg).eval()
    return tp.report(model, {"input_ids": torch.randint(0, 100, (2, 8))}, targets=targets)


@pytest.fixture(scope="module")
def bert() -> Report:
    return bert_report()


def leaf_modules(rep: Report) -> set[str]:
    """Modules of the report that hold no other recorded module (computed here from the names)."""
    modules = {r.module for r in rep.rows}
    return {m for m in modules if not any(o != m and is_within(o, m) for o in modules)}


def test_x_axis_is_labelled_with_blocks(bert: Report) -> None:
    text = report_html(bert)
    order = list(dict.fromkeys((r.module, r.call) for r in bert.rows))
    for plot in svgs(text):
        labels = re.findall(r"<text class=bl [^>]*>([^<]*)</text>", plot)
        assert labels == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
        bands = re.findall(r"<g class=block><title>([^ ]+) \(calls? (\d+)(?:–(\d+))?\)</title>", plot)
        assert [int(a) for _, a, _ in bands] == sorted(int(a) for _, a, _ in bands) and int(bands[0][1]) == 0
        assert int(bands[-1][2]) == len(order) - 1
        for name, first, last in bands:
            # every call of the band lies in the block, or is a container holding it (returned after it)
            for module, _ in order[int(first):int(last or first) + 1]:
                assert is_within(module, name) or is_within(name, module), (name, module)


def test_exact_local_errors_sit_in_the_exact_band(bert: Report) -> None:
    """Autocast runs LayerNorm/Dropout/embeddings in FP32: local error exactly 0, drawn in the
    '0 (exact)' band as rings, not a line zig-zagging into it."""
    error_plot, _ = svgs(report_html(bert))
    assert "<title>autocast:fp16 local</title>" not in error_plot  # no joined local series
    band = float(re.search(r'<rect class=zband x="[\d.]+" y="([\d.]+)"', error_plot).group(1))
    ring = r'<circle cx="[\d.]+" cy="([\d.]+)"[^>]*><title>[^<]*autocast:fp16 local: rel_l2 '
    zero = [float(cy) for cy in re.findall(ring + "0</title>", error_plot)]
    leaves = leaf_modules(bert)
    exact = [e for e in bert.call_errors() if e.target == "autocast:fp16" and e.kind == ErrorKind.LOCAL
             and e.value == 0 and e.module in leaves]
    assert len(zero) == len(exact) >= 3
    assert all(cy == pytest.approx(band + 6) for cy in zero)
    nonzero = [float(cy) for cy in re.findall(ring + "[1-9]", error_plot)]
    assert nonzero and all(cy < band for cy in nonzero)


def test_reference_not_finite_is_shown() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16)), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[2][0].weight[0, 0] = float("nan")
    rep = tp.report(model, torch.randn(4, 8), targets=("eager:fp16", "strict:fp16"))
    assert not rep.reference_finite and rep.culprits[0].module == "2.0"
    text = report_html(rep)
    assert "<div class=alert><b>The fp32 reference is not finite</b>" in text
    cards = re.findall(r'<div class="card v-([\w-]+)".*?</div></div>', text)
    assert cards == ["not-judged"] * 2
    assert text.count("the fp32 reference is not finite: nothing to compare against") == 2
    assert "<h2>Where NaN/Inf first appears in the fp32 reference</h2>" in text
    assert "<h2>Culprits</h2>" not in text
    section = text[text.index("<h2>Where NaN/Inf"):text.index("<h2>Error along")]
    assert "<code>2.0</code>" in section and "holds 1 NaN" in section
    assert re.search(r"<path class=fmark [^>]*><title>NaN/Inf origin under fp32: 2\.0 \(Linear\)", text)


def test_margin_line_from_a_hand_built_mapping(rep: Report) -> None:
    """A module's margin (input growth factor before it breaks) is drawn as log2 bits, on the
    headroom plot's own scale; inf is pinned to the top; keys the report lacks are left out."""
    margins = {"proj": 1.0, "norm": 16.0, "head": math.inf, "not.a.module": 2.0}
    _, plot = svgs(report_html(rep, margins=margins))
    marks = dict((k, float(y)) for y, k in re.findall(r'<path class=mmark d="M[\d.]+,([\d.]+)[^"]*"[^>]*><title>([^ ]+) \(', plot))
    assert set(marks) == {"proj", "norm", "head"}
    ticks = [(float(v), float(y)) for y, v in re.findall(r'<text class=yt x="[\d.]+" y="([\d.]+)">(-?[\d.]+)</text>', plot)]
    (v0, y0), (v1, y1) = ticks[0], ticks[-1]

    def y_of(bits: float) -> float:
        return y0 + (bits - v0) * (y1 - y0) / (v1 - v0)

    assert marks["proj"] + 4 == pytest.approx(y_of(0.0), abs=0.15)  # factor 1: broken already, at 0 bits
    assert marks["norm"] + 4 == pytest.approx(y_of(4.0), abs=0.15)  # factor 16 = 4 doublings
    assert marks["head"] + 4 == pytest.approx(14, abs=0.15)  # inf: the top edge (TOP)
    assert "inputs may grow ×16 before it breaks (4 doublings)" in plot
    assert "head (Linear): margin: no break up to the largest factor tried" in plot
    assert re.search(r'<polyline class="series mline" points="([^"]+)"', plot).group(1).count(",") == 2  # finite ones
    # per target: the target's colour and name
    text = report_html(rep, margins={"eager:fp16": {"norm": 2.0}})
    assert 'fill="#2563eb" stroke="#2563eb"><title>norm (LayerNorm): inputs may grow ×2 before it breaks under eager:fp16' in text
    assert "margin under eager:fp16" in text


def long_names(calls: int = 24, targets=("strict:fp16", "autocast:fp16")) -> Report:
    """A passing report, built by hand, with Hugging Face-length names and one latent finding."""
    rows, errors = [], []
    names = []
    for layer in range(calls // 6):
        base = f"model.encoder.layers.{layer}"
        names += [f"{base}.self_attention.attention_output_projection", f"{base}.self_attention",
                  f"{base}.feed_forward.intermediate_dense_projection", f"{base}.feed_forward.output_dense_projection",
                  f"{base}.feed_forward", f"{base}.final_layer_norm"]
    broken = names.index("model.encoder.layers.1.final_layer_norm")
    for i, name in enumerate(names):
        rows.append(Row(dtype="float32", shape=(2, 8), numel=16, min=-3.0, max=3.0, absmax=3.0, mean=0.0, rms=1.0, nan=0, inf=0,
                        beyond_fp16=0, subnormal_fp16=0, flush_fp16=0, subnormal_bf16=0, flush_bf16=0,
                        headroom_bits=math.log2(65504 / 3.0), key=name, module=name, call=0, leaf="",
                        module_type="LongNamedTransformerLayerNorm" if name.endswith("norm") else "Linear"))
        for t in targets:
            for kind in ("local", "propagated"):
                v = 1.0 if (i == broken and t == "strict:fp16") else (0.0 if kind == "local" and i % 3 == 0 else 1e-4 * (1 + i % 5))
                if kind == "propagated" and i == broken + 1 and t == "strict:fp16":
                    v = 2e-3
                errors.append(ModuleError(name, name, 0, t, kind, ErrorMetrics(v, v, 1 - v, 40.0, 0.0), None))
    latent = Culprit(names[broken], names[broken], "strict:fp16", Reason.OVERFLOW,
                     "layer_norm: (x-mean)^2 overflowed FP16 (18 values, input absmax 302.8)", 1.0, 1.0,
                     "LongNamedTransformerLayerNorm", masked_by=names[broken + 1])
    outcomes = tuple(TargetOutcome(t, 1e-2, ErrorMetrics(1e-3, 1e-3, 1 - 1e-3, 40.0, 0.0), True) for t in targets)
    return Report("LongNames", "fp32", "rel_l2", tuple(targets), tuple(rows), (), tuple(errors), outcomes, (), (latent,))


def test_replay_failures_are_noted(rep: Report) -> None:
    text = report_html(dataclasses.replace(rep, replay_failures=("norm under eager:fp16: cannot copy <x>",)))
    assert "1 module call(s) could not be replayed alone by torchprobe (not findings" in text
    assert "cannot copy &lt;x&gt;" in text


def test_latent_findings_have_their_own_section() -> None:
    rep = long_names()
    assert rep and rep.latent and not rep.culprits
    text = report_html(rep)
    c = rep.latent[0]
    head = '<h2 id="latent">Within tolerance, but broken inside — masked downstream</h2>'
    assert head in text
    section = text[text.index(head):text.index("<h2>Error along")]
    assert "<th>masked downstream by</th>" in section and html.escape(c.evidence) in section
    assert f'title="{c.masked_by}"' in section  # abbreviated, in full on hover
    assert "latent: 1 broken inside, masked" in text  # on the strict:fp16 card
    for plot in svgs(text):
        assert re.search(rf'<path class="fmark lat" [^>]*><title>latent under strict:fp16: {re.escape(c.key)} .*'
                         rf"masked downstream by {re.escape(c.masked_by)}</title>", plot)
    assert f'<tr class="latent"><td>{[r.key for r in rep.rows].index(c.key)}</td><td><code>{c.key}</code> ◇</td>' in text


def dom(exe: str, tmp_path, text: str, script: str, width: int = 1280) -> dict:
    """Open ``text`` in headless Chromium at ``width`` px; ``script`` returns a JSON-able value."""
    probe = tmp_path / "probe.html"
    hook = ('<script>document.body.setAttribute("data-probe", JSON.stringify((function () {' + script + "})()));</script></body>")
    probe.write_text(text.replace("</body>", hook), encoding="utf-8")
    out = run_chromium(exe, tmp_path / "profile", f"--window-size={width},1000", "--dump-dom", probe.as_uri()).stdout
    return json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', out).group(1)))


LAYOUT_PROBE = """
var t = document.querySelector("table.sortable"), box = document.querySelector(".scroll");
var codes = Array.prototype.map.call(document.querySelectorAll("table.sortable code[title]"), function (c) {
  return [c.textContent, c.title]; });
var labels = Array.prototype.map.call(document.querySelectorAll("svg.plot")[0].querySelectorAll("text.bl"), function (e) {
  return e.textContent; });
var svg = document.querySelector("svg.plot"), r = svg.getBoundingClientRect(), k = r.width / svg.viewBox.baseVal.width;
var n = +svg.dataset.n, x0 = +svg.dataset.x0, x1 = +svg.dataset.x1, i = Math.floor(n / 2);
svg.dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + (x0 + i * (x1 - x0) / (n - 1)) * k, clientY: r.top + 60 * k, bubbles: true}));
var main = document.querySelector("main"), edge = main.getBoundingClientRect().right - parseFloat(getComputedStyle(main).paddingRight);
var wide = Array.prototype.filter.call(document.querySelectorAll("table, .scroll, svg.plot, .cards"), function (e) {
  return e.getBoundingClientRect().right > edge + 0.5; }).map(function (e) { return e.className || e.tagName; });
return {table: t.scrollWidth, box: box.clientWidth, page: document.documentElement.scrollWidth, view: window.innerWidth, wide: wide,
        codes: codes, labels: labels, i: i, tip: svg.querySelector(".tip").textContent,
        latent: document.getElementById("latent") ? document.getElementById("latent").offsetHeight : 0};
"""


def test_long_names_stay_inside_the_page_in_chromium(bert: Report, tmp_path) -> None:
    """At 1280 px the table fits without scrolling sideways; long names are abbreviated in the
    middle with the full name on hover; hovering a plot names the call under the mouse."""
    exe = chromium()
    got = dom(exe, tmp_path, report_html(bert), LAYOUT_PROBE)
    assert got["table"] <= got["box"] and got["page"] <= got["view"] and not got["wide"], got
    assert got["codes"], "some BERT names are long enough to be abbreviated"
    for shown, full in got["codes"]:
        head, _, tail = shown.partition("…")
        assert tail and full.startswith(head) and full.endswith(tail) and len(shown) < len(full)
    assert "encoder.layer.0.intermediate.intermediate_act_fn" in {full for _, full in got["codes"]}
    assert got["labels"] == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
    calls = list(dict.fromkeys((r.module, r.call, r.module_type) for r in bert.rows))
    module, call, kind = calls[got["i"]]
    assert got["tip"] == f"#{got['i']} {module}{f'#{call}' if call else ''} ({kind})"


def test_many_targets_and_latent_fit_in_chromium(tmp_path) -> None:
    """Five targets and 60-character names: still no sideways scroll at 1280 px; the latent
    section is visible and fits too."""
    exe = chromium()
    rep = long_names(targets=("strict:fp16", "autocast:fp16", "eager:fp16", "strict-onnx:fp16", "eager:bf16"))
    got = dom(exe, tmp_path, report_html(rep), LAYOUT_PROBE, width=1280)
    assert got["table"] <= got["box"] and got["page"] <= got["view"] and not got["wide"], got
    assert got["latent"] > 0
    assert any(full == "model.encoder.layers.1.feed_forward.intermediate_dense_projection" for _, full in got["codes"])
