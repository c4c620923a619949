"""explain(): which ops of each module reach the engine, in which dtype, and which rule computes them.

The module is cast to the target dtype (kept modules back to FP32), exported with
``torch.export``, and lowered the way the target's engine sees it: for ``strict`` (and
``tensorrt``) through Torch-TensorRT 2.14's decomposition table
(:func:`~torchprobe.targets.rules.trt_decomposition_table`); for ``strict-onnx`` the export's aten
ops as the TorchScript ONNX exporter's symbolics see them. Each op gets its row of
:mod:`~torchprobe.targets.rules` and its dtype, and the graph runs once more with every tensor in
FP32 ("shadow" values: the dtype graph's arithmetic without its rounding) so that each rule's
risky value is measured: the stored output, ``(x - mean)^2`` of a normalization computed in FP16,
the probabilities a ``log`` receives, ... An op whose risky value passes the dtype's range (or
whose ``log`` input rounds to 0) "may overflow"; the reader sees why a module is safe or not.

    >>> ex = tp.explain(model.encoder.layer[0], hidden, target="strict:fp16")
    >>> print(ex)                                  # per module: ops, dtype, rule, FP32 absmax, verdict
    >>> ex.risks                                   # the ops that may overflow
    >>> ex["output.LayerNorm"].ops[0].rule
    'layer_norm'
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from .errors import InvalidArgument, UnsupportedTarget
from .names import ROOT
from .targets import parse_target
from .targets.base import LOW_PRECISION, dtype_name
from .targets.plan import PrecisionPlan
from .targets.rules import Rule, remove_assert_nodes, rule_for, trt_decomposition_table
from .tree import as_call, cast_floating

__all__ = ["explain", "Explanation", "ModuleExplanation", "ExplainedOp"]

PROFILES = {"strict": "strict", "tensorrt": "strict", "strict-onnx": "strict-onnx"}
_SHORT = {  # PRECISIONS, as a table cell
    "fp32": "one layer, FP32 inside",
    "norm+dtype": "norm FP32, affine in dtype",
    "dtype": "stored in dtype",
    "matmul": "FP32 accumulation",
    "graph-fp32": "FP32 (graph casts)",
    "chain": "dtype primitives",
    "cast": "cast",
    "none": "no arithmetic",
}


@dataclass(frozen=True)
class ExplainedOp:
    """One op that reaches the engine.

    ``dtype`` is the tensor dtype the op computes in; ``rule`` the row of
    :mod:`~torchprobe.targets.rules` (``None`` when no row covers the op); ``computed`` how it is
    computed; ``absmax`` the largest FP32 shadow value of its output; ``peak``/``peak_what`` the
    rule's risky intermediate; ``risk`` why it may overflow (``None``: it does not); ``note``
    more about a safe op (e.g. "would overflow if FP16 inside").
    """

    module: str
    node: str
    op: str
    dtype: str
    rule: str | None
    computed: str
    absmax: float | None
    peak: float | None = None
    peak_what: str = ""
    risk: str | None = None
    note: str = ""
    arithmetic: bool = True


@dataclass(frozen=True)
class ModuleExplanation:
    """The ops of one module (innermost ``nn.Module`` of each op), in graph order."""

    module: str
    module_type: str
    ops: tuple[ExplainedOp, ...]

    @property
    def risks(self) -> tuple[ExplainedOp, ...]:
        return tuple(o for o in self.ops if o.risk)

    def count(self, dtype: str) -> int:
        """Ops computing in ``dtype`` (casts not counted)."""
        return sum(1 for o in self.ops if o.arithmetic and o.rule != "cast" and o.dtype == dtype)


@dataclass(frozen=True)
class Explanation:
    """What ``target``'s engine computes for a module, op by op in graph order; ``str()`` renders it."""

    target: str
    profile: str
    model: str
    ops: tuple[ExplainedOp, ...]
    module_types: tuple[tuple[str, str], ...] = ()

    @property
    def modules(self) -> tuple[ModuleExplanation, ...]:
        """The ops grouped by module, modules in order of their first op."""
        types = dict(self.module_types)
        groups: dict[str, list[ExplainedOp]] = {}
        for op in self.ops:
            groups.setdefault(op.module, []).append(op)
        return tuple(ModuleExplanation(name, types.get(name, ""), tuple(ops)) for name, ops in groups.items())

    @property
    def risks(self) -> tuple[ExplainedOp, ...]:
        """Ops that may overflow (or give -inf) in the target dtype."""
        return tuple(o for o in self.ops if o.risk)

    @property
    def unknown(self) -> tuple[ExplainedOp, ...]:
        """Ops no rule covers (they run as PyTorch runs them in the dtype)."""
        return tuple(o for o in self.ops if o.rule is None)

    def __getitem__(self, module: str) -> ModuleExplanation:
        for m in self.modules:
            if m.module == module:
                return m
        known = ", ".join(m.module for m in self.modules[:12])
        raise KeyError(f"no op of module {module!r} reaches the engine; modules with ops: {known}")

    def __str__(self) -> str:
        from .render.explain import explain_text

        return explain_text(self)


