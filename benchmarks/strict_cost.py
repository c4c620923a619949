"""What the ``strict`` emulation costs: its forward against ``eager:fp16`` on the same model.

    python benchmarks/strict_cost.py --device cpu     # BERT 4L-256 b8 s128, ViT 4L-192 b8 64x64
    python benchmarks/strict_cost.py --device cuda    # BERT 4L-256 b8 s128, ViT-B/16 b8 224x224

Each target runs on its own prepared copy (``torchprobe.targets.build``, outside the timing): the
copy cast to FP16, inputs cast, outputs cast back, as report() and bisect() run it. ``eager:fp16``
is PyTorch's own FP16 forward; ``strict:fp16`` the same copy under the Torch-TensorRT profile (one
TorchFunctionMode, composite rules and the overflow checks); ``strict-onnx:fp16`` the ONNX parser
path. Medians of interleaved samples (``_common.interleaved``); the ratio is against
``eager:fp16`` from the same run. On the CPU, strict computes matmuls and convolutions in FP32
from the FP16 inputs (what PyTorch's CPU FP16 kernels compute, one rounding), which is faster than
PyTorch's FP16 GEMM there; on CUDA they run natively. Takes about 20 s on CUDA, a few minutes on
a loaded 2-vCPU machine (``--quick``: fewer samples).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from torchprobe.targets import build  # noqa: E402
from torchprobe.tree import as_call  # noqa: E402

TARGETS = ("fp32", "eager:fp16", "strict:fp16", "strict-onnx:fp16")


def small_vit(device: str, batch: int = 8, base: bool = False) -> C.Workload:
    """A transformers ViT: ViT-B/16 at 224x224 (``base``), else 4 layers of width 192 at 64x64."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig() if base else ViTConfig(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                               intermediate_size=768, image_size=64, patch_size=8)
    model = ViTModel(config, add_pooling_layer=False).to(device).eval()
    size = config.image_size
    name = f"ViT-B/16 b{batch} {size}x{size}" if base else f"ViT 4L-192 b{batch} {size}x{size}"
    return C.Workload(name, model, {"pixel_values": torch.randn(batch, 3, size, size, device=device)})


def measure(w: C.Workload, targets: tuple[str, ...], reps: int, warmup: int) -> list[list[str]]:
    args, kwargs = as_call(w.inputs)
    runners = {t: build(t, w.model, args, kwargs) for t in targets}
    variants = [C.Variant(t, (lambda r=r: r(*args, **kwargs))) for t, r in runners.items()]
    C.interleaved(variants, w.device, reps, warmup)
    eager = next(v for v in variants if v.name == "eager:fp16").median
    return [[w.name, v.name, f"{v.median * 1e3:.1f}", f"{v.median / eager:.2f}x"] for v in variants]


def main(argv: list[str] | None = None) -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), help="eager:fp16 must be one of them")
    args, device = C.setup(parser, argv)
    reps, warmup = (5, 1) if args.quick else (15, 2)
    if device.type == "cpu":
        workloads = [C.small_bert("cpu"), small_vit("cpu")]
    else:
        workloads = [C.small_bert("cuda"), small_vit("cuda", base=True)]
    rows = [row for w in workloads for row in measure(w, tuple(args.targets), reps, warmup)]
    print(f"{C.environment(device)}; medians of {reps} interleaved samples of {C.clock_name(device)}")
    print(tabulate(rows, headers=["model", "target", "forward ms", "vs eager:fp16"], disable_numparse=True,
                   colalign=("left", "left", "right", "right")))


if __name__ == "__main__":
    main()
