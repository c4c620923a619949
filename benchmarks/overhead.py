"""Overhead of ``torchprobe.record()`` (statistics only) against the plain forward and against
transformers' ``DebugUnderflowOverflow``, on the same models in the same run.

    python benchmarks/overhead.py --device cpu            # small ResNet b8 32x32, BERT 4L-256 b8 s128
    python benchmarks/overhead.py --device cuda           # ResNet-50 b64, ViT-B/16 b32, autocast fp16
    python benchmarks/overhead.py --device cuda --quick   # fewer repetitions

One torchprobe sample is ``with tp.record(model) as rec: model(x)`` followed by ``rec.rows`` (the
one host read), so hook registration, the per-module statistics and the read are all in it. HF's
debugger hooks a deep copy of the model (its hooks cannot be removed). Variants run interleaved
(see ``_common.py``); the table gives medians. On CUDA it also gives the host synchronizations
counted inside the recorded forward (``torch.cuda.set_sync_debug_mode('warn')``) and at the read,
the peak device memory above the plain forward's, and the peak of ``capture=True, offload=True``
against the plain forward's; and the bandwidth of the statistics pass next to the device copy
bandwidth (the physical limit).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402


def recorder(record: Callable[..., Any], w: C.Workload, **kw: Any) -> Callable[[], Any]:
    def run() -> Any:
        with record(w.model, **kw) as rec:
            w.call()
        return rec.rows

    return run


class _NoStats:
    """Stands in for the Summarizer: hooks and bookkeeping only, no statistics."""

    def __call__(self, x: torch.Tensor) -> None:
        return None


def hooks_only(record: Callable[..., Any], w: C.Workload) -> Callable[[], Any]:
    def run() -> Any:
        with record(w.model) as rec:
            rec._summarize = _NoStats()
            w.call()
        return rec.rows

    return run


@dataclass
class Result:
    workload: C.Workload
    variants: list[C.Variant]
    syncs: dict[str, tuple[int, int]]
    extra_peak: dict[str, int]
    memory: dict[str, dict[str, float]]

    def by_name(self, name: str) -> C.Variant:
        return next(v for v in self.variants if v.name == name)


def build_variants(w: C.Workload) -> list[C.Variant]:
    variants = [C.Variant("plain", w.call), C.Variant("torchprobe", recorder(tp.record, w))]
    hf = C.hf_debugger_copy(w.model)
    if hf is not None:
        clone, _debugger = hf
        variants.append(C.Variant("HF DebugUnderflowOverflow", lambda: w.call(clone)))
    variants.append(C.Variant("hooks only", hooks_only(tp.record, w)))
    return variants


def measure(w: C.Workload, reps: int, warmup: int) -> Result:
    device = w.device
    variants = build_variants(w)
    C.interleaved(variants, device, reps, warmup)
    syncs: dict[str, tuple[int, int]] = {}
    extra: dict[str, int] = {}
    memory: dict[str, dict[str, float]] = {}
    if device.type == "cuda":
        records = {"torchprobe": tp.record}
        with C.counting_syncs(device) as plain_syncs:
            w.call()
        syncs["plain"] = (plain_syncs[0], 0)
        for name, record in records.items():
            with C.counting_syncs(device) as in_forward:
                with record(w.model) as rec:
                    w.call()
            with C.counting_syncs(device) as at_read:
                rec.rows
            syncs[name] = (in_forward[0], at_read[0])
        hf = next((v for v in variants if v.name.startswith("HF")), None)
        if hf is not None:
            with C.counting_syncs(device) as hf_syncs:
                hf.fn()
            syncs[hf.name] = (hf_syncs[0], 0)
        plain_peak = C.peak_bytes(w.call, device)
        for name, record in records.items():
            extra[name] = C.peak_bytes(recorder(record, w), device) - plain_peak
        extra["plain"] = 0
        weights = torch.cuda.memory_allocated(device)
        for name, record in records.items():
            offload_peak = C.peak_bytes(recorder(record, w, capture=True, offload=True), device)
            memory[name] = {"plain peak MiB": plain_peak / 2**20, "offload peak MiB": offload_peak / 2**20,
                            "resident MiB": weights / 2**20,
                            "activation ratio": offload_peak / plain_peak,
                            "total ratio": (weights + offload_peak) / (weights + plain_peak)}
    return Result(w, variants, syncs, extra, memory)


def table(results: list[Result]) -> str:
    rows = []
    for r in results:
        plain = r.by_name("plain").median
        for v in r.variants:
            if v.name == "plain":
                continue
            sync = r.syncs.get(v.name)
            rows.append([
                r.workload.name, r.workload.device.type, r.workload.dtype_label, v.name,
                f"{plain * 1e3:.2f}", f"{v.median * 1e3:.2f}", f"{v.median / plain:.2f}x",
                C.mib(r.extra_peak[v.name]) if v.name in r.extra_peak else "-",
                f"{sync[0]} / {sync[1]}" if sync else "-",
            ])
    return tabulate(rows, headers=["model", "device", "dtype", "variant", "plain ms", "variant ms", "ratio",
                                   "extra peak MiB", "syncs fwd / read"],
                    disable_numparse=True, colalign=("left",) * 4 + ("right",) * 5)


def summary_table(results: list[Result]) -> str:
    """The issue's table: one line per model, torchprobe and HF side by side."""
    rows = []
    for r in results:
        plain = r.by_name("plain").median
        tpv = r.by_name("torchprobe")
        hf = next((v for v in r.variants if v.name.startswith("HF")), None)
        sync = r.syncs.get("torchprobe")
        rows.append([
            r.workload.name, r.workload.device.type, r.workload.dtype_label, f"{plain * 1e3:.2f}",
            f"{tpv.median * 1e3:.2f}", f"{tpv.median / plain:.2f}x",
            f"{hf.median * 1e3:.2f}" if hf else "n/a", f"{hf.median / plain:.2f}x" if hf else "n/a",
            C.mib(r.extra_peak["torchprobe"]) if "torchprobe" in r.extra_peak else "n/a",
            f"{sync[0]}" if sync else "n/a",
        ])
    return tabulate(rows, headers=["model", "device", "dtype", "plain ms", "torchprobe ms", "ratio", "HF debug ms",
                                   "HF ratio", "extra peak MiB", "syncs/forward"],
                    disable_numparse=True, colalign=("left",) * 3 + ("right",) * 7)


