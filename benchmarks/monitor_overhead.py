"""Overhead of torchprobe.Monitor on a training step: plain vs Monitor(every=100) vs Monitor(every=1).

    python benchmarks/monitor_overhead.py                 # CPU, and CUDA when available
    python benchmarks/monitor_overhead.py --device cpu --reps 200

Each variant trains its own copy of the model (same weights, same batch) with SGD. One measured
iteration is ``mon.step(); forward; loss; backward; opt.step(); zero_grad()``; the variants run
interleaved, in a rotating order, after a warm-up, so drifts (clock, caches, other load) hit all of
them alike. Times are wall-clock per iteration (``time.perf_counter``, CUDA synchronized before each
reading). Medians are the headline; with every=100 the median is an unsampled step (the point: no
hooks at all between samples) and the mean spreads the cost of the sampled steps over all steps.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torchprobe.monitor import HeadroomWarning, Monitor  # noqa: E402


def small_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )
    return model, torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))).mean(dim=1))


def small_transformer() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    return TinyTransformer(), torch.randint(0, 1000, (16, 64)), torch.randint(0, 10, (16,))


class Runner:
    """One variant: its own model copy, optimizer and (optionally) monitor; ``__call__`` = one step."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, monitor: dict | None) -> None:
        self.name = name
        self.model = model
        self.x, self.y = x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.mon = Monitor(model, **monitor) if monitor is not None else None
        self.times: list[float] = []

    def __call__(self) -> None:
        if self.mon is not None:
            self.mon.step()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def close(self) -> None:
        if self.mon is not None:
            self.mon.close()


VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "Monitor(every=100)": {"every": 100},
    "Monitor(every=1)": {"every": 1},
    "Monitor(every=1, grads=True)": {"every": 1, "grads": True},
}


def measure(build: Callable, device: torch.device, reps: int, warmup: int) -> list[Runner]:
    torch.manual_seed(0)
    base, x, y = build()
    base, x, y = base.to(device), x.to(device), y.to(device)
    runners = [Runner(name, copy.deepcopy(base), x, y, cfg) for name, cfg in VARIANTS.items()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            for r in runners:
                r()
        sync()
        for i in range(reps):
            k = i % len(runners)
            for r in runners[k:] + runners[:k]:  # rotate who goes first
                t0 = time.perf_counter()
                r()
                sync()
                r.times.append(time.perf_counter() - t0)
    finally:
        for r in runners:
            r.close()
    return runners


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="'all' = CPU, plus CUDA when available (default)")
    parser.add_argument("--reps", type=int, default=300, help="measured steps per variant (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured steps per variant first (default 20)")
    args = parser.parse_args(argv)
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        parser.error("--device cuda: CUDA is not available here")

    rows = []
    for device in devices:
        for model_name, build in (("small CNN", small_cnn), ("small transformer", small_transformer)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", HeadroomWarning)
                runners = measure(build, device, args.reps, args.warmup)
            plain = statistics.median(runners[0].times)
            plain_mean = statistics.fmean(runners[0].times)
            n_modules = len(runners[1].mon.modules)
            for r in runners:
                med, mean = statistics.median(r.times), statistics.fmean(r.times)
                rows.append([device.type, f"{model_name} ({n_modules} modules)", r.name,
                             f"{med * 1e3:.3f}", f"{med / plain:.3f}", f"{mean * 1e3:.3f}", f"{mean / plain_mean:.3f}"])
    where = ", ".join(
        f"{d.type}: {torch.cuda.get_device_name(d) if d.type == 'cuda' else f'{torch.get_num_threads()} threads'}"
        for d in devices)
    print(f"torch {torch.__version__}; {where}; {args.reps} steps per variant after {args.warmup} warm-up, interleaved")
    print(tabulate(rows, headers=["device", "model", "variant", "median ms", "× plain", "mean ms", "mean × plain"],
                   disable_numparse=True, colalign=("left", "left", "left", "right", "right", "right", "right")))


if __name__ == "__main__":
    main()
