"""``strict``: a runnable stand-in for a TensorRT FP16/BF16 engine, and the overflow evidence it yields.

PyTorch hides the overflows a TensorRT FP16 engine hits: its FP16 ``layer_norm`` computes the
variance in FP32, and autocast runs ``layer_norm``/``softmax`` in FP32 outright. A TensorRT engine
built from an ONNX export (opset < 17) with FP16 enabled sees ``ReduceMean, Sub, Pow, ReduceMean,
Add, Sqrt, Div, Mul, Add`` instead, and may store every one of those results in FP16, so
``(x - mean)**2`` overflows 65504 as soon as ``|x - mean|`` passes ~256. ``strict`` runs the
module that way, on any device.

What it models
    * Composite ops, decomposed as the TorchScript ONNX exporter (opset < 17) writes them, with
      **every primitive's result stored in the dtype** (no FP32 upcast between primitives):
      ``layer_norm``, ``group_norm`` and ``instance_norm`` (ReduceMean, Sub, Pow, ReduceMean,
      Add eps, Sqrt, Div, Mul weight, Add bias); ``rms_norm`` (Pow, ReduceMean, Add, Sqrt, Div, Mul);
      inference ``batch_norm`` as TensorRT's scale layer (``x*scale + shift``, the scale and shift
      folded in FP32 at build time, then stored in the dtype); ``softmax``/``log_softmax``
      (ReduceMax, Sub, Exp, ReduceSum, Div / Log, Sub); ``gelu`` (``x*(1+erf(x/sqrt2))*0.5``, and
      the tanh form with ``x*x*x``); ``var``/``std`` (ReduceMean, Sub, Mul, ReduceMean, times
      N/(N-correction), Sqrt); ``torch.norm``/``Tensor.norm``/``linalg.vector_norm`` (2-norm as
      Mul, ReduceSum, Sqrt; 1, inf and general p too); ``F.normalize`` (norm, Clip at eps, Div);
      ``scaled_dot_product_attention`` (MatMul q@k^T, Mul scale, Add mask, softmax as above,
      MatMul; bool/float masks, ``is_causal``, ``scale``, ``enable_gqa``; the scale is applied
      after the first matmul, as Torch-TensorRT's attention converter does).
    * Constants of a decomposition (eps, GELU coefficients, the attention scale) are rounded to
      the dtype, like engine weights: an ``eps`` of 1e-12 becomes 0 in FP16.
    * Reductions (ReduceMean, ReduceSum) accumulate in FP32 and store their result in the dtype.
    * Matmul, linear, conv (aten ``mm, addmm, bmm, baddbmm, addbmm, mv, addmv, dot, vdot,
      convolution``) take dtype inputs and accumulate in FP32, like tensor cores: computed in
      FP32, the output rounded once to the dtype (bias included, as a fused epilogue).
    * ``fused_norms=True``: ``layer_norm``/``group_norm``/``instance_norm``/``batch_norm``/
      ``rms_norm`` stay whole, computed in FP32 with the output rounded to the dtype (TensorRT's
      INormalizationLayer, which ONNX LayerNormalization from opset 17 maps to).
    * Overflow evidence: each primitive above (and each matmul/conv) counts the Inf/NaN values
      it produced in calls whose inputs were all finite, and the largest ``|input|`` of those
      calls, on the device; :meth:`StrictEvents.events` reads them with one host sync. So the
      primitive where Inf first appears is named, not the ones that inherit it. A mask Add that
      yields ``-inf`` is a mask doing its job, not an overflow. Cost per checked primitive: one
      ``abs().amax()`` per input and one comparison and count over the output.

What it does not model
    * The graph is an FP32 export built with FP16 enabled (or the same primitives typed FP16):
      the Cast to FP32 that the TorchScript exporter puts around the variance of an FP16
      model's ``layer_norm`` is not modeled.
    * Kernel-level choices of a real engine: layer fusion beyond the norm layers, FP16
      accumulation in tactics that allow it, reduced-precision reductions, Myelin's own
      rewrites, tactic-dependent rounding, INT8/FP8. It is an upper bound on what FP16 storage
      can do to the composites above, not a bit-exact copy of any engine.
    * Ops outside the list run as PyTorch runs them in the dtype (elementwise ops already store
      their result in the dtype; other composites keep PyTorch's internal FP32).
    * Training-mode ``batch_norm``/``instance_norm`` with running statistics, attention dropout,
      ``softmax(dtype=...)`` with a different dtype, nuclear/matrix norms, ``out=`` arguments:
      these run as PyTorch runs them.
    * Tensors of another dtype (FP32 kept submodules, FP64) are never touched, so a module kept
      in FP32 gives bit-identical results to a plain FP32 run.

How: a :class:`~torch.overrides.TorchFunctionMode` replaces the composite functions at the
Python API level (``F.layer_norm``, ``Tensor.softmax``, ...), where the signatures are clean and
module hooks keep firing, and a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees
the aten matmul/conv ops that every ``@``, ``F.linear``, ``einsum`` and conv funnels into. An
active function mode turns off the fused fast paths of ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer``; ``F.multi_head_attention_forward`` is re-entered with the mode
on (``torch.overrides.redispatch_function``, present in torch 2.13) so the softmax or attention
inside it is decomposed too; where torch lacks it, that function runs as PyTorch runs it.

Example::

    >>> _ = torch.manual_seed(0)
    >>> ln = nn.LayerNorm(64).half()
    >>> x = (torch.randn(4, 64) * 1000).half()           # |x| up to ~3400
    >>> with strict_mode(torch.float16) as ev:
    ...     y = ln(x)                                     # PyTorch's own FP16 ln(x) is fine
    >>> [str(e) for e in ev.events()]
    ['layer_norm: (x-mean)^2 overflowed FP16 (204 values, input absmax 3318)']
    >>> y[0, :3]                                  # (x-mean)/inf = 0: every value becomes the bias
    tensor([0., 0., 0.], dtype=torch.float16, grad_fn=<SliceBackward0>)
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from ..errors import InvalidArgument
from .base import LOW_PRECISION, Backend, dtype_name

__all__ = ["OverflowEvent", "StrictBackend", "StrictCall", "StrictEvents", "strict_mode"]

STRICT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_redispatch = getattr(torch.overrides, "redispatch_function", None)  # absent in older torch


# --------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class OverflowEvent:
    """Inf/NaN values one primitive produced in calls whose inputs were all finite, summed."""

    op: str  # "<composite>/<primitive>", e.g. "layer_norm/pow"
    what: str  # the value that broke, e.g. "(x-mean)^2"
    count: int  # new non-finite values
    input_absmax: float  # largest |input| among the calls that produced them
    dtype: torch.dtype

    def __str__(self) -> str:
        composite = self.op.rsplit("/", 1)[0]
        return (
            f"{composite}: {self.what} overflowed {dtype_name(self.dtype).upper()} "
            f"({self.count} values, input absmax {self.input_absmax:.4g})"
        )


class StrictEvents:
    """What one :func:`strict_mode` block saw: overflow counters (on the device until read)
    and, host side, how many calls of each composite were decomposed (``decomposed``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.decomposed: Counter[str] = Counter()
        self._what: dict[str, str] = {}
        self._acc: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}

    def _add(self, op: str, what: str, new: Tensor, absmax: Tensor) -> None:
        """Accumulate ``new`` (0-dim count) and ``absmax`` (0-dim) for ``op``; no host sync."""
        hit = torch.where(new > 0, absmax, torch.zeros_like(absmax))
        key = (op, new.device)
        self._what.setdefault(op, what)
        if key in self._acc:
            count, peak = self._acc[key]
            self._acc[key] = (count + new, torch.maximum(peak, hit))
        else:
            self._acc[key] = (new, hit)

    def events(self) -> list[OverflowEvent]:
        """Ops that produced Inf/NaN from finite inputs, in order of first call (one sync per device)."""
        by_device: dict[torch.device, list[tuple[str, Tensor, Tensor]]] = defaultdict(list)
        for (op, device), (count, peak) in self._acc.items():
            if type(count) is not Tensor:  # a DTensor model: this rank's counts (torchprobe.distributed)
                from ..distributed import local_view

                count, peak = local_view(count)[0], local_view(peak)[0]
            by_device[device].append((op, count, peak))
        totals: dict[str, tuple[int, float]] = {op: (0, 0.0) for op, _ in self._acc}
        for rows in by_device.values():
            counts = torch.stack([c for _, c, _ in rows]).tolist()
            peaks = torch.stack([p for _, _, p in rows]).tolist()
            for (op, _, _), c, p in zip(rows, counts, peaks):
                totals[op] = (totals[op][0] + int(c), max(totals[op][1], p))
        return [
            OverflowEvent(op, self._what[op], c, p, self.dtype) for op, (c, p) in totals.items() if c
        ]


