"""``strict``: a runnable stand-in for a Torch-TensorRT FP16/BF16 engine, and the overflow evidence it yields.

What ``strict:fp16`` computes is what Torch-TensorRT 2.11-2.14 builds from a ``.half()`` module:
``torch.export``, Torch-TensorRT's decomposition table, one converter per remaining aten op, and a
strongly typed TensorRT network whose precision follows the tensor dtypes. Most composite ops
become *one* TensorRT layer; the rest of the graph is converted op by op, each result stored in
the dtype. Every rule below is a row of :mod:`torchprobe.targets.rules` with its source file and,
where TensorRT's documentation is silent, the way the emulation errs (docs/rules.md renders the
table).

What it models (the ``strict`` profile)
    * ``layer_norm``: one INormalizationLayer, computed in FP32 and rounded once (PyTorch's own
      FP16 ``layer_norm`` computes exactly that). ``norm_fp32=False`` is the pessimistic reading
      (FP16 inside: ``(x - mean)**2`` stored in the dtype), since TensorRT 11 no longer documents the
      normalization's compute precision.
    * ``group_norm`` and ``instance_norm`` (decomposed to ``group_norm(C)``): the normalization as
      above without the affine, then ``* weight`` and ``+ bias`` as two dtype elementwise layers.
    * inference ``batch_norm``: the converter folds ``scale = weight / sqrt(running_var + eps)`` and
      ``shift = bias - running_mean * scale`` with torch arithmetic on the parameters (their dtype),
      then one IScaleLayer ``x * scale + shift`` (rounded once).
    * ``softmax`` and ``gelu``: single layers (FP32 inside, output rounded), as PyTorch runs them.
    * ``log_softmax``: decomposed to ``log(softmax(x))`` in the dtype: a probability below FP16's
      smallest subnormal (6e-8) becomes 0 and ``log`` gives ``-inf``, where PyTorch stays finite.
    * ``scaled_dot_product_attention``: Q pre-scaled in the dtype (``q * scale``, or
      ``q / sqrt(D)`` with ``sqrt(D)`` rounded to the dtype), then one attention layer (FP32 scores).
    * ``var``/``std``/``vector_norm``/``normalize``: upcast to FP32 by the decompositions, i.e. as
      PyTorch computes them in FP16 (only the result is stored in the dtype).
    * ``rms_norm``: FP32 where the installed torch decomposes ``_fused_rms_norm`` by its FP32
      composite (torch >= 2.13); FP16 primitives (``x*x, mean, +eps, 1/sqrt, *``) where
      Torch-TensorRT's ``replace_fused_rms_norm`` pass lowers it (torch 2.11).
    * ``rsqrt`` -> ``1 / sqrt(x)`` and ``silu`` -> ``x * sigmoid(x)``: two dtype layers each.
    * matmul, linear, conv: dtype inputs and output, FP32 accumulation (as PyTorch's FP16
      kernels do: TensorRT does not document its accumulation with ``use_fp32_acc=False``, the
      default, so this errs optimistic). ``fp32_acc=True`` is Torch-TensorRT's ``use_fp32_acc``:
      FP16 matmuls computed in FP32 and cast back, linear's bias added after that cast.
    * Everything else runs as PyTorch runs it in the dtype: elementwise results are stored in the
      dtype, so a norm written in primitive ops (``(x - u).pow(2).mean(-1)``) overflows as it does
      in a real engine (TensorRT warns about FP16 Pow/Reduce but does not upcast).
    * Constants the engine stores (eps, the attention scale) are rounded to the dtype.

Overflow evidence
    The composites above count, on the device, the Inf/NaN values each of their steps produced
    from finite inputs. Outside them, every arithmetic primitive that can create Inf/NaN from
    finite inputs (add, mul, div, pow, exp, log, sums, matmul, conv, casts to the dtype, ...)
    records ``aminmax`` of its inputs and output, one reduction each: :meth:`StrictEvents.events`
    reads everything with one host sync and names the op whose output went non-finite while its
    inputs were finite, so the primitive where Inf first appears is named, not the ones that
    inherit it. Parameters are not measured (they are the engine's weights).

How: one :class:`~torch.overrides.TorchFunctionMode` at the Python API level (``F.group_norm``,
``Tensor.log_softmax``, ``Tensor.__add__``, ``F.linear`` ...), where module hooks keep firing; no
dispatch mode. Python composites of ``torch.nn.functional`` without a rule (``normalize``,
``multi_head_attention_forward``, ...) are re-entered with the mode on
(``torch.overrides.redispatch_function``, torch >= 2.13), so the ops inside them are seen. On the
CPU, matmuls and convolutions take dtype inputs, compute in FP32 and round once (what PyTorch's
CPU FP16 kernels compute, several times faster here); on CUDA they run natively.

Example::

    >>> _ = torch.manual_seed(0)
    >>> ln = nn.LayerNorm(64).half()
    >>> x = (torch.randn(4, 64) * 1000).half()           # |x| up to ~3400
    >>> with strict_mode(torch.float16) as ev:
    ...     y = ln(x)                                     # one normalization layer: fine
    ...     u = x.mean(-1, keepdim=True)
    ...     z = (x - u).pow(2).mean(-1)                   # the same norm written in primitives
    >>> [str(e) for e in ev.events()]
    ['pow: output overflowed FP16 (in 1 call, input absmax 3318)']
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

from ..errors import InvalidArgument
from .base import LOW_PRECISION, Backend, dtype_name

__all__ = ["OverflowEvent", "StrictBackend", "StrictCall", "StrictEvents", "strict_mode", "fused_rms_norm_is_fp32"]

STRICT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_redispatch = getattr(torch.overrides, "redispatch_function", None)  # absent in older torch


# --------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class OverflowEvent:
    """Inf/NaN values one op produced in calls whose inputs were all finite, summed.

    ``count`` counts values for the steps of a composite (``unit="values"``) and calls for a
    primitive op (``unit="calls"``), whose check reads only each tensor's min and max.
    """

    op: str  # "<composite>/<step>", e.g. "log_softmax/log", or a primitive, e.g. "pow"
    what: str  # the value that broke, e.g. "(x-mean)^2"
    count: int
    input_absmax: float  # largest |input| among the calls that produced them
    dtype: torch.dtype
    unit: str = "values"
    verb: str = "overflowed"  # "went to -Inf in" for a log of values that are 0 in the dtype

    def __str__(self) -> str:
        composite = self.op.rsplit("/", 1)[0]
        how = f"{self.count} values" if self.unit == "values" else f"in {self.count} call{'s' if self.count != 1 else ''}"
        return (f"{composite}: {self.what} {self.verb} {dtype_name(self.dtype).upper()} "
                f"({how}, input absmax {self.input_absmax:.4g})")


class StrictEvents:
    """What one :func:`strict_mode` block saw: overflow counters (on the device until read) and,
    host side, how many calls of each composite a rule computed (``decomposed``)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.decomposed: Counter[str] = Counter()
        self._what: dict[str, str] = {}
        self._verb: dict[str, str] = {}
        self._acc: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = {}
        self._calls: list[tuple[str, tuple[Tensor, ...], tuple[Tensor, ...]]] = []

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

    def _call(self, op: str, what: str, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...],
              verb: str = "overflowed") -> None:
        """One primitive call: ``aminmax`` halves of its inputs and of its output, unread."""
        self._what.setdefault(op, what)
        self._verb.setdefault(op, verb)
        self._calls.append((op, inputs, output))

    def events(self) -> list[OverflowEvent]:
        """Ops that produced Inf/NaN from finite inputs, in order of first call (one sync per device)."""
        totals: dict[str, list] = {}  # op -> [count, peak, unit]
        by_device: dict[torch.device, list[tuple[str, Tensor, Tensor]]] = defaultdict(list)
        for (op, device), (count, peak) in self._acc.items():
            if type(count) is not Tensor:  # a DTensor model: this rank's counts (torchprobe.distributed)
                from ..distributed import local_view

                count, peak = local_view(count)[0], local_view(peak)[0]
            by_device[device].append((op, count, peak))
        order: list[str] = [op for op, _ in self._acc]
        for rows in by_device.values():
            counts = torch.stack([c for _, c, _ in rows]).tolist()
            peaks = torch.stack([p for _, _, p in rows]).tolist()
            for (op, _, _), c, p in zip(rows, counts, peaks):
                entry = totals.setdefault(op, [0, 0.0, "values"])
                entry[0] += int(c)
                entry[1] = max(entry[1], p)
        for op, peak in self._read_calls():
            order.append(op)
            entry = totals.setdefault(op, [0, 0.0, "calls"])
            entry[0] += 1
            entry[1] = max(entry[1], peak)
        seen = dict.fromkeys(order)
        return [OverflowEvent(op, self._what[op], totals[op][0], totals[op][1], self.dtype, totals[op][2],
                              self._verb.get(op, "overflowed"))
                for op in seen if op in totals and totals[op][0]]

    def _read_calls(self) -> list[tuple[str, float]]:
        """(op, input absmax) for every primitive call whose output went non-finite from finite inputs."""
        if not self._calls:
            return []
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        slots = []
        for _, inputs, output in self._calls:
            refs = []
            for t in (*inputs, *output):
                if type(t) is not Tensor:  # a DTensor model: this rank's values (torchprobe.distributed)
                    from ..distributed import local_view

                    t = local_view(t)[0]
                group = groups[(t.device, t.dtype)]
                refs.append(((t.device, t.dtype), len(group)))
                group.append(t)
            slots.append(refs)
        values = {key: torch.stack(ts).tolist() for key, ts in groups.items()}
        hits = []
        for (op, inputs, _), refs in zip(self._calls, slots):
            got = [values[key][i] for key, i in refs]
            ins, outs = got[: len(inputs)], got[len(inputs):]
            if all(math.isfinite(v) for v in ins) and not all(math.isfinite(v) for v in outs):
                hits.append((op, max((abs(v) for v in ins), default=0.0)))
        return hits


