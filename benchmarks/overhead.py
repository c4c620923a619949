"""Overhead of ``torchprobe.record()`` (statistics only, read included) against the plain forward,
side by side with another checkout of torchprobe (``--compare``, e.g. git ``main``) and, with
``--hf``, transformers' ``DebugUnderflowOverflow``, on the same models in the same run.

    python benchmarks/overhead.py --device cpu                      # 1 thread, thread CPU time
    python benchmarks/overhead.py --device cpu --threads 0          # all threads, wall time
    python benchmarks/overhead.py --device cuda --compare ../main   # ResNet-50 b64, ViT-B/16 b32, ConvNeXt-T b64
    python benchmarks/overhead.py --device cuda --tune              # sweep the kernel's launch shape first

CPU models: the small ResNet b8 32x32, BERT 4L-256 b8 s128 and transformers' ConvNeXt [32..256]
[2,2,4,2] b8 64x64 (issue 13); CUDA models run under autocast FP16. One torchprobe sample is
``with tp.record(model) as rec: model(x)`` followed by ``rec.rows`` (the one host read), so hook
registration, the per-module statistics and the read are all in it; "hooks only" is the same with
the statistics replaced by a no-op. Variants run interleaved (see ``_common.py``); tables give
medians. Besides the ratios the tables give: host time per hooked module call (host time of the
recorded forward minus the plain one's, over the calls), the tensors summarized and the bytes they
hold, and on CUDA the read-once floor (plain forward + those bytes at the device's read rate,
measured in the same run), the syncs inside the forward and at the read, and the bandwidth of the
statistics pass alone. On the CPU it also gives the time the model's own modules take inside a
recorded forward (the forward minus the time spent in torchprobe's hook).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402

CPU_MODELS = {"resnet": C.small_cnn, "bert": C.small_bert, "convnext": C.small_convnext}
CUDA_MODELS = {"resnet50": C.resnet50, "vit": C.vit_base, "convnext": C.convnext_tiny}


class _NoStats:
    """Stands in for the Summarizer: hooks and bookkeeping only, no statistics."""

    def __call__(self, x: torch.Tensor) -> None:
        return None


def recorder(pkg: Any, w: C.Workload, stats: bool = True) -> Callable[[], Any]:
    def run() -> Any:
        with pkg.record(w.model) as rec:
            if not stats:
                rec._summarize = _NoStats()
            w.call()
        return rec.rows

    return run


@dataclass
class Result:
    workload: C.Workload
    variants: list[C.Variant]
    calls: int = 0
    tensors: int = 0
    nbytes: int = 0
    host_us: dict[str, float] = field(default_factory=dict)  # extra host time per hooked call
    syncs: dict[str, tuple[int, int]] = field(default_factory=dict)
    floor: float | None = None  # seconds
    own: dict[str, float] = field(default_factory=dict)  # CPU: the model's own time inside a sample
    read_ms: dict[str, float] = field(default_factory=dict)  # rec.rows alone, the device idle

    def by_name(self, name: str) -> C.Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def footprint(pkg: Any, w: C.Workload) -> tuple[int, int, int]:
    """Module calls, distinct summaries (one kernel launch each on CUDA) and their bytes, of one recorded forward."""
    with pkg.record(w.model) as rec:
        w.call()
    seen: set[int] = set()
    nbytes = 0
    for p in rec._pending:
        if p.vector is not None and id(p.vector) not in seen:
            seen.add(id(p.vector))
            nbytes += torch.Size(p.shape).numel() * torch.empty((), dtype=p.dtype).element_size()
    return sum(rec.calls.values()), len(seen), nbytes


def host_times(fns: dict[str, Callable[[], Any]], w: C.Workload, reps: int) -> dict[str, float]:
    """Median host time to enqueue one forward (the device idle at the start; the read excluded)."""
    device = w.device
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps):
        for name, fn in fns.items():
            C.synchronize(device)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            C.synchronize(device)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def read_time(pkg: Any, w: C.Workload, reps: int) -> float:
    """Median time of ``rec.rows`` alone (one host copy per slab block, decoding, the Row objects),
    after the recorded forward has finished on the device."""
    times = []
    for _ in range(reps):
        with pkg.record(w.model) as rec:
            w.call()
        C.synchronize(w.device)
        t0 = time.perf_counter()
        rec.rows
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def forward_only(pkg: Any, w: C.Workload, stats: bool = True) -> Callable[[], Any]:
    def run() -> Any:
        with pkg.record(w.model) as rec:
            if not stats:
                rec._summarize = _NoStats()
            w.call()
        return rec

    return run


class HookClock:
    """Adds up the time spent inside ``Recording.observe`` of one package (the hook's own work)."""

    def __init__(self, pkg: Any) -> None:
        self.cls = pkg.capture.Recording
        self.total = 0.0

    def __enter__(self) -> "HookClock":
        original = self.original = self.cls.observe
        clock = self

        def timed(rec, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(rec, *args, **kwargs)
            finally:
                clock.total += time.perf_counter() - t0

        self.cls.observe = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cls.observe = self.original


def own_time(pkgs: dict[str, Any], w: C.Workload, reps: int) -> dict[str, float]:
    """CPU: median wall time of the model's own work inside one sample (the sample minus the time
    in torchprobe's hook), against the plain forward's. Equal values mean the statistics do not
    slow the model's kernels down."""
    out: dict[str, list[float]] = {"plain": [], **{k: [] for k in pkgs}}
    for _ in range(reps):
        t0 = time.perf_counter()
        w.call()
        out["plain"].append(time.perf_counter() - t0)
        for name, pkg in pkgs.items():
            with HookClock(pkg) as clock:
                t0 = time.perf_counter()
                with pkg.record(w.model):
                    w.call()
                total = time.perf_counter() - t0
            out[name].append(total - clock.total)
    return {k: sorted(v)[len(v) // 2] for k, v in out.items()}


def measure(w: C.Workload, pkgs: dict[str, Any], reps: int, warmup: int, hf: bool) -> Result:
    device = w.device
    variants = [C.Variant("plain", w.call)]
    for label, pkg in pkgs.items():
        variants.append(C.Variant(f"record{label}", recorder(pkg, w)))
        variants.append(C.Variant(f"hooks only{label}", recorder(pkg, w, stats=False)))
    if hf:
        pair = C.hf_debugger_copy(w.model)
        if pair is not None:
            clone, _debugger = pair
            try:
                w.call(clone)  # it raises once it meets an Inf/NaN
                variants.append(C.Variant("HF DebugUnderflowOverflow", lambda: w.call(clone)))
            except Exception as e:  # noqa: BLE001 - a finding of its own, not a benchmark failure
                print(f"  {w.name}: HF DebugUnderflowOverflow stopped: {str(e)[:80]}", file=sys.stderr)
    C.interleaved(variants, device, reps, warmup)
    r = Result(w, variants)
    r.calls, r.tensors, r.nbytes = footprint(tp, w)
    def bare() -> None:  # calibration: a no-op process-wide forward hook
        with torch.nn.modules.module.register_module_forward_hook(lambda m, a, k, o: None, with_kwargs=True):
            w.call()

    fns = {"plain": w.call, "bare hook": bare}
    for label, pkg in pkgs.items():
        fns[f"record{label}"] = forward_only(pkg, w)
        fns[f"hooks only{label}"] = forward_only(pkg, w, stats=False)
    host = host_times(fns, w, max(5, reps // 2))
    r.host_us = {k: (v - host["plain"]) / r.calls * 1e6 for k, v in host.items() if k != "plain"}
    for label, pkg in pkgs.items():
        r.read_ms[f"record{label}"] = read_time(pkg, w, max(5, reps // 2)) * 1e3
    if device.type == "cuda":
        for label, pkg in pkgs.items():
            with C.counting_syncs(device) as in_forward:
                with pkg.record(w.model) as rec:
                    w.call()
            with C.counting_syncs(device) as at_read:
                rec.rows
            r.syncs[f"record{label}"] = (in_forward[0], at_read[0])
            for message in in_forward[1]:
                print(f"  {w.name} record{label}: sync in the forward: {message[:160]}", file=sys.stderr)
    else:
        r.own = own_time({f"record{k}": v for k, v in pkgs.items()}, w, max(5, reps // 2))
    return r


def read_rate(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Bytes/s of the fastest plain read this device does: a sum over a large FP16 and FP32 tensor."""
    best = 0.0
    for dtype in (torch.float16, torch.float32):
        x = torch.empty(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device).uniform_()
        seconds = C.device_time(lambda: x.sum(dtype=torch.float32), device, reps=10, warmup=2)
        best = max(best, nbytes / seconds)
        del x
    return best


def ratio_table(results: list[Result], labels: list[str]) -> str:
    rows = []
    for r in results:
        plain = r.by_name("plain").median
        row = [r.workload.name, f"{plain * 1e3:.2f}"]
        for label in labels:
            rec, hooks = r.by_name(f"record{label}"), r.by_name(f"hooks only{label}")
            row += [f"{rec.median / plain:.2f}x", f"{hooks.median / plain:.2f}x",
                    f"{r.host_us[f'record{label}']:.1f} / {r.host_us[f'hooks only{label}']:.1f}"]
        if r.floor is not None:
            row.append(f"{r.floor / plain:.2f}x")
        hf = r.by_name("HF DebugUnderflowOverflow")
        if hf is not None:
            row.append(f"{hf.median / plain:.2f}x")
        row += [f"{r.host_us['bare hook']:.1f}", str(r.calls), str(r.tensors), C.mib(r.nbytes)]
        rows.append(row)
    headers = ["model", "plain ms"]
    for label in labels:
        name = label.strip(" ()") or "this"
        headers += [f"record() [{name}]", f"hooks only [{name}]", f"{'host' if results and results[0].workload.device.type == 'cuda' else 'extra'} us/call record / hooks [{name}]"]
    if any(r.floor is not None for r in results):
        headers.append("read-once floor")
    if any(r.by_name("HF DebugUnderflowOverflow") for r in results):
        headers.append("HF debug")
    headers += ["bare hook us/call", "module calls", "tensors read", "MiB read"]
    return tabulate(rows, headers=headers, disable_numparse=True, colalign=("left",) + ("right",) * (len(headers) - 1))


def detail_table(results: list[Result]) -> str:
    rows = []
    for r in results:
        plain = r.by_name("plain").median
        for v in r.variants:
            sync = r.syncs.get(v.name)
            own = r.own.get(v.name)
            read = r.read_ms.get(v.name)
            rows.append([r.workload.name, v.name, f"{v.median * 1e3:.2f}", f"{v.median / plain:.2f}x",
                         f"{read:.2f}" if read is not None else "-",
                         f"{sync[0]} / {sync[1]}" if sync else "-", f"{own * 1e3:.2f}" if own is not None else "-"])
        if r.own:
            rows.append([r.workload.name, "(plain, own time)", "", "", "", "-", f"{r.own['plain'] * 1e3:.2f}"])
    return tabulate(rows, headers=["model", "variant", "median ms", "x plain", "read ms", "syncs fwd / read", "model's own ms"],
                    disable_numparse=True, colalign=("left", "left", "right", "right", "right", "right", "right"))


def stats_bandwidth(w: C.Workload, summarizers: dict[str, Callable[[torch.Tensor], Any]]) -> list[list[str]]:
    """Time each summarizer alone over every distinct floating tensor one recorded forward produced."""
    from torchprobe.tree import named_leaves

    device = w.device
    tensors: list[torch.Tensor] = []
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # so that no id is reused by a later tensor during the forward

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        for _, t in named_leaves(output):
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                alive.append(t)
                tensors.append(t.detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        w.call()
    finally:
        handle.remove()
    alive.clear()
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    rows = []
    for name, summarize in summarizers.items():
        seconds = C.device_time(lambda: [summarize(t) for t in tensors], device, reps=10, warmup=2)
        rows.append([w.name, name, str(len(tensors)), C.mib(nbytes), f"{seconds * 1e3:.3f}", f"{nbytes / seconds / 1e9:.0f}"])
    return rows


def tune(device: torch.device) -> str:
    """Sweep the Triton kernel's launch shape per dtype on one large tensor, check every shape
    against the eager reference, and keep the fastest in ``torchprobe.stats._CONFIG``."""
    from torchprobe import stats as S

    shapes = [(512, 4, 4), (1024, 4, 4), (512, 4, 8), (1024, 4, 8), (2048, 8, 4)]
    rows = []
    for dtype in S._FUSED_DTYPES:
        fmt = S._CONFIG[dtype][0]
        x = (torch.randn(1 << 27, device=device) * 300).to(dtype)
        x[:1000] = 0.0
        x[1000:1010] = float("nan")
        ref = S.read([(dtype, tuple(x.shape), S.Summarizer(fused=False)(x))])[0]
        best = None
        for block, warps, per_sm in shapes:
            S._CONFIG[dtype] = (fmt, block, warps, per_sm)
            summarize = S.Summarizer()
            got = S.read([(dtype, tuple(x.shape), summarize(x))])[0]
            ok = all(getattr(got, f) == getattr(ref, f) for f in ("nan", "inf", "beyond_fp16", "subnormal_fp16", "flush_fp16", "numel", "min", "max"))
            seconds = C.device_time(lambda: summarize(x), device, reps=20, warmup=3)
            gbs = x.numel() * x.element_size() / seconds / 1e9
            compiled = [v for k, v in S._compiled.items() if k[-1] == "public" and k[0] == dtype and k[3] == S._CONFIG[dtype]]
            regs = f"{compiled[0].n_regs} / {compiled[0].n_spills}" if compiled and hasattr(compiled[0], "n_regs") else "?"
            rows.append([str(dtype).replace("torch.", ""), f"{block} x4", str(warps), str(per_sm), regs, f"{gbs:.0f}", "ok" if ok else "WRONG"])
            if ok and (best is None or gbs > best[0]):
                best = (gbs, (fmt, block, warps, per_sm))
        S._CONFIG[dtype] = best[1]
        rows[-len(shapes):] = [row + (["<- kept"] if (int(row[1].split()[0]), int(row[2]), int(row[3])) == best[1][1:] else [""])
                               for row in rows[-len(shapes):]]
        del x
    return tabulate(rows, headers=["dtype", "elements/step", "warps", "programs/SM", "regs / spills", "GB/s", "vs eager", ""],
                    disable_numparse=True)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="samples per variant (default 20 CPU / 30 CUDA)")
    parser.add_argument("--models", default=None, help="comma-separated subset: " + ", ".join([*CPU_MODELS, *CUDA_MODELS]))
    parser.add_argument("--compare", default=None, help="another checkout whose torchprobe runs side by side (label 'main')")
    parser.add_argument("--hf", action="store_true", help="also time transformers' DebugUnderflowOverflow")
    parser.add_argument("--tune", action="store_true", help="CUDA: sweep the kernel's launch shape first, keep the fastest")
    parser.add_argument("--host-pool", type=int, default=None,
                        help="CPU: count tensors of at least this many elements on several threads (0: never)")
    parser.add_argument("--torch-counts", type=int, default=None,
                        help="CPU: with several threads, count tensors of at least this many elements with torch ops")
    args, device = C.setup(parser, argv)
    if args.host_pool is not None:
        tp.stats._POOL_MIN = args.host_pool
    if args.torch_counts is not None:
        tp.stats._TORCH_COUNTS_MIN = args.torch_counts
    reps = args.reps or (5 if args.quick else (20 if device.type == "cpu" else 30))
    warmup = 2 if args.quick else 4
    pkgs = {"": tp}
    if args.compare:
        pkgs[" (main)"] = C.load_tree(args.compare, "torchprobe_main")
    if args.tune and device.type == "cuda":
        print(tune(device))
        print()
    table = CPU_MODELS if device.type == "cpu" else CUDA_MODELS
    names = args.models.split(",") if args.models else list(table)
    rate = read_rate(device) if device.type == "cuda" else None
    workloads, results = [], []
    for n in names:  # one at a time: each model's line is printed as soon as it is measured
        w = table[n](str(device))
        workloads.append(w)
        r = measure(w, pkgs, reps, warmup, args.hf)
        if rate is not None:
            r.floor = r.by_name("plain").median + r.nbytes / rate
        results.append(r)
        print(ratio_table([r], list(pkgs)).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"{C.environment(device)}; {reps} samples per variant after {warmup} warm-up, interleaved; "
          f"medians of {C.clock_name(device)}")
    for w in workloads:
        if w.notes:
            print(f"  {w.name}: {w.notes}")
    if device.type == "cuda":
        print(f"  read-once floor: plain forward + the bytes summarized at {rate / 1e9:.0f} GB/s "
              f"(a plain sum over 4 GiB, this device, this run)")
    print(ratio_table(results, list(pkgs)))
    print()
    print(detail_table(results))
    if device.type == "cuda":
        print()
        summarizers: dict[str, Callable] = {"fused (Triton)": tp.stats.Summarizer()}
        if args.compare:
            summarizers["fused (Triton) [main]"] = pkgs[" (main)"].stats.Summarizer()
        rows = [row for w in workloads for row in stats_bandwidth(w, summarizers)]
        print(tabulate(rows, headers=["model", "statistics", "tensors", "MiB read", "ms", "GB/s"], disable_numparse=True,
                       colalign=("left", "left", "right", "right", "right", "right")))
        print(f"device-to-device copy: {C.copy_bandwidth(device) / 1e9:.0f} GB/s (bytes read + written); "
              f"plain read: {rate / 1e9:.0f} GB/s")
    return results


if __name__ == "__main__":
    main()