def memory_table(results: list[Result]) -> str:
    rows = [[r.workload.name, name, f"{m['resident MiB']:.0f}", f"{m['plain peak MiB']:.0f}",
             f"{m['offload peak MiB']:.0f}", f"{m['activation ratio']:.2f}x", f"{m['total ratio']:.2f}x"]
            for r in results for name, m in r.memory.items()]
    return tabulate(rows, headers=["model", "record", "resident MiB", "plain fwd peak MiB", "capture+offload peak MiB",
                                   "peak ratio", "incl. resident"],
                    disable_numparse=True, colalign=("left", "left") + ("right",) * 5)


def stats_bandwidth(w: C.Workload, summarizers: dict[str, Callable[[torch.Tensor], Any]]) -> list[list[str]]:
    """Time each summarizer alone over every distinct tensor one recorded forward produced."""
    device = w.device
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        from torchprobe.tree import named_leaves

        for _, t in named_leaves(output):
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t.detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        w.call()
    finally:
        handle.remove()
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    rows = []
    for name, summarize in summarizers.items():
        seconds = C.device_time(lambda: [summarize(t) for t in tensors], device, reps=10, warmup=2)
        rows.append([w.name, name, str(len(tensors)), C.mib(nbytes), f"{seconds * 1e3:.3f}", f"{nbytes / seconds / 1e9:.0f}"])
    return rows


def main(argv: list[str] | None = None) -> list[Result]:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="samples per variant (default 30 CPU / 50 CUDA)")
    args, device = C.setup(parser, argv)
    reps = args.reps or (5 if args.quick else (30 if device.type == "cpu" else 50))
    warmup = 2 if args.quick else 5
    if device.type == "cpu":
        workloads = [C.small_cnn("cpu"), C.small_bert("cpu")]
    else:
        workloads = [C.resnet50("cuda"), C.vit_base("cuda")]
    results = [measure(w, reps, warmup) for w in workloads]
    print(f"{C.environment(device)}; {reps} samples per variant after {warmup} warm-up, interleaved; "
          f"medians of {C.clock_name(device)}")
    for w in workloads:
        if w.notes:
            print(f"  {w.name}: {w.notes}")
    print(summary_table(results))
    print()
    print(table(results))
    if device.type == "cuda":
        print()
        print(memory_table(results))
        print()
        from torchprobe.stats import Summarizer

        summarizers: dict[str, Callable] = {"fused (Triton)": Summarizer(), "eager ops (fused=False)": Summarizer(fused=False)}
        rows = [row for w in workloads for row in stats_bandwidth(w, summarizers)]
        bw = C.copy_bandwidth(device)
        print(tabulate(rows, headers=["model", "statistics", "tensors", "MiB read", "ms", "GB/s"], disable_numparse=True,
                       colalign=("left", "left", "right", "right", "right", "right")))
        print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (bytes read + written)")
    return results


if __name__ == "__main__":
    main()
