"""Why the model's own kernels ran slower under ``record()`` on the CPU, and which statistics
operations cause it.

    python benchmarks/cpu_interference.py --threads 0            # all threads (wall time)
    python benchmarks/cpu_interference.py --threads 2 --compare ../main

A forward hook runs one *probe* on every module output (one operation of the statistics, or a
whole summary); the table gives the time the model's own modules take in that forward (the
forward's wall time minus the time spent in the hook) against the plain forward, and the hook's
own time. A probe that leaves the model's own time unchanged does not interfere; one that raises
it slows the model's kernels down (thread pools spinning on the same cores, page faults of fresh
temporaries, ...). Probes, models and plain forwards run interleaved; medians.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402


def probes(pkgs: dict[str, Any]) -> dict[str, Callable[[torch.Tensor], Any]]:
    out: dict[str, Callable[[torch.Tensor], Any]] = {
        "none (hook only)": lambda t: None,
        "torch.aminmax": lambda t: torch.aminmax(t.reshape(-1)),
        "torch sum": lambda t: float(t.sum()),
        "torch.dot": lambda t: float(torch.dot(t.reshape(-1), t.reshape(-1))),
        "NumPy abs + compare + count": lambda t: np.count_nonzero(np.abs(t.detach().numpy()) < 2**-14),
        "NumPy float64 dot (OpenBLAS)": lambda t: float(np.dot(t.detach().numpy().ravel().astype(np.float64),
                                                               t.detach().numpy().ravel().astype(np.float64))),
        "fresh 4 B/element temporary": lambda t: torch.empty_like(t).fill_(1.0),
    }
    for label, pkg in pkgs.items():
        summarize = pkg.stats.Summarizer()
        out[f"whole summary{label}"] = lambda t, s=summarize: s(t.detach())
    return out


def measure(w: C.Workload, fns: dict[str, Callable[[torch.Tensor], Any]], reps: int) -> dict[str, tuple[float, float]]:
    spent = [0.0]

    def hooked(fn: Callable[[torch.Tensor], Any]) -> Callable[[], float]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            t0 = time.perf_counter()
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                fn(output)
            spent[0] += time.perf_counter() - t0

        def run() -> float:
            spent[0] = 0.0
            handle = torch.nn.modules.module.register_module_forward_hook(hook)
            try:
                t0 = time.perf_counter()
                w.call()
                return time.perf_counter() - t0
            finally:
                handle.remove()

        return run

    runs = {name: hooked(fn) for name, fn in fns.items()}
    times: dict[str, list[tuple[float, float]]] = {"plain": [], **{k: [] for k in runs}}
    for _ in range(2):
        w.call()
        for run in runs.values():
            run()
    for i in range(reps):
        t0 = time.perf_counter()
        w.call()
        times["plain"].append((time.perf_counter() - t0, 0.0))
        names = list(runs)
        k = i % len(names)
        for name in names[k:] + names[:k]:
            total = runs[name]()
            times[name].append((total - spent[0], spent[0]))
    return {k: (sorted(a for a, _ in v)[len(v) // 2], sorted(b for _, b in v)[len(v) // 2]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--models", default="convnext,resnet", help="comma-separated: resnet, bert, convnext")
    parser.add_argument("--compare", default=None, help="another checkout whose summary is probed too (label 'main')")
    args, device = C.setup(parser, argv)
    pkgs = {"": tp}
    if args.compare:
        pkgs[" (main)"] = C.load_tree(args.compare, "torchprobe_main")
    models = {"resnet": C.small_cnn, "bert": C.small_bert, "convnext": C.small_convnext}
    rows = []
    for name in args.models.split(","):
        w = models[name]("cpu")
        result = measure(w, probes(pkgs), args.reps)
        plain = result["plain"][0]
        for probe, (own, hook) in result.items():
            rows.append([w.name, probe, f"{own * 1e3:.2f}", f"{own / plain:.2f}x", f"{hook * 1e3:.2f}" if probe != "plain" else "-"])
    print(f"{C.environment(device)}; {args.reps} samples, interleaved; medians of wall time")
    print(tabulate(rows, headers=["model", "probe on every module output", "model's own ms", "x plain", "hook ms"],
                   disable_numparse=True, colalign=("left", "left", "right", "right", "right")))


if __name__ == "__main__":
    main()
