"""Shared helpers for the benchmarks: models, interleaved timing, sync counting, peak memory.

Timing follows one rule everywhere: every variant of a comparison runs in the same process, after
a warm-up, interleaved in a rotating order (so drifts in clocks, caches and machine load hit all of
them alike); one sample is the wall time of one call with the device synchronized before and after
(``time.perf_counter``); the headline is the median.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- models ----------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: stem, three stages of two basic blocks (32/64/128 channels), head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@dataclass
class Workload:
    """A model in eval mode on its device, its inputs, and how the forward runs (autocast dtype)."""

    name: str
    model: nn.Module
    inputs: Any
    autocast: torch.dtype | None = None
    notes: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype_label(self) -> str:
        return f"autocast {str(self.autocast).replace('torch.', '')}" if self.autocast else "fp32"

    def call(self, model: nn.Module | None = None) -> Any:
        model = self.model if model is None else model
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            if isinstance(self.inputs, dict):
                return model(**self.inputs)
            return model(self.inputs)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device, --quick, --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steadier on a shared machine; 0: all, torch's default)")
    return p


def setup(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """Parse, check that the device exists, and pin the CPU thread count."""
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return args, device


def load_tree(path: str | Path, alias: str) -> Any:
    """The ``torchprobe`` package of another checkout (e.g. git ``main``), imported under
    ``alias`` so that both versions run side by side in one process (the package imports itself
    only relatively)."""
    import importlib.util

    init = Path(path) / "torchprobe" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--compare {path}: no torchprobe/__init__.py there")
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, steps: int = 2) -> nn.Module:
    """Give a randomly initialised CNN the running statistics of its own activations, so its
    eval-mode forward stays in range (identity BatchNorm statistics let ResNet-50's activations
    grow past FP16's range, and HF's debugger then aborts)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


def small_cnn(device: str = "cpu", batch: int = 8, autocast: torch.dtype | None = None) -> Workload:
    torch.manual_seed(0)
    model = calibrate_batchnorm(SmallResNet().to(device), torch.randn(32, 3, 32, 32, device=device))
    return Workload(f"small ResNet b{batch} 32x32", model, torch.randn(batch, 3, 32, 32, device=device), autocast)


def small_bert(device: str = "cpu", batch: int = 8, seq: int = 128, autocast: torch.dtype | None = None) -> Workload:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=512)
    model = BertModel(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return Workload(f"BERT 4L-256 b{batch} s{seq}", model, inputs, autocast)


def small_convnext(device: str = "cpu", batch: int = 8, size: int = 64, autocast: torch.dtype | None = None) -> Workload:
    """transformers' ConvNeXt with 4 stages [32, 64, 128, 256], depths [2, 2, 4, 2] (issue 13's CPU model)."""
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 4, 2], image_size=size)
    model = ConvNextModel(config).to(device).eval()
    return Workload(f"ConvNeXt [32..256] [2,2,4,2] b{batch} {size}x{size}", model,
                    {"pixel_values": torch.randn(batch, 3, size, size, device=device)}, autocast)


def resnet50(device: str = "cuda", batch: int = 64, autocast: torch.dtype | None = torch.float16) -> Workload:
    torch.manual_seed(0)
    try:
        import torchvision

        model, source = torchvision.models.resnet50(weights=None), "torchvision"
    except ImportError:
        import timm

        model, source = timm.create_model("resnet50", pretrained=False), "timm"
    model = calibrate_batchnorm(model.to(device), torch.randn(32, 3, 224, 224, device=device))
    return Workload(f"ResNet-50 b{batch}", model, torch.randn(batch, 3, 224, 224, device=device), autocast,
                    notes=f"resnet50 from {source}")


def convnext_tiny(device: str = "cuda", batch: int = 64, autocast: torch.dtype | None = torch.float16) -> Workload:
    """ConvNeXt-T (timm ``convnext_tiny``; transformers' ConvNextModel with the same config otherwise)."""
    torch.manual_seed(0)
    try:
        import timm

        model, source = timm.create_model("convnext_tiny", pretrained=False), "timm"
    except ImportError:
        from transformers import ConvNextConfig, ConvNextModel

        model, source = ConvNextModel(ConvNextConfig()), "transformers"
    x = torch.randn(batch, 3, 224, 224, device=device)
    return Workload(f"ConvNeXt-T b{batch}", model.to(device).eval(), x if source == "timm" else {"pixel_values": x},
                    autocast, notes=f"convnext_tiny from {source}")


def vit_base(device: str = "cuda", batch: int = 32, autocast: torch.dtype | None = torch.float16) -> Workload:
    torch.manual_seed(0)
    try:
        import timm

        model, source = timm.create_model("vit_base_patch16_224", pretrained=False), "timm"
    except ImportError:
        import torchvision

        model, source = torchvision.models.vit_b_16(weights=None), "torchvision"
    return Workload(f"ViT-B/16 b{batch}", model.to(device).eval(), torch.randn(batch, 3, 224, 224, device=device),
                    autocast, notes=f"vit_base_patch16_224 from {source}")


# -- timing ----------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    """One way of running the same work; ``fn()`` is one sample."""

    name: str
    fn: Callable[[], Any]
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def clock_for(device: torch.device) -> Callable[[], float]:
    """Wall time on CUDA; on the CPU with one intra-op thread, this thread's CPU time, which a
    busy shared machine does not inflate (time spent descheduled is not counted)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.thread_time
    return time.perf_counter


def clock_name(device: torch.device) -> str:
    return "thread CPU time" if clock_for(device) is time.thread_time else "wall time"


def interleaved(variants: list[Variant], device: torch.device, reps: int, warmup: int) -> list[Variant]:
    """Time every variant ``reps`` times after ``warmup`` calls each, rotating who goes first."""
    clock = clock_for(device)
    for _ in range(warmup):
        for v in variants:
            v.fn()
    synchronize(device)
    for i in range(reps):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            synchronize(device)
            t0 = clock()
            v.fn()
            synchronize(device)
            v.times.append(clock() - t0)
    return variants


def device_time(fn: Callable[[], Any], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` measured with CUDA events (host time where there is no CUDA)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def counting_syncs(device: torch.device) -> Iterator[list[int]]:
    """Count host synchronizations on CUDA (``torch.cuda.set_sync_debug_mode('warn')`` warns once
    per synchronizing call); yields a list holding the count after the block, then the messages."""
    out: list[Any] = [0, []]
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield out
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    out[1] = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
              if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
    out[0] = len(out[1])


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak device memory allocated while ``fn`` runs, above what was allocated before it."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = device_time(lambda: dst.copy_(src), device, reps=10, warmup=2)
    del src, dst
    return 2 * nbytes / seconds


def hf_debugger_copy(model: nn.Module) -> tuple[nn.Module, Any] | None:
    """A deep copy of ``model`` under transformers' DebugUnderflowOverflow (its hooks cannot be
    removed, so it never touches the original), or None where transformers lacks it."""
    try:
        from transformers.debug_utils import DebugUnderflowOverflow
    except ImportError:
        return None
    clone = copy.deepcopy(model)
    return clone, DebugUnderflowOverflow(clone)


def environment(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
        try:
            import triton

            parts.append(f"triton {triton.__version__}")
        except ImportError:
            parts.append("no triton")
    else:
        parts.append(f"CPU, {torch.get_num_threads()} thread(s)")
    return "; ".join(parts)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"
