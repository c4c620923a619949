"""``torchprobe demo``: the founding story on the built-in detector, end to end, on CPU.

The story's engine is the ONNX -> TensorRT parser path (an FP32 export below opset 17 built with
FP16 enabled), emulated by ``strict-onnx:fp16``: there ``nn.LayerNorm`` arrives as ReduceMean, Sub,
Pow, ... in FP16 and ``(x - mean)**2`` overflows. Torch-TensorRT 2.11-2.14 (``strict:fp16``)
builds the same LayerNorm as one normalization layer computed in FP32, so it is shown too: the
same model is fine there.

1. report(): PyTorch FP16, autocast and ``strict:fp16`` are fine, ``strict-onnx:fp16`` diverges,
   and the culprit is ``encoder.layers.1.norm2`` (overflow).
2. bisect(): the smallest keep-FP32 set for ``strict-onnx:fp16``, measured end to end.
3. The fixed plan verified again under ``eager:fp16``, and the code to paste (the ONNX export).
"""
from __future__ import annotations

import time

from .localize import report
from .models.detector import build_detector
from .search import bisect
from .targets import build
from .metrics import measure
from .render.text import summary_lines
from .tree import named_leaves

ENGINE = "strict-onnx:fp16"
TARGETS = ("autocast:fp16", "eager:fp16", "strict:fp16", ENGINE)


def main(quiet: bool = False) -> int:
    """Run the demo; returns 0 when the fix was found and verified."""
    say = (lambda *a: None) if quiet else print
    start = time.perf_counter()
    model, images = build_detector()
    say("torchprobe demo: a CNN + Transformer detector whose FFN grew after retraining,\n"
        "deployed through ONNX (opset < 17) -> TensorRT with FP16 enabled (target strict-onnx:fp16).\n")
    rep = report(model, images, targets=TARGETS, modules="encoder.*")
    say(rep)
    fix = bisect(model, images, target=ENGINE)
    say("\n" + str(fix))
    if quiet:  # the verdict lines alone
        print("\n".join(summary_lines(rep)))
        print(str(fix).splitlines()[0])
    verified = bool(fix)
    if verified:
        ref = build("fp32", model, (images,), {})(images)
        check = build("eager:fp16", model, (images,), {}, keep_fp32=fix.keep_fp32)(images)
        ref_leaves = dict(named_leaves(ref))
        worst = max(measure(ref_leaves[k], v).rel_l2 for k, v in named_leaves(check))
        say(f"\nSame plan under eager:fp16: final rel_l2 {worst:.3g}")
        say("\nThe fix as code for the ONNX -> TensorRT path:\n")
        say(fix.snippet())
        say("(Torch-TensorRT 2.11+, target strict:fp16, builds each LayerNorm as one FP32 normalization "
            "layer: it needs no fix; fix.snippet('tensorrt') prints its settings.)")
    say(f"\n(done in {time.perf_counter() - start:.1f} s)")
    return 0 if verified else 1
