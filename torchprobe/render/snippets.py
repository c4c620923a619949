"""The fix as code to paste: autocast regions, a cast model, or Torch-TensorRT settings."""
from __future__ import annotations


from ..targets import parse_target
from ..targets.base import dtype_name

_TORCH_DTYPE = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}

_KEEP_FP32_HELPER = """\
import torch
from torchprobe.targets.plan import keep_fp32  # picklable hooks: the model survives deepcopy and torch.save
"""


_ONNX_SNIPPET = """
# The ONNX -> TensorRT parser path: export the model cast to {dtype} with the kept modules in FP32
# (their Casts are in the graph), then build strongly typed so TensorRT keeps those types:
#     trtexec --onnx=model.onnx --stronglyTyped --saveEngine=model.plan
# If the kept modules are LayerNorms, an export at opset_version >= 17 alone may do: LayerNormalization
# becomes one normalization layer computed in FP32.
KEEP_FP32 = {keep!r}
model = keep_fp32(model, KEEP_FP32, dtype={dtype})  # in place: the rest cast to {dtype}
torch.onnx.export(model, tuple(x.to({dtype}) for x in inputs), "model.onnx", opset_version=17, dynamo=False)
"""


def _header(fix: "Fix") -> str:
    return (f"# torchprobe fix for {fix.target}: keep {len(fix.keep_fp32)} module(s) in FP32\n"
            f"# measured: final {fix.metric} {fix.error_before:.3g} -> {fix.error_after:.3g} (tol {fix.tol:.3g}), "
            f"{fix.evaluations} evaluations\n")


def fix_snippet(fix: "Fix", target: str | None = None) -> str:
    """Code applying ``fix`` for ``target``'s backend (default: the fix's own; strict -> tensorrt)."""
    dtype = dtype_name(parse_target(fix.target).dtype)
    if target and ":" not in target:
        target = f"{target}:{dtype}"
    spec = parse_target(target or fix.target)
    keep = list(fix.keep_fp32)
    torch_dtype = _TORCH_DTYPE[dtype]
    if spec.backend in ("tensorrt", "strict"):
        from ..targets.tensorrt import tensorrt_snippet

        return _header(fix) + tensorrt_snippet(keep, parse_target(fix.target).dtype)
    if spec.backend == "strict-onnx":
        return _header(fix) + _KEEP_FP32_HELPER + _ONNX_SNIPPET.format(keep=keep, dtype=torch_dtype)
    if spec.backend == "autocast":
        return _header(fix) + _KEEP_FP32_HELPER + (
            f"\nKEEP_FP32 = {keep!r}\n"
            f'model = keep_fp32(model, KEEP_FP32, autocast_device="cuda")  # in place; or "cpu"\n'
            f'with torch.autocast("cuda", dtype={torch_dtype}):\n'
            f"    output = model(*inputs)  # inputs: your model's example inputs\n")
    compile_line = "model = torch.compile(model)\n" if spec.backend == "inductor" else ""
    return _header(fix) + _KEEP_FP32_HELPER + (
        f"\nKEEP_FP32 = {keep!r}\n"
        f"model = keep_fp32(model, KEEP_FP32, dtype={torch_dtype})  # in place: the rest cast to {torch_dtype}\n"
        f"{compile_line}"
        f"output = model(*[x.to({torch_dtype}) for x in inputs])  # inputs: your model's example inputs\n")