def aminmax_halves(tensors: list[Tensor]) -> tuple[Tensor, ...]:
    """min and max of each floating, non-empty, non-parameter tensor (one reduction each)."""
    halves: list[Tensor] = []
    for t in tensors:
        if t.is_floating_point() and t.numel() and not isinstance(t, nn.Parameter):
            halves.extend(torch.aminmax(t))
    return tuple(halves)


def _input_peak(tensors: list[Tensor], device: torch.device) -> Tensor:
    """max |x| over the inputs; NaN or Inf as soon as one input value is not finite."""
    peaks = [
        t.abs().amax().float()
        for t in tensors
        if t.numel() and t.device == device and t.is_floating_point()
    ]
    return torch.stack(peaks).amax() if peaks else torch.zeros((), device=device)


class _Ops:
    """The steps of one composite call: each result stored in ``dtype`` and checked."""

    def __init__(self, events: StrictEvents, composite: str, dtype: torch.dtype, options: Any) -> None:
        self.events, self.composite, self.dtype, self.options = events, composite, dtype, options

    def nested(self, composite: str) -> _Ops:
        return _Ops(self.events, f"{self.composite}/{composite}", self.dtype, self.options)

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

    def step(self, name: str, fn: Callable[..., Tensor], *operands: Any, what: str | None = None,
             verb: str = "overflowed", inputs: list[Tensor] | None = None) -> Tensor:
        """One dtype layer ``fn(*operands)``, checked cheaply (``aminmax`` of inputs and output)."""
        tensors = [t for t in operands if isinstance(t, Tensor)] if inputs is None else inputs
        measured = aminmax_halves(tensors)
        out = fn(*operands)
        if out.numel():
            self.events._call(f"{self.composite}/{name}", what or name, measured, tuple(torch.aminmax(out)), verb)
        return out

    def matmul(self, name: str, a: Tensor, b: Tensor, what: str) -> Tensor:
        return self.store(name, torch.matmul(a.float(), b.float()), [a, b], what)

    def fused_call(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """``fn`` computed in FP32 on the dtype inputs, the output rounded once."""
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


# --------------------------------------------------------------------------- shared helpers


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
    """(x - mean) / sqrt(var + eps) with every step stored in the dtype (ReduceMean, Sub, Pow,
    ReduceMean, Add, Sqrt, Div)."""
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


def _group_stats_shape(x: Tensor, groups: int) -> tuple[Tensor, tuple[int, ...]]:
    return x.reshape(x.shape[0], groups, -1), (2,)


def _group_standardize(ops: _Ops, x: Tensor, groups: int, eps: float) -> Tensor:
    g, dims = _group_stats_shape(x, groups)
    return _standardize(ops, g, dims, eps).reshape(x.shape)


def fused_rms_norm_is_fp32() -> bool:
    """True where this torch decomposes ``aten._fused_rms_norm`` by its FP32 composite (torch
    >= 2.13: the op has a CompositeImplicitAutograd kernel, which Torch-TensorRT's decomposition
    table applies); False where the op reaches Torch-TensorRT's ``replace_fused_rms_norm`` pass,
    which lowers it to dtype primitives (torch 2.11)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_rms_norm", "CompositeImplicitAutograd"))
    except RuntimeError:  # no such op: rms_norm itself is a composite that computes in FP32
        return True


# --------------------------------------------------------------------------- strict rules
# Each rule takes the composite's own signature after ``ops`` and returns NotImplemented for the
# cases it does not model; those run as PyTorch runs them. Sources: rules.py.


@dataclass(frozen=True)
class StrictOptions:
    """The two readings the sources leave open (see the module docstring)."""

    norm_fp32: bool = True
    fp32_acc: bool = False


def _layer_norm(ops, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if ops.options.norm_fp32:
        return NotImplemented  # PyTorch's FP16 layer_norm: FP32 inside, rounded once
    y = _standardize(ops, input, _last_dims(normalized_shape), eps)
    return _affine(ops, y, weight, bias)


def _group_norm(ops, input, num_groups, weight=None, bias=None, eps=1e-5):
    if input.dim() < 3:
        return NotImplemented
    if ops.options.norm_fp32:
        y = torch.group_norm(input, num_groups, None, None, eps)  # normalization, weight 1, bias 0
    else:
        y = _group_standardize(ops, input, num_groups, eps)
    # then the affine as two dtype elementwise layers
    if weight is not None:
        y = ops.step("mul_weight", torch.mul, y, _per_channel(weight, input), what="y*weight")
    if bias is not None:
        y = ops.step("add_bias", torch.add, y, _per_channel(bias, input), what="y*weight+bias")
    return y


def _fold_batch_norm(ops, input, running_mean, running_var, weight, bias, eps):
    """The converter's ``batch_norm_constant_folding``: torch arithmetic on the parameters."""
    channels = input.shape[1]
    weight = torch.ones(channels, device=input.device) if weight is None else weight
    bias = torch.zeros(channels, device=input.device) if bias is None else bias
    scale = weight / torch.sqrt(running_var + eps)
    shift = bias - running_mean * scale
    return scale.to(ops.dtype), shift.to(ops.dtype)


def _batch_norm(ops, input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    if training or running_mean is None or running_var is None or input.dim() < 2:
        return NotImplemented
    scale, shift = _fold_batch_norm(ops, input, running_mean, running_var, weight, bias, eps)
    scale, shift = _per_channel(scale, input), _per_channel(shift, input)
    # IScaleLayer (CHANNEL): x * scale + shift in one layer, rounded once
    return ops.step("scale", lambda: torch.addcmul(shift.float(), input.float(), scale.float()).to(ops.dtype),
                    what="x*scale+shift", inputs=[input])


def _instance_norm(ops, input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    # Torch-TensorRT's instance_norm decomposition: group_norm(C), or batch_norm without input stats
    if not use_input_stats:
        return _batch_norm(ops, input, running_mean, running_var, weight, bias, False, momentum, eps)
    if running_mean is not None:  # would update running statistics
        return NotImplemented
    return _group_norm(ops, input, input.shape[1], weight, bias, eps)


def _log_softmax(ops, input, dim, dtype):
    if not isinstance(dim, int) or input.dim() == 0:
        return NotImplemented
    x = input if dtype is None else input.to(dtype)
    p = torch.softmax(x, dim)  # ISoftMaxLayer: FP32 inside, rounded
    # IUnaryLayer LOG in the dtype: probabilities that rounded to 0 give -inf
    return ops.step("log", torch.log, p, what="log(softmax(x))", verb="went to -Inf in", inputs=[x])


def _log_softmax_t(ops, input, dim, dtype=None):
    return _log_softmax(ops, input, dim, dtype)


def _log_softmax_f(ops, input, dim=None, _stacklevel=3, dtype=None):
    return _log_softmax(ops, input, dim, dtype)


def _sdpa(ops, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if dropout_p > 0 or query.dim() < 2:
        return NotImplemented
    if scale is None:  # query / sqrt(D), sqrt(D) cast to the query's dtype
        q = ops.step("scaled_query", torch.div, query, ops.const(math.sqrt(query.size(-1))), what="q/sqrt(D)")
    else:
        q = ops.step("scaled_query", torch.mul, query, ops.const(scale), what="q*scale")
    # IAttention: Q.K^T, mask, softmax and .V in one layer (FP32 scores, as PyTorch's fused kernels)
    return ops.step("attention",
                    lambda: F.scaled_dot_product_attention(q, key, value, attn_mask, 0.0, is_causal, scale=1.0,
                                                           enable_gqa=enable_gqa),
                    what="attention output", inputs=[q, key, value])


def _rms_norm(ops, input, normalized_shape, weight=None, eps=None):
    if fused_rms_norm_is_fp32():
        return NotImplemented  # torch's composite: FP32 inside, rounded once
    # replace_fused_rms_norm: x*x, mean, + eps (1e-5 when None), rsqrt -> 1/sqrt, x*, *weight
    eps = 1e-5 if eps is None else eps
    sq = ops.ew("mul", torch.mul, input, input, what="x*x")
    ms = ops.reduce("mean", "mean", sq, _last_dims(normalized_shape), what="mean(x*x)")
    s = ops.ew("sqrt", torch.sqrt, ops.ew("add_eps", torch.add, ms, ops.const(eps), what="mean(x*x)+eps"))
    y = ops.ew("mul_x", torch.mul, input, ops.ew("reciprocal", torch.div, 1.0, s, what="1/sqrt"), what="x*rsqrt")
    return y if weight is None else ops.ew("mul_weight", torch.mul, y, weight, what="y*weight")


def _rsqrt(ops, input):
    # rsqrt -> reciprocal(sqrt) -> div(1, .): two dtype layers
    s = ops.step("sqrt", torch.sqrt, input, what="sqrt(x)")
    return ops.step("reciprocal", torch.div, 1.0, s, what="1/sqrt(x)", inputs=[s])


def _silu(ops, input, inplace=False):
    sig = ops.step("sigmoid", torch.sigmoid, input, what="sigmoid(x)")
    out = ops.step("mul", torch.mul, input, sig, what="x*sigmoid(x)")
    return input.copy_(out) if inplace else out


# --------------------------------------------------------------------------- matmul and conv


def _tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensor arguments, one level of list/tuple deep (einsum, cat)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(t for t in a if isinstance(t, Tensor))
    return found


def _upcast_arg(a: Any, dtype: torch.dtype) -> Any:
    if isinstance(a, Tensor):
        return a.float() if a.dtype == dtype else a
    if isinstance(a, (list, tuple)) and any(isinstance(t, Tensor) for t in a):
        return type(a)(_upcast_arg(t, dtype) for t in a)
    return a


def upcast_call(func: Callable, args: tuple, kwargs: dict, dtype: torch.dtype) -> Any:
    """``func`` computed in FP32 from the ``dtype`` inputs; FP32 outputs rounded to ``dtype``."""
    out = func(*[_upcast_arg(a, dtype) for a in args], **{k: _upcast_arg(v, dtype) for k, v in kwargs.items()})
    if isinstance(out, Tensor) and out.dtype == torch.float32:
        return out.to(dtype)
    return out


def _linear_fp32_acc(args: tuple, kwargs: dict, dtype: torch.dtype) -> Tensor:
    """``use_fp32_acc``: the matmul cast to FP32 and back, then the bias as a dtype elementwise add."""
    given = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
    bias = given.get("bias")
    out = upcast_call(F.linear, (given["input"], given["weight"]), {}, dtype)
    return out if bias is None else out + bias


# --------------------------------------------------------------------------- the mode


def _get(owner: Any, *names: str) -> list[Callable]:
    return [getattr(owner, n) for n in names if getattr(owner, n, None) is not None]


def _checked_primitives() -> dict[Callable, str]:
    """Torch functions that can turn finite inputs into Inf/NaN, by the name the evidence uses."""
    T, tt, sp, la = Tensor, torch, torch.special, torch.linalg
    groups = {
        "add": _get(tt, "add") + _get(T, "add", "add_", "__add__", "__radd__", "__iadd__"),
        "sub": _get(tt, "sub", "subtract", "rsub") + _get(T, "sub", "sub_", "__sub__", "__rsub__", "__isub__"),
        "mul": _get(tt, "mul", "multiply") + _get(T, "mul", "mul_", "__mul__", "__rmul__", "__imul__"),
        "div": _get(tt, "div", "divide", "true_divide") + _get(T, "div", "div_", "true_divide", "__truediv__",
                                                              "__rtruediv__", "__itruediv__", "__rdiv__", "__div__"),
        "pow": _get(tt, "pow") + _get(T, "pow", "pow_", "__pow__", "__rpow__", "__ipow__"),
        "square": _get(tt, "square") + _get(T, "square", "square_"),
        "exp": _get(tt, "exp", "exp2", "expm1", "sinh", "cosh") + _get(T, "exp", "exp_", "expm1", "sinh", "cosh")
        + _get(sp, "exp2", "expm1"),
        "log": _get(tt, "log", "log2", "log10") + _get(T, "log", "log_", "log2", "log10"),
        "reciprocal": _get(tt, "reciprocal") + _get(T, "reciprocal", "reciprocal_"),
        "sum": _get(tt, "sum", "nansum", "cumsum", "prod", "cumprod") + _get(T, "sum", "nansum", "cumsum", "prod", "cumprod"),
        "addcmul": _get(tt, "addcmul", "addcdiv", "lerp") + _get(T, "addcmul", "addcdiv", "lerp"),
        "var": _get(tt, "var", "std", "var_mean", "std_mean") + _get(T, "var", "std"),
        "vector_norm": _get(la, "vector_norm", "norm") + _get(tt, "norm") + _get(T, "norm"),
        "cast": _get(T, "to", "half", "bfloat16", "type_as", "type"),
    }
    return {f: name for name, fs in groups.items() for f in fs}


_MATMUL = (_get(torch, "matmul", "mm", "bmm", "mv", "dot", "einsum", "baddbmm", "addmm", "addbmm", "tensordot",
                "inner", "outer")
           + _get(Tensor, "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "dot", "baddbmm", "addmm")
           + _get(F, "bilinear"))
_CONV = (_get(F, "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
         + _get(torch, "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
_KIND: dict[Callable, str] = {**{f: "matmul" for f in _MATMUL}, **{f: "conv" for f in _CONV}, F.linear: "linear"}
_CHECKED = _checked_primitives()
_WHAT = {"cast": "value cast to the dtype", "log": "log output"}


def _cast_target(func: Callable, args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype a cast (``Tensor.to/half/bfloat16/type_as/type``) produces, when it says so."""
    if func is Tensor.half:
        return torch.float16
    if func is Tensor.bfloat16:
        return torch.bfloat16
    for a in (*args[1:], kwargs.get("dtype"), kwargs.get("other")):
        if isinstance(a, torch.dtype):
            return a
        if isinstance(a, Tensor) and func is not Tensor.to:
            return a.dtype
    return None


_STRICT_RULES: dict[Callable, tuple[str, Callable]] = {
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
    F.scaled_dot_product_attention: ("scaled_dot_product_attention", _sdpa),
    torch.rsqrt: ("rsqrt", _rsqrt),
    Tensor.rsqrt: ("rsqrt", _rsqrt),
    F.silu: ("silu", _silu),
}


class EngineMode(TorchFunctionMode):
    """Replaces composites by their engine rule and checks the primitives that can overflow.

    ``rules`` maps torch functions to ``(composite, rule)``. ``upcast_matmul``/``upcast_conv`` say
    where matmuls and convolutions compute in FP32 from dtype inputs (``"always"``, or ``"cpu"``:
    there only, natively elsewhere); ``linear_fp32_acc`` adds linear's bias after the FP32 matmul
    is rounded (Torch-TensorRT's ``use_fp32_acc``).
    """

    def __init__(self, events: StrictEvents, dtype: torch.dtype, rules: dict, options: Any,
                 upcast_matmul: str, upcast_conv: str, linear_fp32_acc: bool = False) -> None:
        super().__init__()
        self.events, self.dtype, self.rules, self.options = events, dtype, rules, options
        self.upcast_matmul, self.upcast_conv, self.linear_fp32_acc = upcast_matmul, upcast_conv, linear_fp32_acc

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = self.rules.get(func)
        if entry is not None and self._main_has_dtype(args, kwargs):
            composite, rule = entry
            out = rule(_Ops(self.events, composite, self.dtype, self.options), *args, **kwargs)
            if out is not NotImplemented:
                self.events.decomposed[composite] += 1
                return out
        kind = _KIND.get(func)
        if kind is not None:
            return self._matmul(func, kind, args, kwargs)
        name = _CHECKED.get(func)
        if name is not None:
            return self._checked(func, name, args, kwargs)
        if _redispatch is not None and entry is None and getattr(func, "__module__", None) == "torch.nn.functional":
            with self:  # a Python composite: let the mode see the ops inside it
                return _redispatch(func, types, args, kwargs)
        return func(*args, **kwargs)

    # -- helpers ---------------------------------------------------------------------------
    def _main_has_dtype(self, args: tuple, kwargs: dict) -> bool:
        main = args[0] if args else next(iter(kwargs.values()), None)
        return isinstance(main, Tensor) and main.dtype == self.dtype and main.dim() > 0 and main.numel() > 0

    def _checked(self, func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
        tensors = _tensors(args, kwargs)
        if name == "cast":
            source = tensors[0] if tensors else None
            involved = (source is not None and source.is_floating_point() and source.dtype != self.dtype
                        and _cast_target(func, args, kwargs) == self.dtype)
        else:
            involved = any(t.dtype == self.dtype for t in tensors)
        if not involved:
            return func(*args, **kwargs)
        inputs = aminmax_halves(tensors[:1] if name == "cast" else tensors)  # before: in-place ops overwrite
        out = func(*args, **kwargs)
        self._record(name, out, inputs)
        return out

    def _record(self, name: str, out: Any, inputs: tuple[Tensor, ...]) -> None:
        outs = [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)] if isinstance(out, tuple) else []
        halves = tuple(h for t in outs if t.dtype == self.dtype and t.numel() for h in torch.aminmax(t))
        if halves:
            self.events._call(name, _WHAT.get(name, "output"), inputs, halves)

    def _matmul(self, func: Callable, kind: str, args: tuple, kwargs: dict) -> Any:
        tensors = _tensors(args, kwargs)
        if not any(t.dtype == self.dtype for t in tensors):
            return func(*args, **kwargs)
        inputs = aminmax_halves(tensors)
        policy = self.upcast_conv if kind == "conv" else self.upcast_matmul
        if kind == "linear" and self.linear_fp32_acc:
            out = _linear_fp32_acc(args, kwargs, self.dtype)
        elif policy == "always" or (policy == "cpu" and tensors[0].device.type == "cpu"):
            out = upcast_call(func, args, kwargs, self.dtype)
        else:
            out = func(*args, **kwargs)
        self._record("conv" if kind == "conv" else "matmul", out, inputs)
        return out


@contextlib.contextmanager
def strict_mode(dtype: torch.dtype, *, norm_fp32: bool = True, fp32_acc: bool = False) -> Iterator[StrictEvents]:
    """Run the block as a Torch-TensorRT ``dtype`` engine would (see the module docstring).

    Yields the :class:`StrictEvents` of the block; read ``events()`` after it. ``norm_fp32=False``
    computes normalizations in the dtype (the pessimistic reading of TensorRT 11);
    ``fp32_acc=True`` is Torch-TensorRT's ``use_fp32_acc`` (FP16 only). ``torch.float32`` runs the
    block untouched.
    """
    _check_dtype(dtype)
    events = StrictEvents(dtype)
    if dtype not in LOW_PRECISION:
        yield events
        return
    options = StrictOptions(norm_fp32=norm_fp32, fp32_acc=fp32_acc)
    acc = fp32_acc and dtype == torch.float16  # the converter casts FP16 matmuls only
    with EngineMode(events, dtype, _STRICT_RULES, options, upcast_matmul="always" if acc else "cpu",
                    upcast_conv="cpu", linear_fp32_acc=acc):
        yield events


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in STRICT_DTYPES:
        valid = ", ".join(dtype_name(d) for d in STRICT_DTYPES)
        raise InvalidArgument(
            f"strict_mode: dtype {dtype_name(dtype)} is not emulated; valid dtypes: {valid} "
            "(fp32 runs untouched; use torch.float16 or torch.bfloat16 to emulate an engine)"
        )


# --------------------------------------------------------------------------- backend


class StrictCall:
    """``module`` run under ``mode``; ``events`` holds the latest call's evidence."""

    def __init__(self, module: nn.Module, mode: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.module, self._mode = module, mode
        self.events: StrictEvents | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._mode() as events:
            self.events = events
            return self.module(*args, **kwargs)


class StrictBackend(Backend):
    """``strict:fp16`` / ``strict:bf16``: the runnable stand-in for a Torch-TensorRT engine.

    ``norm_fp32`` (default True: TensorRT 10's documented FP32 compute precision of
    INormalizationLayer) and ``fp32_acc`` (default False: Torch-TensorRT's ``use_fp32_acc``
    default) are the readings the sources leave open; see :func:`strict_mode`.
    """

    name = "strict"
    cast_weights = True

    def __init__(self, *, norm_fp32: bool = True, fp32_acc: bool = False) -> None:
        self.norm_fp32, self.fp32_acc = norm_fp32, fp32_acc

    def describe(self) -> str:
        norm = "FP32 inside" if self.norm_fp32 else "FP16 inside (pessimistic)"
        return (f"Torch-TensorRT 2.11-2.14 profile: normalization layers {norm}, "
                f"use_fp32_acc={self.fp32_acc}, rms_norm {'FP32' if fused_rms_norm_is_fp32() else 'dtype primitives'} "
                f"(torch {torch.__version__.split('+')[0]})")

    def wrap(self, module: nn.Module, dtype: torch.dtype, args: tuple, kwargs: dict[str, Any]) -> StrictCall:
        return StrictCall(module, lambda: strict_mode(dtype, norm_fp32=self.norm_fp32, fp32_acc=self.fp32_acc))
