import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def snapshot(model: torch.nn.Module) -> dict:
    """Everything torchprobe promises not to change about a user's model."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "devices": {k: v.device for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()},
        "forward": {n: "forward" in vars(m) for n, m in model.named_modules()},
        "global_hooks": _global_hooks(),
    }


def _global_hooks() -> tuple:
    """Counts of the process-wide module hooks (register_module_forward_hook and friends)."""
    hooks = torch.nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
    return tuple(len(getattr(hooks, n, ())) for n in names)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values, NaN equal to NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["dtypes"] == before["dtypes"]
    assert after["devices"] == before["devices"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["forward"] == before["forward"]
    assert after["global_hooks"] == before["global_hooks"]
    for k, v in before["state"].items():
        assert _same(after["state"][k], v), k
