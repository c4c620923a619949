"""Small test models with known numerical behaviour (random weights, fixed seeds)."""
import torch
from torch import nn


class GrownNorm(nn.Module):
    """The seed scenario: a LayerNorm whose input reaches a few thousand; FP32 output is normal."""

    def __init__(self, scale: float = 2000.0):
        super().__init__()
        self.inp = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.out = nn.Linear(64, 4)
        with torch.no_grad():
            self.inp.weight.mul_(scale)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


class Offset(nn.Module):
    """(x + 64) - 64: in FP16 it rounds x to multiples of 1/16 (local error ~2%)."""

    def forward(self, x):
        return (x + 64.0) - 64.0


class Cancel(nn.Module):
    """(y - x) + 0.01 x: exact for y == x, but it amplifies any error already in y 100-fold."""

    def forward(self, y, x):
        return (y - x) + 0.01 * x


class Amplifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = Offset()
        self.cancel = Cancel()
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        return self.head(self.cancel(self.offset(x), x))


class Inverse(nn.Module):
    def forward(self, x):
        return torch.linalg.inv(x)


class FailsInHalf(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inv = Inverse()

    def forward(self, x):
        h = self.lin(x).reshape(-1, 2, 2)
        return self.inv(h + 3 * torch.eye(2, dtype=h.dtype))


class TwoCulprits(nn.Module):
    """Two independent overflowing LayerNorms in separate branches, among healthy blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32)) for _ in range(6))
        with torch.no_grad():
            self.blocks[1][0].weight.mul_(3000.0)
            self.blocks[4][0].weight.mul_(3000.0)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def deep_chain(depth: int = 16, culprit: int = 11) -> nn.Module:
    """``depth`` blocks of Linear->LayerNorm; block ``culprit``'s Linear grows its output past 256."""
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32)) for _ in range(depth)]
    with torch.no_grad():
        blocks[culprit][0].weight.mul_(3000.0)
    return nn.Sequential(*blocks)