def explain(model: nn.Module, inputs: Any, target: str = "strict:fp16", keep_fp32: Iterable[str] = (),
            *, norm_fp32: bool = True) -> Explanation:
    """Per module, the ops that reach ``target``'s engine, their dtypes and the rule computing each.

    ``target`` is ``strict:<dtype>`` (Torch-TensorRT; ``tensorrt:<dtype>`` gives the same
    answer), or ``strict-onnx:<dtype>``. ``keep_fp32`` names modules kept in FP32, as a fix
    would. ``norm_fp32=False`` reads normalization layers as computed in the dtype (strict only).
    ``model`` itself is untouched; the analysis runs on a cast copy.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"explain(model=...) takes an nn.Module; got {type(model).__name__}")
    spec = parse_target(target)
    if spec.backend not in PROFILES or spec.dtype not in LOW_PRECISION:
        valid = ", ".join(f"{b}:{d}" for b in PROFILES for d in ("fp16", "bf16"))
        raise InvalidArgument(f"explain(target={target!r}): explain knows the engines of {valid}")
    profile = PROFILES[spec.backend]
    args, kwargs = as_call(inputs)
    plan = PrecisionPlan(spec.dtype, frozenset(keep_fp32))
    with torch.no_grad():
        copy = plan.apply(model, cast_weights=True).eval()
        cargs, ckwargs = cast_floating((args, kwargs), spec.dtype)
        gm = _lowered(copy, cargs, ckwargs, profile, str(spec))
        shadow = _Shadow(gm, profile, spec.dtype, norm_fp32)
        shadow.run(*pytree.tree_leaves((cargs, ckwargs)))
    from .targets import get_backend

    backend = get_backend(spec.backend if spec.backend != "tensorrt" else "strict")
    if profile == "strict" and hasattr(backend, "norm_fp32"):
        backend.norm_fp32 = norm_fp32
    describe = backend.describe() if hasattr(backend, "describe") else profile
    names = {op.module for op in shadow.rows}
    types = tuple((ROOT if name == "" else name, type(m).__name__) for name, m in model.named_modules()
                  if (ROOT if name == "" else name) in names)
    return Explanation(str(spec), describe, type(model).__name__, tuple(shadow.rows), types)


def _lowered(module: nn.Module, args: tuple, kwargs: dict, profile: str, label: str) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own
        return _export(module, args, kwargs, profile, label)


def _export(module: nn.Module, args: tuple, kwargs: dict, profile: str, label: str) -> fx.GraphModule:
    try:
        exported = torch.export.export(module, args, kwargs or None, strict=False)
    except Exception as e:
        raise UnsupportedTarget(f"explain({label}): torch.export.export(strict=False) failed, so the engine's graph "
                                f"cannot be listed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if profile == "strict":
        exported = exported.run_decompositions(trt_decomposition_table())
    return remove_assert_nodes(exported.module())


# --------------------------------------------------------------------------- the FP32 shadow


def _op_name(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ROOT
    path = list(stack.values())[-1][0]
    return path or ROOT


def _to_fp32(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, torch.dtype):
        return torch.float32 if value in LOW_PRECISION else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fp32(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_fp32(v) for k, v in value.items()}
    return value


def _absmax(value: Any) -> float | None:
    peaks = [float(t.detach().abs().max()) for t in pytree.tree_leaves(value)
             if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    return max(peaks) if peaks else None


def _dtype_of(node: fx.Node) -> str:
    val = node.meta.get("val")
    leaves = [v for v in pytree.tree_leaves(val) if isinstance(v, Tensor)]
    return dtype_name(leaves[0].dtype) if leaves else "-"


class _Shadow(fx.Interpreter):
    """Runs the dtype graph with every tensor in FP32 and explains each call_function node."""

    def __init__(self, gm: fx.GraphModule, profile: str, dtype: torch.dtype, norm_fp32: bool) -> None:
        super().__init__(gm)
        self.profile, self.dtype, self.norm_fp32 = profile, dtype, norm_fp32
        self.info = torch.finfo(dtype)
        self.rows: list[ExplainedOp] = []

    def run_node(self, n: fx.Node) -> Any:
        if n.op != "call_function":
            return _to_fp32(super().run_node(n))
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = _to_fp32(args), _to_fp32(kwargs)
        out = _to_fp32(n.target(*args, **kwargs))
        self.rows.append(self._explain(n, args, kwargs, out))
        return out

    def _explain(self, n: fx.Node, args: tuple, kwargs: dict, out: Any) -> ExplainedOp:
        op = _op_name(n)
        first = n.args[0] if n.args else None
        producer = _op_name(first) if isinstance(first, fx.Node) and first.op == "call_function" else ""
        rule = rule_for(self.profile, op, producer)
        dtype = _dtype_of(n)
        absmax = _absmax(out)
        base = dict(module=_module_of(n), node=n.name, op=op, dtype=dtype, rule=rule.key if rule else None,
                    absmax=absmax, arithmetic=not (rule is not None and rule.precision == "none"))
        if rule is None:
            return ExplainedOp(computed="no rule: as PyTorch runs it in the dtype", **base)
        low = dtype == dtype_name(self.dtype)
        if rule.precision == "cast":
            source = _absmax(args[0]) if args else None
            risk = None
            if low and source is not None and source > self.info.max:
                risk = f"cast to {dtype}: an FP32 value of {_num(source)} > {_num(self.info.max)}"
            return ExplainedOp(computed=f"cast to {dtype}", peak=source, peak_what="input", risk=risk, **base)
        if not low:
            return ExplainedOp(computed=f"in {dtype} (its inputs are {dtype})", **base)
        computed, peak, what, risk, note = self._assess(rule, n, args, kwargs, absmax)
        return ExplainedOp(computed=computed, peak=peak, peak_what=what, risk=risk, note=note, **base)

    # -- the checks each rule names ---------------------------------------------------------
    def _assess(self, rule: Rule, n: fx.Node, args: tuple, kwargs: dict, absmax: float | None):
        computed = _SHORT[rule.precision]
        limit = self.info.max
        kind = rule.risk
        if kind == "norm-fp32" and not self.norm_fp32:
            kind, computed = "norm-chain", "dtype inside (norm_fp32=False)"
        if kind == "none":
            return computed, None, "", None, ""
        if kind == "norm-fp32":
            peak = _centered_square(args[0], _norm_dims(n, args))
            note = f"safe: FP32 inside (in {dtype_name(self.dtype)} (x-mean)^2 would reach {_num(peak)})" \
                if peak is not None and peak > limit else ""
            return computed, peak, "(x-mean)^2", None, note
        if kind == "norm-chain":
            peak = _centered_square(args[0], _norm_dims(n, args))
            return computed, peak, "(x-mean)^2", _over(peak, limit, "(x-mean)^2"), ""
        if kind == "square-chain":
            dims = _reduce_dims(n, args)
            x = args[0].double()
            peak = max(float(x.square().max()), float(x.square().sum(dims).max()) if "norm" in _op_name(n) else 0.0)
            return computed, peak, "x^2 / sum(x^2)", _over(peak, limit, "x^2"), ""
        if kind == "gelu-chain":
            x = args[0].double()
            tanh = kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh"
            peak = float((x.abs() ** 3).max()) if tanh else float((x * (1 + torch.erf(x / math.sqrt(2)))).abs().max())
            what = "x^3" if tanh else "x*(1+erf)"
            return computed, peak, what, _over(peak, limit, what), ""
        if kind in ("log-of-zero", "log-softmax"):
            p = args[0].double()
            if kind == "log-softmax":
                p = torch.softmax(p, args[1] if len(args) > 1 else -1)
            zero = self.info.smallest_normal * self.info.eps / 2  # half the smallest subnormal: rounds to 0
            count = int((p < zero).sum())
            risk = (f"-inf: {count} probabilities below {_num(zero)} round to 0 in {dtype_name(self.dtype)}, "
                    "and log(0) = -inf") if count else None
            smallest = float(p[p > 0].min()) if bool((p > 0).any()) else 0.0
            return computed, smallest, "smallest probability", risk, ""
        if kind == "scores":
            q, k = args[0].double(), args[1].double()
            scale = kwargs.get("scale") or 1 / math.sqrt(q.shape[-1])
            peak = float((q @ k.transpose(-2, -1) * scale).abs().max())
            return computed, peak, "q.k^T*scale", _over(peak, limit, "scores"), ""
        return computed, absmax, "output", _over(absmax, limit, "output"), ""


def _over(value: float | None, limit: float, what: str) -> str | None:
    if value is None or value <= limit:
        return None
    return f"{what} reaches {_num(value)} > {_num(limit)}"


def _centered_square(x: Tensor, dims: tuple[int, ...]) -> float | None:
    if not isinstance(x, Tensor) or not x.numel():
        return None
    x = x.double()
    return float((x - x.mean(dims, keepdim=True)).square().max())


def _norm_dims(n: fx.Node, args: tuple) -> tuple[int, ...]:
    """The dims a layer_norm/var node normalizes over (all but the first for a group norm)."""
    x = args[0]
    op = _op_name(n)
    if "layer_norm" in op:
        return tuple(range(x.dim() - len(args[1]), x.dim()))
    return _reduce_dims(n, args)


def _reduce_dims(n: fx.Node, args: tuple) -> tuple[int, ...]:
    x = args[0]
    dims = n.kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], (list, tuple, int)) else None)
    if "rms_norm" in _op_name(n) and len(args) > 1:
        return tuple(range(x.dim() - len(args[1]), x.dim()))
    if dims is None:
        return tuple(range(x.dim()))
    return (dims,) if isinstance(dims, int) else tuple(dims)


def _num(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"
