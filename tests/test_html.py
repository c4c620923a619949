"""Tests for torchprobe.render.html: the self-contained HTML report, structurally and in Chromium."""
from __future__ import annotations

import dataclasses
import html
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
from torchprobe.results import Culprit, ModuleError, Report, TargetOutcome
from torchprobe.metrics import ErrorMetrics
from torchprobe.render.html import MAX_LINE_POINTS, MAX_TABLE_ROWS, report_html, write_report_html

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
        for kind in ("propagated", "local"):
            assert re.search(rf"<polyline[^>]*points=\"[^\"]+\"[^>]*><title>{re.escape(t)} {kind}</title>", error_plot), (t, kind)
    assert error_plot.count("<line class=tol ") == 2  # fp16 tol 0.01 and bf16 tol 0.05
    assert "<polyline" in headroom_plot and "class=zero" in headroom_plot
    # hover titles name the module; the reference overflow of proj and the target Inf are marked
    assert "<title>proj (Linear) · eager:fp16 propagated: rel_l2 inf</title>" in error_plot
    assert re.search(r"<title>proj \(Linear\): absmax [^<]*; reference has \d+ values beyond 65504", headroom_plot)
    assert re.search(r"<title>norm under eager:fp16 \(propagated\): \d+ Inf, \d+ NaN</title>", headroom_plot)


def test_table_has_every_call_and_target_column(page) -> None:
    rep, text, _ = page
    table = text[text.index("<table class=sortable"):]
    for key in ("proj", "norm", "head", "(root)"):
        assert f"<code>{key}</code>" in table
    for t in rep.targets:
        assert f"{t}<br>local" in table and f"{t}<br>prop." in table


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
    click = ('<script>var th = document.querySelectorAll("table.sortable th")[3]; th.click(); th.click();'
             'document.body.setAttribute("data-first", document.querySelector("table.sortable tbody tr td:nth-child(2)").textContent);'
             "</script></body>")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", click), encoding="utf-8")
    dom = run_chromium(exe, tmp_path / "profile", "--dump-dom", probe.as_uri()).stdout
    assert re.search(r'data-first="proj\b', dom)
    assert re.search(r'<th class="desc">ref absmax</th>', dom)
