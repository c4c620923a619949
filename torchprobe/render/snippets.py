"""The fix as code to paste: autocast regions, a cast model, or Torch-TensorRT settings."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..targets import parse_target
from ..targets.base import dtype_name

if TYPE_CHECKING:
    from ..search import Fix

_TORCH_DTYPE = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}

_KEEP_FP32_HELPER = '''\
import functools

import torch
from torch.utils import _pytree as pytree


def _cast(obj, dtype):
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, obj)


def _enter_fp32(module, args, kwargs, autocast_device=None, stack=None):
    if autocast_device is not None:  # an autocast-disabled region, closed by _leave_fp32
        stack.append(torch.is_autocast_enabled(autocast_device))
        torch.set_autocast_enabled(autocast_device, False)
    return _cast(args, torch.float32), _cast(kwargs, torch.float32)


def _leave_fp32(module, args, kwargs, output, out_dtype=None, autocast_device=None, stack=None):
    if autocast_device is not None:
        torch.set_autocast_enabled(autocast_device, stack.pop())
    return output if out_dtype is None else _cast(output, out_dtype)


def keep_fp32(model, names, out_dtype=None, autocast_device=None):
    """Run the named submodules in FP32: forward hooks cast inputs up and outputs back to out_dtype.

    Hooks (module-level functions and functools.partial) keep the model picklable and
    deep-copyable; the output hook runs even when the module raises, so autocast is restored.
    """
    for name in names:
        module = model.get_submodule(name).float()
        stack = []
        module.register_forward_pre_hook(
            functools.partial(_enter_fp32, autocast_device=autocast_device, stack=stack), with_kwargs=True)
        module.register_forward_hook(
            functools.partial(_leave_fp32, out_dtype=out_dtype, autocast_device=autocast_device, stack=stack),
            with_kwargs=True, always_call=True)
    return model
'''


_ONNX_SNIPPET = """
# The ONNX -> TensorRT parser path: export the model cast to {dtype} with the kept modules in FP32
# (their Casts are in the graph), then build strongly typed so TensorRT keeps those types:
#     trtexec --onnx=model.onnx --stronglyTyped --saveEngine=model.plan
# If the kept modules are LayerNorms, an export at opset_version >= 17 alone may do: LayerNormalization
# becomes one normalization layer computed in FP32.
KEEP_FP32 = {keep!r}
model = keep_fp32(model.to({dtype}), KEEP_FP32, out_dtype={dtype})
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
            f'model = keep_fp32(model, KEEP_FP32, autocast_device="cuda")  # or "cpu"\n'
            f'with torch.autocast("cuda", dtype={torch_dtype}):\n'
            f"    output = model(*inputs)\n")
    compile_line = "model = torch.compile(model)\n" if spec.backend == "inductor" else ""
    return _header(fix) + _KEEP_FP32_HELPER + (
        f"\nKEEP_FP32 = {keep!r}\n"
        f"model = keep_fp32(model.to({torch_dtype}), KEEP_FP32, out_dtype={torch_dtype})\n"
        f"{compile_line}"
        f"output = model(*[x.to({torch_dtype}) for x in inputs])\n")
