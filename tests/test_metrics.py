"""Metrics: values against an independent NumPy float64 computation, directions, tolerance policy."""
import math

import numpy as np
import pytest
import torch

from torchprobe.errors import InvalidArgument
from torchprobe.metrics import METRICS, all_pass, check_tol, get_metric, measure, resolve_tol, worst_of
from torchprobe.targets import parse_target


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_values_match_numpy_float64(dtype) -> None:
    torch.manual_seed(0)
    ref = torch.randn(64, 33)
    test = (ref + 0.01 * torch.randn(64, 33)).to(dtype)
    r, t = ref.double().numpy(), test.double().numpy()
    d = t - r
    m = measure(ref, test)
    assert m.max_abs == pytest.approx(np.abs(d).max(), rel=1e-12)
    assert m.rel_l2 == pytest.approx(np.linalg.norm(d) / np.linalg.norm(r), rel=1e-12)
    assert m.cosine == pytest.approx((r * t).sum() / np.linalg.norm(r) / np.linalg.norm(t), rel=1e-12)
    assert m.sqnr == pytest.approx(10 * np.log10((r ** 2).sum() / (d ** 2).sum()), rel=1e-12)
    assert m.finite


def test_exact_and_zero_cases() -> None:
    z = torch.zeros(5)
    m = measure(z, z)
    assert (m.max_abs, m.rel_l2, m.cosine, m.sqnr) == (0.0, 0.0, 1.0, math.inf)
    assert math.isinf(measure(z, torch.ones(5)).rel_l2)  # any error against an all-zero reference
    assert measure(torch.ones(3), -torch.ones(3)).cosine == pytest.approx(-1.0)


def test_every_metric_knows_its_direction() -> None:
    assert set(METRICS) >= {"rel_l2", "max_abs", "cosine", "sqnr"}
    rel, cos, sq = get_metric("rel_l2"), get_metric("cosine"), get_metric("sqnr")
    assert rel.passes(0.009, 0.01) and not rel.passes(0.011, 0.01) and not rel.passes(math.nan, 1.0)
    assert cos.passes(0.995, 0.01) and not cos.passes(0.26, 0.01) and cos.rule(0.01) == "cosine >= 0.99"
    assert sq.passes(41.0, 40.0) and not sq.passes(39.0, 40.0) and sq.rule(40) == "sqnr >= 40 dB"
    assert rel.worse(0.2, 0.1) and cos.worse(0.5, 0.9) and sq.worse(10, 20) and rel.worse(math.nan, math.inf)
    assert cos.worst([0.9, 0.3, 0.99]) == 0.3 and rel.worst([0.1, 0.3]) == 0.3
    assert cos.badness(0.9) > cos.badness(0.99) and sq.badness(10) > sq.badness(20)


def test_worst_of_and_all_pass() -> None:
    ref = torch.randn(10)
    good, bad = measure(ref, ref + 1e-4), measure(ref, ref * 2)
    assert worst_of("rel_l2", [good, bad]) is bad and worst_of("cosine", [good, bad]) is good  # cosine of 2x is 1
    assert all_pass("rel_l2", [good], 1e-2) and not all_pass("rel_l2", [good, bad], 1e-2)
    assert not all_pass("rel_l2", [], 1e-2) and not all_pass("rel_l2", [None], 1e-2)


def test_tolerance_policy() -> None:
    fp16, bf16 = parse_target("eager:fp16"), parse_target("eager:bf16")
    assert resolve_tol(None, fp16, "rel_l2") == 1e-2 and resolve_tol(None, bf16, "rel_l2") == 5e-2
    assert resolve_tol(None, fp16, "cosine") == 1e-4 and resolve_tol(None, fp16, "sqnr") == 20.0
    assert resolve_tol({"eager:bf16": 0.2}, bf16, "rel_l2", targets=["eager:fp16", "eager:bf16"]) == 0.2
    assert resolve_tol({"eager:bf16": 0.2}, fp16, "rel_l2", targets=["eager:fp16", "eager:bf16"]) == 1e-2
    for bad in (0, -1, math.nan, "x"):
        with pytest.raises(InvalidArgument, match="tol"):
            check_tol(bad)
    with pytest.raises(InvalidArgument, match="valid keys: eager:fp16"):
        resolve_tol({"strict:fp16": 1e-2}, fp16, "rel_l2", targets=["eager:fp16"])
    with pytest.raises(InvalidArgument, match="valid metrics: cosine"):
        get_metric("l3")