def _input_peak(tensors: list[Tensor], device: torch.device) -> Tensor:
    """max |x| over the inputs; NaN or Inf as soon as one input value is not finite."""
    peaks = [
        t.abs().amax().float()
        for t in tensors
        if t.numel() and t.device == device and t.is_floating_point()
    ]
    return torch.stack(peaks).amax() if peaks else torch.zeros((), device=device)


class _Ops:
    """The primitives of one composite call: every result stored in ``dtype`` and checked."""

    def __init__(self, events: StrictEvents, composite: str, dtype: torch.dtype, fused: bool) -> None:
        self.events, self.composite, self.dtype, self.fused = events, composite, dtype, fused

    def nested(self, composite: str) -> _Ops:
        return _Ops(self.events, f"{self.composite}/{composite}", self.dtype, self.fused)

    def const(self, value: float) -> float:
        """A constant as the engine stores it: rounded to the dtype."""
        return torch.tensor(value, dtype=self.dtype).item()

    def ew(self, name: str, fn: Callable[..., Tensor], *operands: Any, what: str | None = None,
           neg_inf_ok: bool = False) -> Tensor:
        tensors = [t for t in operands if isinstance(t, Tensor)]
        return self.store(name, fn(*operands), tensors, what, neg_inf_ok)

    def reduce(self, name: str, kind: str, x: Tensor, dims: tuple[int, ...],
               what: str | None = None) -> Tensor:
        """ReduceMean/ReduceSum accumulate in FP32, stored in the dtype; ReduceMax/Min are exact."""
        if kind in ("amax", "amin"):
            return getattr(torch, kind)(x, dims, keepdim=True)
        return self.store(name, getattr(torch, kind)(x, dims, keepdim=True, dtype=torch.float32), [x], what)

    def matmul(self, name: str, a: Tensor, b: Tensor, what: str) -> Tensor:
        return self.store(name, torch.matmul(a.float(), b.float()), [a, b], what)

    def fused_call(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        tensors = [a for a in args if isinstance(a, Tensor)]
        upcast = [a.float() if isinstance(a, Tensor) and a.dtype == self.dtype else a for a in args]
        return self.store("fused", fn(*upcast), tensors, "output")

    def store(self, name: str, value: Tensor, inputs: list[Tensor], what: str | None = None,
              neg_inf_ok: bool = False) -> Tensor:
        """Round ``value`` to the dtype; when every input was finite, count the non-finite outputs
        (``neg_inf_ok``: only NaN and +Inf, for mask additions)."""
        out = value.to(self.dtype)
        if out.numel():
            kept = out < math.inf if neg_inf_ok else out.abs() < math.inf
            peak = _input_peak(inputs, out.device)
            new = torch.where(torch.isfinite(peak), out.numel() - torch.count_nonzero(kept), 0)
            self.events._add(f"{self.composite}/{name}", what or name, new, peak)
        return out


# --------------------------------------------------------------------------- decompositions
# Each rule takes the composite's own signature after ``ops`` and returns NotImplemented for
# the cases it does not model; those run as PyTorch runs them.


def _dims(x: Tensor, dim: Any) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.dim()))
    return (dim,) if isinstance(dim, int) else tuple(dim)


