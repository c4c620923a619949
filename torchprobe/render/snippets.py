"""The fix as code to paste: autocast regions, a cast model, or Torch-TensorRT settings."""
from __future__ import annotations


from ..targets import parse_target
from ..targets.base import dtype_name

_TORCH_DTYPE = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}

_KEEP_FP32_HELPER = '''\
import torch
from torch.utils import _pytree as pytree


def _cast(obj, dtype):
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, obj)


def keep_fp32(model, names, out_dtype=None, autocast_device=None):
    """Run the named submodules in FP32: inputs cast up, outputs cast back to out_dtype."""
    for name in names:
        module = model.get_submodule(name).float()
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            args, kwargs = _cast((args, kwargs), torch.float32)
            if autocast_device is not None:
                with torch.autocast(autocast_device, enabled=False):
                    out = _inner(*args, **kwargs)
            else:
                out = _inner(*args, **kwargs)
            return out if out_dtype is None else _cast(out, out_dtype)

        module.forward = forward
    return model
'''


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
