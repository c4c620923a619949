"""What ``tp.report()`` costs, against the least it could cost: one plain FP32 forward plus one run
of the model under each target.

    python benchmarks/report_cost.py --device cpu     # small ResNet b8 32x32, BERT 4L-256 b8 s128
    python benchmarks/report_cost.py --device cuda    # ResNet-50 b16, ViT-B/16 b8, 0.8B Llama-style decoder
    python benchmarks/report_cost.py --baseline /tmp/base --models vit   # side by side with another checkout

report() builds a private copy of the model per target, runs the FP32 reference pass with a
*shadow* run of every module under every target (local error), then one whole-model run per target
(propagated error), and reads everything back once. The floor it is compared with is what a user
would run by hand to see the same final outputs: ``fp32 forward + sum(target forwards)``, each
target on its own prepared copy (copies built once, outside the timing). The phases of report()
(build, reference + shadows, propagated passes, subtree pass, read, culprits) are timed by
wrapping its own methods in this process; nothing in the package is changed.

``--baseline DIR``: DIR holds a ``torchprobe`` package from another commit (``git archive <commit>
torchprobe | tar -x -C DIR``); it is imported as ``torchprobe_baseline`` and its report() is timed
interleaved with this checkout's, sample by sample, on the same inputs.

On the decoder the table also gives report()'s time in FP32 forwards and its peak extra device
memory against the bound ``model copies + one set of reference activations``: the bytes of the
parameters and buffers of the reference copy and of each target's copy, plus the bytes of every
distinct module output of one FP32 forward (what the reference pass keeps).
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402
from torchprobe.targets import build  # noqa: E402
from torchprobe.tree import as_call  # noqa: E402

DEFAULT_TARGETS = ("autocast:fp16", "eager:fp16", "eager:bf16")
PHASES = {"prepare": "build copies", "reference_pass": "reference + shadows", "propagated_pass": "propagated passes",
          "subtree_pass": "subtree pass", "read": "read + metrics"}


def load_baseline(path: str) -> ModuleType:
    """Import the ``torchprobe`` package under ``path`` as ``torchprobe_baseline`` (its imports
    are relative, so it runs beside this checkout's package without sharing a module)."""
    root = Path(path) / "torchprobe"
    spec = importlib.util.spec_from_file_location("torchprobe_baseline", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchprobe_baseline"] = module
    spec.loader.exec_module(module)
    return module


class PhaseTimer:
    """Wraps report()'s session methods and module functions to add up wall time per phase."""

    def __init__(self, package: ModuleType, device: torch.device) -> None:
        self.localize = sys.modules[f"{package.__name__}.localize"]
        self.passes = sys.modules[f"{package.__name__}.localize.passes"]
        self.device = device
        self.clock = C.clock_for(device)
        self.totals: dict[str, float] = defaultdict(float)
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        if not hasattr(owner, attr):
            return
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
            self._wrap(self.passes.Session, attr, label)
        self._wrap(self.localize, "find_findings", "culprits")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()


def floor_runs(w: C.Workload, targets: tuple[str, ...]) -> list[C.Variant]:
    """One FP32 forward and each target's own forward on a prepared copy."""
    args, kwargs = as_call(w.inputs)
    runners = {t: build(t, w.model, args, kwargs) for t in targets}

    def fp32() -> Any:
        with torch.no_grad():
            return w.model(*args, **kwargs)

    return [C.Variant("fp32 forward", fp32)] + [C.Variant(t, (lambda r=r: r(*args, **kwargs))) for t, r in runners.items()]


def model_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def reference_set_bytes(w: C.Workload) -> int:
    """Bytes of every distinct module output of one FP32 forward (what the reference pass keeps)."""
    with torch.no_grad(), tp.record(w.model, capture=True) as rec:
        w.call()
    storages = {}
    for t in rec.tensors.values():
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(w: C.Workload, targets: tuple[str, ...], reps: int, warmup: int, packages: dict[str, ModuleType],
            memory: bool) -> list[list[str]]:
    device = w.device
    floor_parts = floor_runs(w, targets)
    C.interleaved(floor_parts, device, reps, warmup)
    floor = sum(v.median for v in floor_parts)
    fp32 = floor_parts[0].median

    clock = C.clock_for(device)
    times: dict[str, list[float]] = {label: [] for label in packages}
    phases: dict[str, list[dict[str, float]]] = {label: [] for label in packages}
    reports: dict[str, Any] = {}
    labels = list(packages)
    samples = max(3, reps // 3)
    for i in range(warmup + samples):
        order = labels[i % len(labels):] + labels[:i % len(labels)]
        for label in order:
            package = packages[label]
            C.synchronize(device)
            with PhaseTimer(package, device) as timer:
                t0 = clock()
                reports[label] = package.report(w.model, w.inputs, targets=targets)
                C.synchronize(device)
                elapsed = clock() - t0
            if i >= warmup:
                times[label].append(elapsed)
                phases[label].append(dict(timer.totals))
    rows = [[w.name, "floor = " + " + ".join(v.name for v in floor_parts), f"{floor * 1e3:.1f}", "1.0x", "",
             "; ".join(f"{v.name} {v.median * 1e3:.1f}" for v in floor_parts)]]
    for label in labels:
        seconds = statistics.median(times[label])
        rep = reports[label]
        verdict = ", ".join(f"{o.target} {'pass' if o.passed else 'FAIL'}" for o in rep.outcomes)
        rows.append([w.name, f"report() [{label}]", f"{seconds * 1e3:.1f}", f"{seconds / floor:.2f}x",
                     f"{seconds / fp32:.1f}", verdict])
        keys = sorted({k for p in phases[label] for k in p})
        for key in keys:
            s = statistics.median(p.get(key, 0.0) for p in phases[label])
            rows.append([w.name, f"  phase [{label}]: {key}", f"{s * 1e3:.1f}", f"{s / floor:.2f}x", f"{s / fp32:.1f}", ""])
    rep = reports[labels[0]]
    rows.append([w.name, f"  rows {len(rep.rows)}, modules {len({r.module for r in rep.rows})}, "
                         f"culprits {len(rep.culprits)}, latent {len(rep.latent)}", "", "", "", ""])
    if memory and device.type == "cuda":
        rows.extend(memory_rows(w, targets, packages))
    return rows


def memory_rows(w: C.Workload, targets: tuple[str, ...], packages: dict[str, ModuleType]) -> list[list[str]]:
    """Peak extra device memory of report() against model copies + one set of reference activations."""
    args, kwargs = as_call(w.inputs)
    ref_copy = model_bytes(w.model)  # what a private FP32 reference copy holds
    copies = 0
    target_peaks = []
    for t in targets:
        runner = build(t, w.model, args, kwargs)
        copies += model_bytes(runner.module)
        target_peaks.append(f"{t} {C.peak_bytes(lambda: runner(*args, **kwargs), w.device) / 2**30:.2f}")
        del runner
    torch.cuda.empty_cache()
    acts = reference_set_bytes(w)
    forward_peak = C.peak_bytes(w.call, w.device)
    gib = 2**30
    rows = [[w.name, "one set of reference activations", f"{acts / gib:.2f} GiB", "", "",
             f"target copies {copies / gib:.2f} GiB ({len(targets)}), a reference copy {ref_copy / gib:.2f} GiB, "
             f"forward peaks: fp32 {forward_peak / gib:.2f}, {', '.join(target_peaks)} GiB (on its own copy)"]]
    for label, package in packages.items():
        torch.cuda.empty_cache()
        peak = C.peak_bytes(lambda: package.report(w.model, w.inputs, targets=targets), w.device)
        # this checkout runs an FP32 eval model as its own reference; the baseline copies it
        made = copies + (ref_copy if label == "baseline" else 0)
        bound = made + acts
        rows.append([w.name, f"peak extra memory [{label}]", f"{peak / gib:.2f} GiB", f"{peak / bound:.2f}x bound", "",
                     f"bound = copies it makes {made / gib:.2f} + activations {acts / gib:.2f} = {bound / gib:.2f} GiB"])
    return rows


def comparison_rows(device: torch.device) -> list[list[str]]:
    """Host time per comparison (error vector) and per summary, the paths report() uses per leaf."""
    from torchprobe.metrics import _error_vector_eager, error_vector
    from torchprobe.stats import Summarizer

    summarize = Summarizer()
    rows = []
    for n in (65536, 16 << 20):
        r = torch.randn(n, device=device)
        t = (r * 1.001).half()
        reps = 200 if n < 1 << 20 else 20
        for label, fn in (("error_vector", lambda: error_vector(r, t)), ("error_vector eager formula", lambda: _error_vector_eager(r, t)),
                          ("summary (stats) of the test", lambda: summarize(t))):
            for _ in range(3):
                fn()
            C.synchronize(device)
            clock = C.clock_for(device)
            t0 = clock()
            for _ in range(reps):
                fn()
            C.synchronize(device)
            us = (clock() - t0) / reps * 1e6
            rows.append([f"{n} elements", label, f"{us / 1e3:.3f}", "", "", f"{us:.1f} us per call ({reps} calls back to back)"])
    return rows


def llama(device: str = "cuda", seq: int = 1024, hidden: int = 2048, layers: int = 16) -> C.Workload:
    """A Llama-style decoder with random weights: hidden 2048, 16 layers, 16 heads, MLP 4096,
    vocabulary 32000, untied head (0.80B parameters); batch 1, ``seq`` tokens, default cache on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=2 * hidden, vocab_size=32000, max_position_embeddings=max(seq, 2048))
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
    params = sum(p.numel() for p in model.parameters())
    return Workload(f"Llama {params / 1e9:.2f}B s{seq}", model, {"input_ids": ids})


Workload = C.Workload


def vit_tiny(device: str = "cpu") -> C.Workload:
    """ViT-B/16's module structure (12 blocks) at hidden 64 on 17 tokens: a host-bound stand-in
    for a GPU forward, where the time per module call is mostly Python and dispatch."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8)
    return Workload("ViT 12L-64 b2 (host-bound)", ViTModel(config).to(device).eval(), torch.randn(2, 3, 32, 32, device=device))


def main(argv: list[str] | None = None) -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--baseline", help="a directory holding another checkout's torchprobe package")
    parser.add_argument("--models", nargs="+", help="cpu: cnn bert llama-tiny; cuda: resnet vit llama")
    parser.add_argument("--reps", type=int, help="samples of the floor (report() gets a third of them, at least 3)")
    args, device = C.setup(parser, argv)
    reps, warmup = (6, 1) if args.quick else (15, 2)
    reps = args.reps or reps
    makers: dict[str, Callable[[], C.Workload]]
    if device.type == "cpu":
        makers = {"cnn": lambda: C.small_cnn("cpu"), "bert": lambda: C.small_bert("cpu"),
                  "llama-tiny": lambda: llama("cpu", seq=128, hidden=256, layers=2), "vit-tiny": vit_tiny}
        default = ["cnn", "bert"]
    else:
        makers = {"resnet": lambda: C.resnet50("cuda", batch=16, autocast=None),
                  "vit": lambda: C.vit_base("cuda", batch=8, autocast=None),
                  "llama": lambda: llama("cuda")}
        default = ["resnet", "vit", "llama"]
    packages = {"this": tp}
    if args.baseline:
        packages["baseline"] = load_baseline(args.baseline)
    targets = tuple(args.targets)
    rows = []
    for key in args.models or default:
        w = makers[key]()
        big = key == "llama"
        rows.extend(measure(w, targets, 3 if big else reps, 1 if big else warmup, packages, memory=big))
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.extend(comparison_rows(device))
    print(f"{C.environment(device)}; targets {', '.join(targets)}; medians of {C.clock_name(device)}")
    print(tabulate(rows, headers=["model", "what", "ms", "x floor", "FP32 fwds", "notes"], disable_numparse=True,
                   colalign=("left", "left", "right", "right", "right", "left")))


if __name__ == "__main__":
    main()
