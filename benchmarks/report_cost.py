"""What ``tp.report()`` costs, against the least it could cost: one plain FP32 forward plus one run
of the model under each target.

    python benchmarks/report_cost.py --device cpu     # small ResNet b8 32x32, BERT 4L-256 b8 s128
    python benchmarks/report_cost.py --device cuda    # ResNet-50 b16, ViT-B/16 b8 (FP32 reference)
    python benchmarks/report_cost.py --targets autocast:fp16 eager:bf16 strict:fp16 --quick

report() builds a private copy of the model per target, runs the FP32 reference pass with a
*shadow* run of every module under every target (local error), then one whole-model run per target
(propagated error), and reads everything back once. The floor it is compared with is what a user
would run by hand to see the same final outputs: ``fp32 forward + sum(target forwards)``, each
target on its own prepared copy (copies built once, outside the timing). The phases of report()
(build, reference + shadows, propagated passes, read, culprits) are timed by wrapping its own
methods in this process; nothing in the package is changed.
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402
from torchprobe import localize  # noqa: E402
from torchprobe.targets import build  # noqa: E402
from torchprobe.tree import as_call  # noqa: E402

DEFAULT_TARGETS = ("autocast:fp16", "eager:fp16", "strict:fp16")
PHASES = {"prepare": "build copies", "reference_pass": "reference + shadows", "propagated_pass": "propagated passes"}


class PhaseTimer:
    """Wraps report()'s session methods and module functions to add up wall time per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = C.clock_for(device)
        self.totals: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            C.synchronize(timer.device)
            t0 = timer.clock()
            try:
                return original(*args, **kwargs)
            finally:
                C.synchronize(timer.device)
                timer.totals[label] += timer.clock() - t0

        self._saved.append((owner, attr, original))
        setattr(owner, attr, timed)

    def __enter__(self) -> "PhaseTimer":
        for attr, label in PHASES.items():
            self._wrap(localize._Session, attr, label)
        self._wrap(localize, "_read", "read + metrics")
        self._wrap(localize, "find_culprits", "culprits")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


def floor_runs(w: C.Workload, targets: tuple[str, ...]) -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """One FP32 forward and each target's own forward on a prepared copy."""
    args, kwargs = as_call(w.inputs)
    runners = {t: build(t, w.model, args, kwargs) for t in targets}

    def fp32() -> Any:
        with torch.no_grad():
            return w.model(*args, **kwargs)

    return fp32, {t: (lambda r=r: r(*args, **kwargs)) for t, r in runners.items()}


def measure(w: C.Workload, targets: tuple[str, ...], reps: int, warmup: int) -> list[list[str]]:
    device = w.device
    fp32, runs = floor_runs(w, targets)
    floor_parts = [C.Variant("fp32 forward", fp32)] + [C.Variant(t, fn) for t, fn in runs.items()]
    C.interleaved(floor_parts, device, reps, warmup)
    floor = sum(v.median for v in floor_parts)

    clock = C.clock_for(device)
    rep_times: list[float] = []
    phases: list[dict[str, float]] = []
    rep = None
    for i in range(warmup + max(3, reps // 5)):
        C.synchronize(device)
        with PhaseTimer(device) as timer:
            t0 = clock()
            rep = tp.report(w.model, w.inputs, targets=targets)
            C.synchronize(device)
            elapsed = clock() - t0
        if i >= warmup:
            rep_times.append(elapsed)
            phases.append(dict(timer.totals))
    report_s = statistics.median(rep_times)
    phase_s = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
    verdict = ", ".join(f"{o.target} {'pass' if o.passed else 'FAIL'}" for o in rep.outcomes)
    rows = [[w.name, device.type, "report()", f"{report_s * 1e3:.1f}", f"{report_s / floor:.1f}x", verdict]]
    rows.append([w.name, device.type, "floor = " + " + ".join(v.name for v in floor_parts), f"{floor * 1e3:.1f}", "1.0x",
                 "; ".join(f"{v.name} {v.median * 1e3:.1f}" for v in floor_parts)])
    for label, seconds in phase_s.items():
        rows.append([w.name, device.type, f"  phase: {label}", f"{seconds * 1e3:.1f}", f"{seconds / floor:.1f}x", ""])
    n_modules = len({r.module for r in rep.rows})
    rows.append([w.name, device.type, f"  rows {len(rep.rows)}, modules {n_modules}", "", "", ""])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    args, device = C.setup(parser, argv)
    reps, warmup = (5, 1) if args.quick else (15, 2)
    if device.type == "cpu":
        workloads = [C.small_cnn("cpu"), C.small_bert("cpu")]
    else:
        workloads = [C.resnet50("cuda", batch=16, autocast=None), C.vit_base("cuda", batch=8, autocast=None)]
    targets = tuple(args.targets)
    rows = [row for w in workloads for row in measure(w, targets, reps, warmup)]
    print(f"{C.environment(device)}; targets {', '.join(targets)}; medians of {C.clock_name(device)}")
    print(tabulate(rows, headers=["model", "device", "what", "ms", "x floor", "notes"], disable_numparse=True,
                   colalign=("left", "left", "left", "right", "right", "left")))


if __name__ == "__main__":
    main()
