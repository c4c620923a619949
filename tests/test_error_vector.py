"""The fast ways of computing the error vector agree with the branch-free eager formula.

The CPU path (float64 norms that stop early) runs everywhere; the Triton kernel runs on CUDA, and
on the CPU through Triton's interpreter where Triton is installed.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from torchprobe.metrics import _error_vector_eager, _error_vector_host, error_vector, from_vector


def pairs(device: str = "cpu"):
    """(reference, test) pairs: plain, with NaN/Inf on one or both sides, odd sizes, zeros."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, dtype in ((1, torch.float16), (1000, torch.float16), (4097, torch.bfloat16), (70_001, torch.float32)):
        r = torch.randn(n, generator=g) * 300
        t = (r * (1 + 1e-3 * torch.randn(n, generator=g))).to(dtype)
        out.append((r, t))
    r = torch.randn(3000, generator=g) * 1000
    t = r.half()  # values beyond 65504 are not there; make some: Inf in the test only
    r[:7] = 70000.0
    t = r.half()
    t[10] = float("nan")
    r[20], t[20] = float("inf"), float("inf")  # the same Inf on both sides
    r[21], t[21] = float("nan"), float("nan")  # the same NaN
    r[22], t[22] = float("inf"), -float("inf")  # different
    r[23] = float("nan")  # NaN in the reference only
    out.append((r, t))
    out.append((torch.zeros(64), torch.zeros(64, dtype=torch.float16)))
    return [(r.to(device), t.to(device)) for r, t in out]


def assert_same(fast: torch.Tensor, eager: torch.Tensor) -> None:
    fast, eager = fast.cpu().tolist(), eager.cpu().tolist()
    assert fast[5:] == eager[5:]  # counts: exact
    for a, b in zip(fast[:5], eager[:5]):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300)
    a, b = from_vector(fast), from_vector(eager)
    for name in ("max_abs", "rel_l2", "cosine", "sqnr", "nonfinite_mismatch", "nonfinite_both"):
        x, y = getattr(a, name), getattr(b, name)
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-9), name


def test_cpu_path_matches_the_eager_formula() -> None:
    for r, t in pairs():
        fast = _error_vector_host(r, t)
        finite = bool(torch.isfinite(r).all() and torch.isfinite(t).all())
        assert (fast is not None) == finite
        assert_same(error_vector(r, t), _error_vector_eager(r, t))
        assert_same(error_vector(r.reshape(-1, 1)[:, 0], t), _error_vector_eager(r, t))


def test_cpu_path_leaves_its_inputs_alone() -> None:
    r = torch.randn(100, dtype=torch.float64)
    t = r + 1e-3
    before = t.clone()
    error_vector(r, t)
    assert torch.equal(t, before)


_INTERPRETED = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, {tests!r})
import torch
import triton.runtime.interpreter as interpreter
patch = interpreter._patch_lang_tensor
def patched(tensor, scope):  # Triton 3.6's interpreter calls int() on a 1-element array, which NumPy 2 refuses
    patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interpreter._patch_lang_tensor = patched
from torchprobe._triton_error import error_kernel
from torchprobe.metrics import VECTOR_LEN, _error_vector_eager, launch_error_kernel
from test_error_vector import assert_same, pairs
for programs in (1, 3):
    for r, t in pairs():
        block = torch.zeros(4, VECTOR_LEN, dtype=torch.float64)
        launch_error_kernel(error_kernel, r, t, r.numel(), block, 2, programs)
        assert_same(block[2], _error_vector_eager(r, t))
        assert not block[[0, 1, 3]].any()
print("ok")
"""


def test_triton_kernel_matches_the_eager_formula_interpreted() -> None:
    pytest.importorskip("triton", reason="Triton is not installed (the CUDA test covers the kernel on a GPU)")
    code = _INTERPRETED.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernel_matches_the_eager_formula_on_cuda() -> None:
    for r, t in pairs("cuda"):
        assert_same(error_vector(r, t), _error_vector_eager(r, t))
    x = torch.randn(5_000_000, device="cuda")
    assert_same(error_vector(x, x.half()), _error_vector_eager(x, x.half()))
    view = torch.randn(64, 64, device="cuda").t()  # not contiguous
    assert_same(error_vector(view, view.half()), _error_vector_eager(view, view.half()))
