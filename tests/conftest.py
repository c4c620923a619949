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
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["dtypes"] == before["dtypes"]
    assert after["devices"] == before["devices"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["forward"] == before["forward"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
