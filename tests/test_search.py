import ast
import math

import pytest
import torch
from torch import nn

import torchprobe as tp
from torchprobe.search import MinimalSetSearch
from conftest import assert_unchanged, snapshot
from models import GrownNorm, TwoCulprits, deep_chain


def run_search(candidates, needed):
    """Drive the strategy with an oracle: a set passes when it contains every needed name."""
    search = MinimalSetSearch(candidates)
    evaluations = 0
    while not search.done:
        evaluations += 1
        search.step(set(needed) <= search.proposal)
    return search.result, evaluations


@pytest.mark.parametrize("n", [2, 7, 64, 1000])
def test_single_culprit_is_found_in_log_steps(n):
    names = [f"m{i}" for i in range(n)]
    for culprit in (names[0], names[n // 3], names[-1]):
        result, evaluations = run_search(names, {culprit})
        assert result == {culprit}
        assert evaluations <= 2 * math.ceil(math.log2(n))


def test_non_contiguous_culprits_are_found_exactly():
    names = [f"m{i}" for i in range(40)]
    result, evaluations = run_search(names, {"m3", "m17", "m38"})
    assert result == {"m3", "m17", "m38"}
    assert evaluations < 40  # far fewer than testing each module alone


def test_seed_scenario_fix_keeps_the_layernorm_and_is_verified():
    model = GrownNorm().eval()
    x = torch.randn(8, 16)
    before = snapshot(model)
    fix = tp.bisect(model, x, target="strict-onnx:fp16", tol=1e-2)
    assert_unchanged(model, before)
    assert fix and fix.verified
    assert set(fix.keep_fp32) in ({"norm"}, {"norm", "inp"})
    assert fix.error_before > 0.1 and fix.error_after <= 1e-2
    assert fix.evaluations <= fix.bound
    assert fix.log[0].keep_fp32 == () and not fix.log[0].passed
    assert fix.log[-1].keep_fp32 == fix.keep_fp32 and fix.log[-1].passed
    # the 512 rule keeps the producer too; torchprobe measures that one module is enough
    assert set(fix.rule.keep_fp32) == {"inp", "norm"} and fix.rule.passed
    # the same plan runs on the other backends and stays within tol
    ref = model(x)
    for target in ("eager:fp16", "inductor:fp16"):
        runner = tp.targets.build(target, model, (x,), {}, keep_fp32=fix.keep_fp32)
        assert tp.measure(ref, runner(x)).rel_l2 <= 1e-2, target
    fixed = fix.apply(model)
    assert fixed.norm.weight.dtype == torch.float32 and fixed.inp.weight.dtype == torch.float16
    assert tp.measure(ref, fixed(x.half()).float()).rel_l2 <= 1e-2


def test_two_independent_culprits_are_both_kept():
    model = TwoCulprits().eval()
    x = torch.randn(4, 32)
    fix = tp.bisect(model, x, target="strict-onnx:fp16")
    assert fix, str(fix)
    assert set(fix.keep_fp32) == {"blocks.1.2", "blocks.4.2"}


def test_single_culprit_among_many_modules_within_the_stated_bound():
    model = deep_chain(depth=32, culprit=21).eval()
    x = torch.randn(4, 32)
    leaves = [f"{i}.{j}" for i in range(32) for j in range(2)]
    fix = tp.bisect(model, x, target="strict-onnx:fp16", candidates=leaves)
    assert fix.keep_fp32 == ("21.1",)
    assert fix.evaluations <= 2 + 2 * math.ceil(math.log2(len(leaves))) + 1  # + the final verification
    assert fix.bound == 2 + 2 * math.ceil(math.log2(len(leaves)))


def test_refuses_to_claim_a_fix_it_did_not_measure():
    model = GrownNorm().eval()
    x = torch.randn(8, 16)
    fix = tp.bisect(model, x, target="strict-onnx:fp16", tol=1e-9)  # FP16 can never get this close
    assert not fix
    assert fix.keep_fp32 == () and fix.error_after == fix.error_before
    assert "no candidate set meets tol" in fix.message and "tried" in fix.message
    assert all(not step.passed for step in fix.log)


def test_isolate_is_hierarchical_and_counts_compilations():
    model = deep_chain(depth=8, culprit=5).eval()
    x = torch.randn(4, 32)
    table = tp.isolate(model, x, target="strict-onnx:fp16")
    measured = {r.key for r in table.rows}
    assert {str(i) for i in range(8)} <= measured  # every top-level block
    assert measured - {str(i) for i in range(8)} == {"5.0", "5.1"}  # descended only into block 5
    assert [r.module for r in table.culprits] == ["5.1"]
    assert table.compilations == len(table.rows) == 10
    leaves = tp.isolate(model, x, target="strict-onnx:fp16", modules="leaves")
    assert len(leaves.rows) == 16 and [r.module for r in leaves.culprits] == ["5.1"]
    assert "5.1 *" in str(table)


def test_isolate_caches_compilations_of_a_shared_module():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(8, 8)

        def forward(self, x):
            return self.block(self.block(x))

    table = tp.isolate(Twice(), torch.randn(2, 8), target="eager:fp16", modules=["block"])
    assert [r.key for r in table.rows] == ["block", "block#1"]
    assert table.compilations == 1


def test_snippets_are_valid_python_and_the_autocast_one_runs():
    model = GrownNorm().eval()
    x = torch.randn(8, 16)
    fix = tp.bisect(model, x, target="strict-onnx:fp16")
    for target in ("tensorrt", "autocast", "eager", "inductor"):
        code = fix.snippet(target)
        ast.parse(code)
        assert "norm" in code
    namespace = {"model": GrownNorm().eval(), "inputs": (x,)}
    code = fix.snippet("autocast").replace('"cuda"', '"cpu"')
    exec(compile(code, "<snippet>", "exec"), namespace)
    assert namespace["output"].shape == (8, 4)
    assert "autocast_excluded_nodes" in fix.snippet("tensorrt")
