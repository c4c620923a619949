"""``strict-onnx``: the ONNX -> TensorRT parser path, an FP32 export below opset 17 built with FP16 enabled.

This is the founding story's pipeline (``torch.onnx.export(..., opset_version=16)`` of the FP32
model, then ``trtexec --onnx=model.onnx --fp16`` on TensorRT <= 10, whose weak typing may run
every layer in FP16). Below opset 17 the TorchScript exporter writes ``layer_norm`` as
``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add``
(``torch/onnx/_internal/torchscript_exporter/symbolic_opset9.py``, ``native_layer_norm``), so
``(x - mean)**2`` overflows 65504 as soon as ``|x - mean|`` passes ~256. The other rules, each
from the exporter's symbolic and the TensorRT ONNX parser's importer (onnx/onnx-tensorrt
``onnxOpImporters.cpp``, 10.1), are rows of :mod:`torchprobe.targets.rules`:

* ``layer_norm``: the primitive chain above, every result stored in the dtype; ``fused_norms=True``
  is an opset >= 17 export (LayerNormalization -> one INormalizationLayer, compute precision FP32:
  the importer sets it from ``stash_type``).
* ``group_norm``: InstanceNormalization over ``[N, groups, -1]`` (-> INormalizationLayer, FP32
  compute by default) then ``Mul`` weight and ``Add`` bias in the dtype; ``instance_norm``:
  InstanceNormalization with its scale and bias, one layer.
* ``batch_norm``: BatchNormalization, folded in FP32 by the importer into a scale layer whose
  ``x*scale`` and ``+shift`` are stored in the dtype.
* ``rms_norm`` (Pow, ReduceMean, Add, Sqrt, Div, Mul), ``gelu`` below opset 20 (Div, Erf, Add,
  Mul, Mul; the tanh form with ``x*x*x``), ``var``/``std`` (ReduceMean, Sub, Mul, ReduceMean,
  times N/(N-correction), Sqrt), ``vector_norm`` (ReduceL2 = Mul, ReduceSum, Sqrt; L1, max, general
  p) and ``normalize`` (norm, Max eps, Div): primitive chains in the dtype.
* ``softmax``: one Softmax node -> ISoftMaxLayer (as PyTorch computes it); ``log_softmax``:
  LogSoftmax -> ISoftMax then IUnary LOG, so probabilities that round to 0 give ``-inf``.
* ``scaled_dot_product_attention`` (opset 14): ``q * sqrt(scale)``, ``k^T * sqrt(scale)``, MatMul,
  Add mask, Softmax, MatMul.
* Matmul, linear and conv: dtype inputs, FP32 accumulation, the output (bias included) rounded once.
* Constants (eps, GELU coefficients, the attention scale) are rounded to the dtype; every other op
  runs as PyTorch runs it in the dtype, with the primitive overflow checks of ``strict``.

Not modeled: the Casts to FP32 that the exporter puts around the variance of a ``.half()`` model's
``layer_norm`` (this path is the FP32 export built with ``--fp16``); kernel choices of a real
engine (fusion beyond the layers above, FP16 accumulation in tactics that allow it, Myelin's
rewrites). It is an upper bound on what FP16 storage does to the chains above.

Example::

    >>> _ = torch.manual_seed(0)
    >>> ln = nn.LayerNorm(64).half()
    >>> x = (torch.randn(4, 64) * 1000).half()           # |x| up to ~3400
    >>> with onnx_mode(torch.float16) as ev:
    ...     y = ln(x)                                     # PyTorch's own FP16 ln(x) is fine
    >>> [str(e) for e in ev.events()]
    ['layer_norm: (x-mean)^2 overflowed FP16 (204 values, input absmax 3318)']
    >>> y[0, :3]                                  # (x-mean)/inf = 0: every value becomes the bias
    tensor([0., 0., 0.], dtype=torch.float16, grad_fn=<SliceBackward0>)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LOW_PRECISION, Backend
from .strict import (
    EngineMode,
    StrictCall,
    StrictEvents,
    _affine,
    _check_dtype,
    _dims,
    _last_dims,
    _log_softmax_f,
    _log_softmax_t,
    _Ops,
    _per_channel,
    _standardize,
)

__all__ = ["StrictOnnxBackend", "onnx_mode"]


@dataclass(frozen=True)
class OnnxOptions:
    fused_norms: bool = False  # opset >= 17: LayerNormalization is one INormalizationLayer


def _layer_norm(ops, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if ops.options.fused_norms:
        return ops.fused_call(F.layer_norm, input, normalized_shape, weight, bias, eps)
    return _affine(ops, _standardize(ops, input, _last_dims(normalized_shape), eps), weight, bias)


def _group_norm(ops, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    if input.dim() < 3:
        return NotImplemented
    # InstanceNormalization over [N, groups, -1] (one INormalizationLayer, FP32 compute), then Mul, Add
    y = ops.fused_call(torch.group_norm, input, num_groups, None, None, eps)
    return _affine(ops, y, _per_channel(weight, input), _per_channel(bias, input))


def _fold_batch_norm(mean, var, weight, bias, eps) -> tuple[Tensor, Tensor]:
    """BatchNormalization as the importer folds it: scale and shift in FP32."""
    scale = torch.rsqrt(var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.float() * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def _batch_norm(ops, input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    if training or running_mean is None or running_var is None:
        return NotImplemented
    stats = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    scale32, shift32 = _fold_batch_norm(running_mean, running_var, weight, bias, eps)
    scale = ops.store("fold_scale", scale32, stats, "weight/sqrt(var+eps)")
    shift = ops.store("fold_shift", shift32, stats, "bias-mean*scale")
    y = ops.ew("mul_scale", torch.mul, input, _per_channel(scale, input), what="x*scale")
    return ops.ew("add_shift", torch.add, y, _per_channel(shift, input), what="x*scale+shift")


def _instance_norm(ops, input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats:
        return _batch_norm(ops, input, running_mean, running_var, weight, bias, False, momentum, eps)
    if running_mean is not None:  # would update running statistics
        return NotImplemented
    # InstanceNormalization with scale and bias: one normalization layer, FP32 compute
    return ops.fused_call(F.instance_norm, input, None, None, weight, bias, True, momentum, eps)


def _rms_norm(ops, input, normalized_shape, weight=None, eps=None):
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    if ops.options.fused_norms:
        return ops.fused_call(F.rms_norm, input, normalized_shape, weight, eps)
    ms = ops.reduce("mean", "mean", ops.ew("pow", torch.pow, input, 2, what="x^2"),
                    _last_dims(normalized_shape), what="mean(x^2)")
    rms = ops.ew("sqrt", torch.sqrt, ops.ew("add_eps", torch.add, ms, ops.const(eps), what="mean(x^2)+eps"))
    return _affine(ops, ops.ew("div", torch.div, input, rms, what="x/rms"), weight, None)


def _gelu(ops, input, approximate="none"):
    if approximate == "tanh":
        square = ops.ew("square", torch.mul, input, input, what="x*x")
        cube = ops.ew("cube", torch.mul, input, square, what="x^3")
        inner = ops.ew("add", torch.add, input, ops.ew("mul_kappa", torch.mul, cube, ops.const(0.044715)),
                       what="x+0.044715*x^3")
        inner = ops.ew("mul_beta", torch.mul, inner, ops.const(math.sqrt(2 / math.pi)))
        t = ops.ew("tanh", torch.tanh, inner)
    else:
        t = ops.ew("erf", torch.erf, ops.ew("div_sqrt2", torch.div, input, ops.const(math.sqrt(2))))
    scaled = ops.ew("mul_x", torch.mul, input, ops.ew("add_one", torch.add, t, 1.0), what="x*(1+t)")
    return ops.ew("mul_half", torch.mul, scaled, 0.5)


def _var(ops: _Ops, x: Tensor, dims: tuple[int, ...], correction: float, keepdim: bool, sqrt: bool) -> Tensor:
    n = math.prod(x.shape[d] for d in dims)
    mean = ops.reduce("mean", "mean", x, dims)
    d = ops.ew("sub", torch.sub, x, mean, what="x-mean")
    var = ops.reduce("var", "mean", ops.ew("square", torch.mul, d, d, what="(x-mean)^2"), dims,
                     what="mean((x-mean)^2)")
    if correction:
        var = ops.ew("mul_n", torch.mul, var, float(n), what="var*N")
        var = ops.ew("div_n", torch.div, var, float(n - correction), what="var*N/(N-correction)")
    if sqrt:
        var = ops.ew("sqrt", torch.sqrt, var)
    return var if keepdim else var.squeeze(dims)


def _var_rule(sqrt: bool) -> Callable:
    """torch.var/std and Tensor.var/std over their overloads:
    ``(dim, unbiased, keepdim)``, ``(unbiased)`` and ``(dim, *, correction, keepdim)``."""

    def rule(ops, input, *args, dim=None, unbiased=None, keepdim=False, correction=None):
        names = ("unbiased",) if args and isinstance(args[0], bool) else ("dim", "unbiased", "keepdim")
        given = {"dim": dim, "unbiased": unbiased, "keepdim": keepdim, **dict(zip(names, args))}
        if isinstance(given["dim"], str) or (isinstance(given["dim"], (list, tuple)) and
                                             any(isinstance(d, str) for d in given["dim"])):
            return NotImplemented
        if correction is None:
            correction = 0 if given["unbiased"] is False else 1
        return _var(ops, input, _dims(input, given["dim"]), correction, given["keepdim"], sqrt)

    return rule


def _vector_norm(ops: _Ops, x: Tensor, ord: float, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    if ord == 0:
        return NotImplemented
    if ord == 2:
        total = ops.reduce("sum", "sum", ops.ew("square", torch.mul, x, x, what="x^2"), dims, what="sum(x^2)")
        out = ops.ew("sqrt", torch.sqrt, total)
    elif math.isinf(ord):
        out = ops.reduce("max", "amax" if ord > 0 else "amin", x.abs(), dims)
    elif ord == 1:
        out = ops.reduce("sum", "sum", x.abs(), dims, what="sum|x|")
    else:
        powered = ops.ew("pow", torch.pow, x.abs(), ord, what=f"|x|^{ord:g}")
        total = ops.reduce("sum", "sum", powered, dims, what=f"sum|x|^{ord:g}")
        out = ops.ew("root", torch.pow, total, 1 / ord)
    return out if keepdim else out.squeeze(dims)


def _linalg_vector_norm(ops, x, ord=2, dim=None, keepdim=False, *, dtype=None, out=None):
    if out is not None or dtype not in (None, x.dtype):
        return NotImplemented
    return _vector_norm(ops, x, float(ord), _dims(x, dim), keepdim)


def _norm(ops, input, p="fro", dim=None, keepdim=False, out=None, dtype=None):
    """torch.norm: a vector norm unless ``p`` is 'nuc' or 'fro' over more than two dims."""
    frobenius = p is None or p == "fro"
    if out is not None or dtype not in (None, input.dtype) or (isinstance(p, str) and not frobenius):
        return NotImplemented
    if frobenius and isinstance(dim, (list, tuple)) and len(dim) > 2:
        return NotImplemented
    return _vector_norm(ops, input, 2.0 if frobenius else float(p), _dims(input, dim), keepdim)


def _tensor_norm(ops, input, p="fro", dim=None, keepdim=False, dtype=None):
    return _norm(ops, input, p, dim, keepdim, None, dtype)


def _normalize(ops, input, p=2.0, dim=1, eps=1e-12, out=None):
    if out is not None or float(p) == 0:
        return NotImplemented
    norm = _vector_norm(ops, input, float(p), _dims(input, dim), keepdim=True)
    denom = ops.ew("clamp_eps", torch.clamp_min, norm, ops.const(eps), what="max(norm, eps)")
    return ops.ew("div", torch.div, input, denom, what="x/norm")


def _attn_bias(mask: Tensor | None, is_causal: bool, scores: Tensor) -> Tensor | None:
    """The additive form of an attention mask: bool masks (True = attend) become 0/-inf."""
    if is_causal:
        length, source = scores.shape[-2:]
        mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(~mask, -math.inf)


def _sdpa(ops, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if dropout_p > 0 or (is_causal and attn_mask is not None) or enable_gqa:
        return NotImplemented  # the opset-14 symbolic refuses enable_gqa
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    root = ops.const(math.sqrt(scale))  # Mul(q, Sqrt(scale)), Mul(k^T, Sqrt(scale))
    q = ops.ew("scale_q", torch.mul, query, root, what="q*sqrt(scale)")
    kt = ops.ew("scale_k", torch.mul, key.transpose(-2, -1), root, what="k^T*sqrt(scale)")
    scores = ops.matmul("qk", q, kt, what="q@k^T")
    bias = _attn_bias(attn_mask, is_causal, scores)
    if bias is not None:
        scores = ops.ew("mask_add", torch.add, scores, bias, what="scores+mask", neg_inf_ok=True)
    weights = torch.softmax(scores, -1)  # Softmax -> ISoftMaxLayer
    if attn_mask is not None and attn_mask.dtype == torch.bool or is_causal:
        weights = torch.where(torch.isnan(weights), torch.zeros_like(weights), weights)  # Where(IsNaN, 0, w)
    return ops.matmul("pv", weights, value, what="softmax@v")


_var_t, _std_t = _var_rule(sqrt=False), _var_rule(sqrt=True)

_ONNX_RULES: dict[Callable, tuple[str, Callable]] = {
    F.layer_norm: ("layer_norm", _layer_norm),
    torch.layer_norm: ("layer_norm", _layer_norm),
    F.group_norm: ("group_norm", _group_norm),
    torch.group_norm: ("group_norm", _group_norm),
    F.batch_norm: ("batch_norm", _batch_norm),
    F.instance_norm: ("instance_norm", _instance_norm),
    F.rms_norm: ("rms_norm", _rms_norm),
    torch.rms_norm: ("rms_norm", _rms_norm),
    F.log_softmax: ("log_softmax", _log_softmax_f),
    torch.log_softmax: ("log_softmax", _log_softmax_t),
    Tensor.log_softmax: ("log_softmax", _log_softmax_t),
    torch.special.log_softmax: ("log_softmax", _log_softmax_t),
    F.gelu: ("gelu", _gelu),
    torch.var: ("var", _var_t),
    Tensor.var: ("var", _var_t),
    torch.std: ("std", _std_t),
    Tensor.std: ("std", _std_t),
    torch.norm: ("vector_norm", _norm),
    Tensor.norm: ("vector_norm", _tensor_norm),
    torch.linalg.vector_norm: ("vector_norm", _linalg_vector_norm),
    F.normalize: ("normalize", _normalize),
    F.scaled_dot_product_attention: ("scaled_dot_product_attention", _sdpa),
}


@contextlib.contextmanager
def onnx_mode(dtype: torch.dtype, fused_norms: bool = False) -> Iterator[StrictEvents]:
    """Run the block as an FP32 ONNX export (opset < 17) built with ``dtype`` enabled would run.

    Yields the :class:`~torchprobe.targets.strict.StrictEvents` of the block. ``fused_norms=True``
    models an opset >= 17 export (LayerNormalization as one FP32 normalization layer).
    ``torch.float32`` runs the block untouched.
    """
    _check_dtype(dtype)
    events = StrictEvents(dtype)
    if dtype not in LOW_PRECISION:
        yield events
        return
    with EngineMode(events, dtype, _ONNX_RULES, OnnxOptions(fused_norms), upcast_matmul="always", upcast_conv="always"):
        yield events


class StrictOnnxBackend(Backend):
    """``strict-onnx:fp16`` / ``strict-onnx:bf16``: the ONNX (opset < 17) -> TensorRT parser path.

    ``fused_norms=True`` models an opset >= 17 export, whose LayerNormalization TensorRT keeps
    whole and computes in FP32.
    """

    name = "strict-onnx"
    cast_weights = True

    def __init__(self, fused_norms: bool = False) -> None:
        self.fused_norms = fused_norms

    def describe(self) -> str:
        opset = "opset >= 17 (LayerNormalization fused)" if self.fused_norms else "opset < 17 (layer_norm as FP16 primitives)"
        return f"ONNX -> TensorRT parser profile: FP32 export, {opset}, built with FP16 enabled"

    def wrap(self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]) -> StrictCall:
        return StrictCall(module, lambda: onnx_mode(dtype, self.fused_norms))
