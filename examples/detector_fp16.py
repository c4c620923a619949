"""The founding story, end to end: a detector whose TensorRT FP16 boxes drift.

    python examples/detector_fp16.py

1. report(): PyTorch FP16 and autocast agree with FP32; the TensorRT-like strict-onnx:fp16 target (the ONNX parser path)
   diverges, and the culprit is named in the model's own module names, with the reason.
2. bisect(): the smallest set of modules to keep in FP32, measured end to end.
3. The fix applied and verified under eager FP16 and torch.compile (inductor), and printed as
   Torch-TensorRT code for the deployment machine.
"""
import torch

import torchprobe as tp
from torchprobe.models.detector import build_detector

model, images = build_detector()

rep = tp.report(model, images, targets=("autocast:fp16", "eager:fp16", "strict-onnx:fp16"))
print(rep)
print("top culprit:", rep.culprits[0])

fix = tp.bisect(model, images, target="strict-onnx:fp16", tol=1e-2)
print(fix)
assert fix, "no verified fix"

reference = model(images)
fixed = fix.apply(model)  # FP16 weights, the culprit kept in FP32; `model` is untouched
boxes = fixed(images.half())["boxes"].float()
print(f"eager fp16 with the fix: boxes rel_l2 {tp.measure(reference['boxes'], boxes).rel_l2:.2e}")

compiled = tp.targets.build("inductor:fp16", model, (images,), {}, keep_fp32=fix.keep_fp32)
print(f"inductor fp16 with the fix: boxes rel_l2 {tp.measure(reference['boxes'], compiled(images)['boxes']).rel_l2:.2e}")

print(fix.snippet("tensorrt"))
rep.to_html("detector_report.html")
print("wrote detector_report.html")
