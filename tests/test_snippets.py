"""The fix as code: the printed snippets run, and the model they make is a normal model."""
import copy
import io

import torch

import torchprobe as tp

from test_trust import RoundingNet


def _fix():
    torch.manual_seed(0)
    model, x = RoundingNet(), torch.randn(8, 16)
    fix = tp.bisect(model, x, target="eager:fp16")
    assert fix and fix.keep_fp32 == ("round",)
    return model, x, fix


def test_eager_snippet_runs_and_the_model_survives_save_and_deepcopy() -> None:
    model, x, fix = _fix()
    code = fix.snippet("eager")
    assert "keep_fp32" in code and "forward =" not in code  # hooks, not a closure swapped into forward
    scope = {"model": copy.deepcopy(model), "inputs": (x,)}
    exec(compile(code, "<snippet>", "exec"), scope)
    with torch.no_grad():
        ref = model(x)
    assert tp.get_metric("rel_l2").passes(tp.measure(ref, scope["output"].float()).rel_l2, fix.tol)
    buffer = io.BytesIO()
    torch.save(scope["model"], buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x.half()), copy.deepcopy(scope["model"])(x.half()))


def test_autocast_snippet_runs_on_the_cpu() -> None:
    model, x, fix = _fix()
    code = fix.snippet("autocast").replace('"cuda"', '"cpu"')
    scope = {"model": copy.deepcopy(model), "inputs": (x,)}
    exec(compile(code, "<snippet>", "exec"), scope)
    assert scope["output"].shape == (8, 16)
