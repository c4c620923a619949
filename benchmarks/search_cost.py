"""What finding a keep-FP32 fix costs: ``tp.bisect`` against a Polygraphy-style bisection.

    python benchmarks/search_cost.py                         # ConvNeXt and detector, strict:fp16, CPU
    python benchmarks/search_cost.py --target strict-onnx:fp16 --device cuda

Polygraphy's ``debug precision --mode bisect`` (``BisectMarker`` in
``polygraphy/tools/debug/subtool/precision.py``) keeps only a contiguous run of the layer list in
higher precision: the first ``k`` layers (``--direction forward``) or the last ``k``
(``reverse``). It starts with all of them marked, then halves the gap between the largest failing
and the smallest passing ``k`` until they are 1 apart: about ``log2(N) + 1`` engine builds for
``N`` layers, and it returns a prefix (or suffix), however far the culprit sits from the start.
Here the layers are the model's leaf modules in the order they first run, and each evaluation is
torchprobe's own plan (``torchprobe.targets.build(target, model, args, kwargs, keep_fp32=...)``)
run end to end and compared with the FP32 output under the same metric and tolerance as
``tp.bisect``. ``tp.bisect`` finds its candidates from per-module local error (``tp.isolate``)
and minimizes the set; its wall time includes that, and its rule-based-autocast comparison.

Scenarios (random weights, fixed seeds):

- **ConvNeXt**: transformers ``ConvNextConfig`` (2 stages, hidden 16/32, one block each,
  ``layer_scale_init_value=1.0``); the depthwise conv before ``stages.1.layers.0.layernorm`` is
  scaled by 60000 so that norm sees |x| ~ 3000 (the LayerNorm is scale-invariant, so the FP32
  model is unchanged). Under ``strict:fp16`` (ONNX-style layer_norm decomposition into FP16
  primitives) ``(x - mean)**2`` overflows. Same model as ``tests/test_latent.py``.
- **detector**: ``torchprobe.models.detector.build_detector()``, the founding story: the residual
  sum entering ``encoder.layers.1.norm2`` reaches a few thousand.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402
from torchprobe.capture import module_calls  # noqa: E402
from torchprobe.metrics import all_pass, get_metric, measure, resolve_tol  # noqa: E402
from torchprobe.names import leaf_names  # noqa: E402
from torchprobe.targets import build, parse_target  # noqa: E402
from torchprobe.tree import as_call, named_leaves, replay_copy  # noqa: E402


def convnext(device: str) -> tuple[torch.nn.Module, Any]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                      layer_scale_init_value=1.0, image_size=32, num_labels=4)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    with torch.no_grad():
        dw = model.convnext.encoder.stages[1].layers[0].dwconv
        dw.weight.mul_(60000.0)
        dw.bias.mul_(60000.0)
    return model.to(device), torch.randn(2, 3, 32, 32).to(device)


def detector(device: str) -> tuple[torch.nn.Module, Any]:
    from torchprobe.models.detector import build_detector

    model, images = build_detector()
    return model.to(device), images.to(device)


SCENARIOS: dict[str, Callable[[str], tuple[torch.nn.Module, Any]]] = {"ConvNeXt": convnext, "detector": detector}


def layer_order(model: torch.nn.Module, inputs: Any) -> list[str]:
    """Leaf modules in the order they first run in the FP32 forward (Polygraphy's layer list)."""
    args, kwargs = as_call(inputs)
    leaves = set(leaf_names(model))
    order: list[str] = []
    ref = build("fp32", model, args, kwargs)
    with torch.no_grad(), module_calls(ref.module, lambda n: n in leaves,
                                       after=lambda call, *_: order.append(call.name) if call.name not in order else None):
        a, k = replay_copy((args, kwargs))
        ref(*a, **k)
    return order


@dataclass
class Outcome:
    evaluations: int
    kept: tuple[str, ...]
    error: float
    passed: bool
    seconds: float


def polygraphy_bisect(model: torch.nn.Module, inputs: Any, target: str, layers: list[str], direction: str) -> Outcome:
    """``BisectMarker``: mark the first (forward) or last (reverse) ``k`` layers FP32, binary
    search ``k``; every evaluation is a plan built and run end to end."""
    t0 = time.perf_counter()
    args, kwargs = as_call(inputs)
    metric = get_metric("rel_l2")
    parsed = parse_target(target)
    tol = resolve_tol(None, parsed, metric)
    with torch.no_grad():
        ref = build("fp32", model, args, kwargs)
        a, kw = replay_copy((args, kwargs))
        reference = dict(named_leaves(ref(*a, **kw)))
    n = len(layers)
    results: dict[int, tuple[bool, float]] = {}

    def kept(k: int) -> tuple[str, ...]:
        return tuple(layers[:k]) if direction == "forward" else tuple(layers[n - k:])

    def evaluate(k: int) -> bool:
        runner = build(parsed, model, args, kwargs, keep_fp32=kept(k))
        a, kw = replay_copy((args, kwargs))
        with torch.no_grad():
            out = dict(named_leaves(runner(*a, **kw)))
        errors = [measure(r, out[p]) for p, r in reference.items() if r.is_floating_point() and p in out]
        results[k] = (all_pass(metric, errors, tol), metric.worst(e[metric.name] for e in errors))
        return results[k][0]

    good, bad, mark = n + 1, 0, n  # polygraphy: pretend marking everything is good; start with all marked
    while True:
        if evaluate(mark):
            good, rounding = mark, math.floor
        else:
            bad, rounding = mark, math.ceil
        previous, mark = mark, int(rounding((good + bad) / 2.0))
        if previous == mark or abs(good - bad) <= 1 or mark > n:
            break
    seconds = time.perf_counter() - t0
    if good > n:  # even everything in FP32 failed
        return Outcome(len(results), kept(n), results[n][1], False, seconds)
    return Outcome(len(results), kept(good), results[good][1], True, seconds)


def torchprobe_bisect(model: torch.nn.Module, inputs: Any, target: str) -> Outcome:
    t0 = time.perf_counter()
    fix = tp.bisect(model, inputs, target=target)
    return Outcome(fix.evaluations, fix.keep_fp32, fix.error_after, bool(fix), time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--target", default="strict:fp16",
                        help="the target that breaks the scenarios (strict:fp16 decomposes layer_norm into FP16 "
                             "primitives on this code; the ONNX path is named strict-onnx:fp16 where that exists)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each search (wall time is their median)")
    args, device = C.setup(parser, argv)
    rows = []
    for name, make in SCENARIOS.items():
        model, inputs = make(device.type)
        layers = layer_order(model, inputs)
        methods = {"tp.bisect": lambda: torchprobe_bisect(model, inputs, args.target)}
        for direction in ("forward", "reverse"):
            methods[f"polygraphy bisect, {direction}"] = lambda d=direction: polygraphy_bisect(model, inputs, args.target, layers, d)
        for label, run in methods.items():
            outcomes = [run() for _ in range(max(1, args.reps))]
            o = outcomes[-1]
            seconds = sorted(x.seconds for x in outcomes)[len(outcomes) // 2]
            shown = ", ".join(o.kept) if len(o.kept) <= 2 else f"{o.kept[0]} ... {o.kept[-1]}"
            rows.append([name, len(layers), label, o.evaluations, len(o.kept), "yes" if o.passed else "no",
                         f"{o.error:.3g}", f"{seconds * 1e3:.0f}", shown])
    print(f"{C.environment(device)}; target {args.target}; metric rel_l2, default tol; wall time, median of {args.reps}")
    print(tabulate(rows, headers=["scenario", "layers", "search", "evaluations", "kept FP32", "meets tol", "final rel_l2",
                                  "wall ms", "kept modules"], disable_numparse=True))


if __name__ == "__main__":
    main()