def _last_dims(normalized_shape: Any) -> tuple[int, ...]:
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    return tuple(range(-n, 0))


def _per_channel(v: Tensor | None, x: Tensor) -> Tensor | None:
    return None if v is None else v.reshape(-1, *([1] * (x.dim() - 2)))


def _standardize(ops: _Ops, x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    mean = ops.reduce("mean", "mean", x, dims)
    d = ops.ew("sub", torch.sub, x, mean, what="x-mean")
    var = ops.reduce("var", "mean", ops.ew("pow", torch.pow, d, 2, what="(x-mean)^2"), dims,
                     what="mean((x-mean)^2)")
    std = ops.ew("sqrt", torch.sqrt, ops.ew("add_eps", torch.add, var, ops.const(eps), what="var+eps"))
    return ops.ew("div", torch.div, d, std, what="(x-mean)/std")


def _affine(ops: _Ops, y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        y = ops.ew("mul_weight", torch.mul, y, weight, what="y*weight")
    if bias is not None:
        y = ops.ew("add_bias", torch.add, y, bias, what="y*weight+bias")
    return y


def _layer_norm(ops, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if ops.fused:
        return ops.fused_call(F.layer_norm, input, normalized_shape, weight, bias, eps)
    return _affine(ops, _standardize(ops, input, _last_dims(normalized_shape), eps), weight, bias)


def _group_norm(ops, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    if ops.fused:
        return ops.fused_call(F.group_norm, input, num_groups, weight, bias, eps)
    grouped = input.reshape(input.shape[0], num_groups, -1)
    y = _standardize(ops, grouped, (-1,), eps).reshape(input.shape)
    return _affine(ops, y, _per_channel(weight, input), _per_channel(bias, input))


def _fold_batch_norm(mean, var, weight, bias, eps) -> tuple[Tensor, Tensor]:
    """Inference BatchNorm as TensorRT's scale layer: scale and shift folded in FP32."""
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
    if ops.fused:
        return ops.fused_call(F.batch_norm, input, running_mean, running_var, weight, bias, False,
                              momentum, eps)
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
    return _group_norm(ops, input, input.shape[1], weight, bias, eps)


def _rms_norm(ops, input, normalized_shape, weight=None, eps=None):
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    if ops.fused:
        return ops.fused_call(F.rms_norm, input, normalized_shape, weight, eps)
    ms = ops.reduce("mean", "mean", ops.ew("pow", torch.pow, input, 2, what="x^2"),
                    _last_dims(normalized_shape), what="mean(x^2)")
    rms = ops.ew("sqrt", torch.sqrt, ops.ew("add_eps", torch.add, ms, ops.const(eps), what="mean(x^2)+eps"))
    return _affine(ops, ops.ew("div", torch.div, input, rms, what="x/rms"), weight, None)


def _softmax(ops: _Ops, x: Tensor, dim: Any, dtype: torch.dtype | None, log: bool) -> Tensor:
    if not isinstance(dim, int) or dtype not in (None, x.dtype):
        return NotImplemented
    m = ops.reduce("max", "amax", x, (dim,))
    d = ops.ew("sub", torch.sub, x, m, what="x-max")
    e = ops.ew("exp", torch.exp, d, what="exp(x-max)")
    s = ops.reduce("sum", "sum", e, (dim,), what="sum(exp)")
    if log:
        log_sum = ops.ew("log", torch.log, s, what="log(sum)")
        return ops.ew("sub_log", torch.sub, d, log_sum, what="x-max-log(sum)")
    return ops.ew("div", torch.div, e, s, what="exp/sum")


def _softmax_rules(log: bool) -> tuple[Callable, Callable]:
    """(torch.softmax / Tensor.softmax form, F.softmax form) of softmax or log_softmax."""

    def torch_form(ops, input, dim, dtype=None):
        return _softmax(ops, input, dim, dtype, log)

    def functional_form(ops, input, dim=None, _stacklevel=3, dtype=None):
        return _softmax(ops, input, dim, dtype, log)

    return torch_form, functional_form


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
    if dropout_p > 0 or (is_causal and attn_mask is not None):
        return NotImplemented
    if enable_gqa:
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = ops.matmul("qk", query, key.transpose(-2, -1), what="q@k^T")
    scores = ops.ew("scale", torch.mul, scores, ops.const(scale), what="q@k^T*scale")
    bias = _attn_bias(attn_mask, is_causal, scores)
    if bias is not None:
        scores = ops.ew("mask_add", torch.add, scores, bias, what="scores+mask", neg_inf_ok=True)
    weights = _softmax(ops.nested("softmax"), scores, -1, None, log=False)
    return ops.matmul("pv", weights, value, what="softmax@v")


_softmax_t, _softmax_f = _softmax_rules(log=False)
_log_softmax_t, _log_softmax_f = _softmax_rules(log=True)
_var_t, _std_t = _var_rule(sqrt=False), _var_rule(sqrt=True)

_RULES: dict[Callable, tuple[str, Callable]] = {
    F.layer_norm: ("layer_norm", _layer_norm),
    torch.layer_norm: ("layer_norm", _layer_norm),
    F.group_norm: ("group_norm", _group_norm),
    torch.group_norm: ("group_norm", _group_norm),
    F.batch_norm: ("batch_norm", _batch_norm),
    F.instance_norm: ("instance_norm", _instance_norm),
    F.rms_norm: ("rms_norm", _rms_norm),
    torch.rms_norm: ("rms_norm", _rms_norm),
    F.softmax: ("softmax", _softmax_f),
    torch.softmax: ("softmax", _softmax_t),
    Tensor.softmax: ("softmax", _softmax_t),
    torch.special.softmax: ("softmax", _softmax_t),
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
# Python composites whose insides must stay visible to the mode.
_TRANSPARENT = frozenset({F.multi_head_attention_forward, F.softmin})

_ACCUMULATE_FP32 = {
    torch.ops.aten.mm.default: "matmul",
    torch.ops.aten.addmm.default: "matmul",
    torch.ops.aten.bmm.default: "matmul",
    torch.ops.aten.baddbmm.default: "matmul",
    torch.ops.aten.addbmm.default: "matmul",
    torch.ops.aten.mv.default: "matmul",
    torch.ops.aten.addmv.default: "matmul",
    torch.ops.aten.dot.default: "matmul",
    torch.ops.aten.vdot.default: "matmul",
    torch.ops.aten.convolution.default: "conv",
}


# --------------------------------------------------------------------------- modes


class _Decompose(TorchFunctionMode):
    """Replaces composite functions whose main input has the emulated dtype."""

    def __init__(self, events: StrictEvents, dtype: torch.dtype, fused_norms: bool) -> None:
        super().__init__()
        self.events, self.dtype, self.fused_norms = events, dtype, fused_norms

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _RULES.get(func)
        if entry is not None and self._applies(args, kwargs):
            composite, rule = entry
            out = rule(_Ops(self.events, composite, self.dtype, self.fused_norms), *args, **kwargs)
            if out is not NotImplemented:
                self.events.decomposed[composite] += 1
                return out
        if func in _TRANSPARENT and _redispatch is not None:
            with self:
                return _redispatch(func, types, args, kwargs)
        return func(*args, **kwargs)

    def _applies(self, args: tuple, kwargs: dict) -> bool:
        main = args[0] if args else next(iter(kwargs.values()), None)
        return isinstance(main, Tensor) and main.dtype == self.dtype and main.dim() > 0 and main.numel() > 0


class _AccumulateFP32(TorchDispatchMode):
    """Runs aten matmul/conv ops with dtype inputs in FP32 and rounds the output once."""

    def __init__(self, events: StrictEvents, dtype: torch.dtype) -> None:
        super().__init__()
        self.events, self.dtype = events, dtype

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _ACCUMULATE_FP32.get(func)
        if kind is None:
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if not any(t.dtype == self.dtype for t in tensors):
            return func(*args, **kwargs)
        args32, kwargs32 = tree_map_only(Tensor, self._upcast, (args, kwargs))
        ops = _Ops(self.events, kind, self.dtype, fused=False)
        return ops.store(func.overloadpacket.__name__, func(*args32, **kwargs32), tensors, "output")

    def _upcast(self, t: Tensor) -> Tensor:
        return t.float() if t.dtype == self.dtype else t


@contextlib.contextmanager
def strict_mode(dtype: torch.dtype, fused_norms: bool = False) -> Iterator[StrictEvents]:
    """Run the block as a TensorRT ``dtype`` engine would (see the module docstring).

    Yields the :class:`StrictEvents` of the block; read ``events()`` after it. ``fused_norms``
    keeps the normalization layers whole, in FP32 (ONNX opset >= 17). ``torch.float32`` runs
    the block untouched.
    """
    if dtype not in STRICT_DTYPES:
        valid = ", ".join(dtype_name(d) for d in STRICT_DTYPES)
        raise InvalidArgument(
            f"strict_mode: dtype {dtype_name(dtype)} is not emulated; valid dtypes: {valid} "
            "(fp32 runs untouched; use torch.float16 or torch.bfloat16 to emulate an engine)"
        )
    events = StrictEvents(dtype)
    if dtype not in LOW_PRECISION:
        yield events
        return
    with _AccumulateFP32(events, dtype), _Decompose(events, dtype, fused_norms):
        yield events


# --------------------------------------------------------------------------- backend


class StrictCall:
    """``module`` run under :func:`strict_mode`; ``events`` holds the latest call's evidence."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, fused_norms: bool) -> None:
        self.module, self.dtype, self.fused_norms = module, dtype, fused_norms
        self.events: StrictEvents | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with strict_mode(self.dtype, self.fused_norms) as events:
            self.events = events
            return self.module(*args, **kwargs)


class StrictBackend(Backend):
    """``strict:fp16`` / ``strict:bf16``: the runnable stand-in for a TensorRT engine.

    ``fused_norms=True`` models an opset >= 17 export, whose normalization layers TensorRT
    keeps whole and computes in FP32.
    """

    name = "strict"
    cast_weights = True

    def __init__(self, fused_norms: bool = False) -> None:
        self.fused_norms = fused_norms

    def wrap(self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]) -> StrictCall:
        return StrictCall(module, dtype, self.fused_norms)
