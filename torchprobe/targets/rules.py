"""The rules ``strict`` and ``strict-onnx`` compute by, one row per op, each with its source.

A row says what the engine builds for an op, in which precision it computes, how the emulation
computes it, where that comes from, and — where the sources are silent — which way the
emulation errs. ``docs/rules.md`` is :func:`rules_markdown` checked in (a test keeps it current).
:func:`trt_decomposition_table` rebuilds Torch-TensorRT 2.14's decomposition table from the op
names recorded here, through torch's own decomposition machinery (``torch_tensorrt`` itself
cannot be installed without a GPU), so that the ops reaching the converters can be listed for any
module: ``explain`` does that, and ``tests/test_fidelity.py`` checks every such op against a row.

Example::

    >>> from torchprobe.targets.rules import rule_for
    >>> rule_for("strict", "aten.native_layer_norm.default").precision
    'fp32'
    >>> print(rules_markdown().splitlines()[2][:60])
    | strict | layer_norm | `aten.native_layer_norm.default` | o
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Rule", "RULES", "PRECISIONS", "TRT_2_14", "remove_assert_nodes", "rule_for", "rules_markdown",
           "trt_decomposition_table"]

# Sources, pinned. Torch-TensorRT main d7f2062 = 2.14.0a0; its impl/, _decompositions.py,
# _decomposition_groups.py and _defaults.py equal the released torch_tensorrt-2.14.0 wheel.
TRT = "https://github.com/pytorch/TensorRT/blob/d7f2062/py/torch_tensorrt/dynamo/"
ONNX_TRT = "https://github.com/onnx/onnx-tensorrt/blob/96e7811/onnxOpImporters.cpp"  # 10.1 GA
TS_ONNX = "torch/onnx/_internal/torchscript_exporter/"  # torch 2.13 TorchScript exporter
TRT_HEADERS = "TensorRT NvInfer.h (10.15, 10.16: INormalizationLayer::setComputePrecision, default kFLOAT; 11.0/11.1: removed)"

PRECISIONS = {
    "fp32": "computed in FP32, the output rounded once to the dtype",
    "norm+dtype": "normalization in FP32 rounded once, then the affine as dtype elementwise layers",
    "dtype": "each result stored in the dtype",
    "matmul": "dtype inputs and output, FP32 accumulation",
    "graph-fp32": "FP32, because the decomposition casts to FP32 and back",
    "chain": "decomposed into primitives, each result stored in the dtype",
    "cast": "a cast: overflows where an FP32 value exceeds the dtype's range",
    "none": "no arithmetic (shape, indexing, data movement)",
}


@dataclass(frozen=True)
class Rule:
    """One op of one profile: what the engine builds and how the emulation computes it.

    ``aten`` lists the ops as they reach the converter (``strict``: after Torch-TensorRT's
    decomposition table; ``strict-onnx``: the export's aten ops before decomposition, which the
    TorchScript exporter's symbolics see). ``risk`` names the check ``explain`` runs on the FP32
    values: ``output`` (the stored result exceeds the dtype), ``norm-chain`` ((x-mean)^2),
    ``square-chain`` (x^2 and its sum), ``gelu-chain`` (x*(1+erf) or x^3), ``log-of-zero``
    (inputs that round to 0), ``scores`` (q.k^T*scale), ``none``. ``errs`` is empty where the
    sources say how the engine computes; otherwise it says which way the emulation errs.
    """

    profile: str
    key: str
    aten: tuple[str, ...]
    engine: str
    precision: str
    emulation: str
    source: str
    errs: str = ""
    risk: str = "output"
    after: str = ""  # the row applies to ``aten`` only when its first input comes from this op


_MATMUL_OPS = ("aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.linear.default",
               "aten.addmm.default", "aten.mv.default", "aten.dot.default", "aten.baddbmm.default")
_CONV_OPS = ("aten.convolution.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
             "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input")
_REDUCE_OPS = ("aten.mean.dim", "aten.mean.default", "aten.sum.dim_IntList", "aten.sum.default", "aten.prod.default",
               "aten.prod.dim_int", "aten.cumsum.default", "aten.amax.default", "aten.amin.default", "aten.max.dim",
               "aten.min.dim", "aten.max.default", "aten.min.default", "aten.argmax.default", "aten.argmin.default",
               "aten.any.dim", "aten.all.dim", "prims.sum.default")
_ELEMENTWISE_OPS = (
    "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar", "aten.rsub.Scalar", "aten.rsub.Tensor",
    "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor", "aten.div.Scalar", "aten.div.Tensor_mode",
    "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar", "aten.exp.default", "aten.exp2.default",
    "aten.expm1.default", "aten.sqrt.default", "aten.rsqrt.default", "aten.reciprocal.default",
    "aten.tanh.default", "aten.sigmoid.default", "aten.erf.default", "aten.neg.default", "aten.abs.default",
    "aten.relu.default", "aten.leaky_relu.default", "aten.hardtanh.default", "aten.elu.default",
    "aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_max.default",
    "aten.maximum.default", "aten.minimum.default", "aten.where.self", "aten.where.ScalarOther",
    "aten.where.ScalarSelf", "aten.sin.default", "aten.cos.default", "aten.tan.default", "aten.sinh.default",
    "aten.cosh.default", "aten.atan.default", "aten.floor.default", "aten.ceil.default", "aten.round.default",
    "aten.sign.default", "aten.square.default", "aten.softplus.default", "aten.logical_not.default",
    "aten.logical_and.default", "aten.logical_or.default", "aten.eq.Tensor", "aten.eq.Scalar", "aten.ne.Tensor",
    "aten.ne.Scalar", "aten.lt.Tensor", "aten.lt.Scalar", "aten.le.Tensor", "aten.le.Scalar", "aten.gt.Tensor",
    "aten.gt.Scalar", "aten.ge.Tensor", "aten.ge.Scalar", "aten.isnan.default", "aten.isinf.default",
    "aten.bitwise_not.default", "aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.fmod.Scalar",
    "aten.remainder.Scalar", "aten.log1p.default", "aten.log2.default", "aten.log10.default", "prims.div.default",
    "aten.silu.default", "aten.hardswish.default", "aten.hardsigmoid.default", "aten.mish.default",
)
_SHAPE_OPS = (
    "aten.view.default", "aten._reshape_copy.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.permute.default", "aten.transpose.int", "aten.t.default", "aten.expand.default", "aten.slice.Tensor",
    "aten.select.int", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
    "aten.cat.default", "aten.stack.default", "aten.split.Tensor", "aten.split_with_sizes.default",
    "aten.unbind.int", "aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
    "aten.embedding.default", "aten.index.Tensor", "aten.index_select.default", "aten.gather.default",
    "aten.scatter.src", "aten.scatter.value", "aten.slice_scatter.default", "aten.select_scatter.default",
    "aten.full.default", "aten.full_like.default", "aten.zeros.default", "aten.zeros_like.default",
    "aten.ones.default", "aten.ones_like.default", "aten.arange.default", "aten.arange.start",
    "aten.arange.start_step", "aten.scalar_tensor.default", "aten.empty.memory_format", "aten.lift_fresh_copy.default",
    "aten.flip.default", "aten.roll.default", "aten.repeat.default", "aten.tile.default", "aten.pad.default",
    "aten.constant_pad_nd.default", "aten.max_pool2d.default", "aten.max_pool2d_with_indices.default",
    "aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default", "aten.avg_pool2d.default",
    "aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec", "aten.pixel_shuffle.default",
    "aten.dropout.default", "aten.sym_size.int", "aten.expand_as.default", "getitem",
)
_FALLBACK_OPS = ("prims.broadcast_in_dim.default",)
_CAST_OPS = ("aten._to_copy.default", "prims.convert_element_type.default", "aten.to.dtype")

_TRT_NORM = TRT + "conversion/impl/normalization/ops.py"
_TRT_DECOMP = TRT + "lowering/_decompositions.py"
_TRT_GROUPS = TRT + "lowering/_decomposition_groups.py"

STRICT_RULES = (
    Rule("strict", "layer_norm", ("aten.native_layer_norm.default",),
         "one INormalizationLayer (native_layer_norm -> add_normalization, weight and bias inside the layer)",
         "fp32", "PyTorch's FP16 layer_norm (FP32 inside, rounded once); norm_fp32=False: FP16 primitives",
         f"{_TRT_NORM} native_layer_norm; {TRT_HEADERS}; pytorch/TensorRT PR #3272 removed compute_precision=input.dtype",
         "optimistic if TensorRT 11 computes an FP16-typed normalization in FP16 (undocumented): norm_fp32=False is that reading",
         risk="norm-fp32"),
    Rule("strict", "group_norm", ("aten.native_group_norm.default",),
         "INormalizationLayer with weight 1, bias 0 (num_groups), then IElementWise PROD weight and SUM bias; "
         "instance_norm is decomposed to group_norm(C)",
         "norm+dtype", "F.group_norm without affine (FP32 inside), then * weight and + bias in the dtype",
         f"{_TRT_NORM} native_group_norm; {_TRT_DECOMP} instance_norm_decomposition",
         "as layer_norm for the normalization", risk="output"),
    Rule("strict", "batch_norm", ("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default",
                                  "aten.native_batch_norm.default", "aten._native_batch_norm_legit.no_stats"),
         "constant-folded scale = weight/sqrt(running_var+eps), shift = bias - running_mean*scale (torch "
         "arithmetic on the parameters), one IScaleLayer (CHANNEL)",
         "fp32", "the fold in the parameters' dtype, then x*scale+shift computed in FP32 and rounded once",
         f"{_TRT_NORM} batch_norm, batch_norm_constant_folding",
         "IScaleLayer precision undocumented: rounding once errs optimistic by at most one rounding"),
    Rule("strict", "softmax", ("aten._softmax.default",),
         "one ISoftMaxLayer (aten._softmax is a disabled decomposition)", "fp32",
         "PyTorch's FP16 softmax (FP32 inside, rounded once)",
         f"{_TRT_GROUPS} torch_disabled_decompositions; {_TRT_NORM} softmax",
         "ISoftMaxLayer precision undocumented; its output is in [0, 1], so only rounding can differ"),
    Rule("strict", "log_softmax", ("aten.log.default",),
         "decomposed to log(softmax(x)): ISoftMaxLayer then IUnaryLayer LOG, both in the dtype", "dtype",
         "torch.log(torch.softmax(x)) in the dtype: probabilities below 6e-8 become 0 and log gives -inf",
         f"{_TRT_DECOMP} log_softmax_decomposition", risk="log-of-zero", after="aten._softmax.default"),
    Rule("strict", "gelu", ("aten.gelu.default",),
         "one IActivationLayer GELU_ERF / GELU_TANH", "fp32", "PyTorch's FP16 gelu (FP32 inside, rounded once)",
         TRT + "conversion/impl/activation/ops.py gelu",
         "activation precision undocumented; gelu(x) ~ x, so only rounding can differ"),
    Rule("strict", "scaled_dot_product_attention",
         ("aten.scaled_dot_product_attention.default", "aten._scaled_dot_product_flash_attention.default",
          "aten._scaled_dot_product_efficient_attention.default", "aten._scaled_dot_product_cudnn_attention.default"),
         "kept out of the decompositions (decompose_attention=False by default); the converter pre-scales "
         "Q (q*scale, or q/sqrt(D) with sqrt(D) cast to the dtype), then one IAttention layer "
         "(add_attention_v2 in 2.14, add_attention in 2.11-2.13, decomposable)",
         "fp32", "q scaled in the dtype, then F.scaled_dot_product_attention(scale=1) (FP32 scores, rounded once)",
         f"{TRT}conversion/impl/attention.py scaled_dot_product_attention; {_TRT_DECOMP} ATTENTION_DECOMPOSITION_OPS",
         "IAttention precision undocumented: optimistic where TensorRT decomposes it into FP16 matmuls "
         "(scores stored in FP16). Not emulated: force_causal_efficient_attention (attn_bias_is_causal=True) "
         "turns a square _scaled_dot_product_efficient_attention with a bias into causal attention",
         risk="output"),
    Rule("strict", "var, std, vector_norm, normalize, rms_norm (torch >= 2.13)", (),
         "decomposed with FP32 casts in the graph: aten.var/var_mean/std and linalg_vector_norm/norm are "
         "enabled torch decompositions (torch._refs upcast FP16 to FP32), prims.var by Torch-TensorRT's "
         "var_decomposition; _fused_rms_norm by its FP32 composite",
         "graph-fp32", "PyTorch's FP16 kernels, which compute in FP32 and round the result once",
         f"{_TRT_GROUPS} torch_enabled_decompositions; {_TRT_DECOMP} var_decomposition; torch/_decomp/decompositions.py _fused_rms_norm",
         risk="none"),
    Rule("strict", "rms_norm (torch 2.11)", ("aten._fused_rms_norm.default",),
         "replace_fused_rms_norm lowering pass: x*x, mean, + eps (1e-5 when None), rsqrt, x*, *weight in the dtype",
         "chain", "the same primitives in the dtype, where _fused_rms_norm has no composite kernel",
         TRT + "lowering/passes/replace_fused_rms_norm.py", risk="square-chain"),
    Rule("strict", "rsqrt, reciprocal, silu", (),
         "decomposed: rsqrt -> reciprocal(sqrt(x)) -> div(1, sqrt(x)); silu -> x*sigmoid(x)", "dtype",
         "the same two dtype layers each", f"{_TRT_DECOMP} rsqrt_replacement, reciprocal_replacement, silu",
         risk="none"),
    Rule("strict", "reductions", _REDUCE_OPS,
         "IReduceLayer (AVG, SUM, MAX, ...), dtype in and out", "dtype",
         "PyTorch's FP16 reductions (FP32 accumulation, the result stored in the dtype)",
         TRT + "conversion/impl/reduce.py",
         "accumulation undocumented: optimistic if TensorRT accumulates a sum in FP16"),
    Rule("strict", "matmul, linear", _MATMUL_OPS,
         "IMatrixMultiply in the dtype (linear: matmul, then IElementWise bias); use_fp32_acc=True (default "
         "False) casts FP16 matmul inputs to FP32 and the output back", "matmul",
         "dtype inputs, FP32 accumulation, one rounding (CPU: computed in FP32 from the dtype inputs); "
         "fp32_acc=True: FP32 matmul, cast, then the bias in the dtype",
         f"{TRT}conversion/impl/matmul.py matrix_multiply; {TRT}conversion/impl/linear.py; {TRT}_defaults.py USE_FP32_ACC",
         "accumulation with use_fp32_acc=False undocumented: optimistic if a tactic accumulates in FP16; "
         "the bias is rounded together with the product (the engine fuses it in practice; <= 1 rounding)"),
    Rule("strict", "convolution", _CONV_OPS,
         "IConvolutionLayer in the dtype, bias inside; no use_fp32_acc", "matmul",
         "dtype inputs, FP32 accumulation, one rounding", TRT + "conversion/impl/conv.py",
         "accumulation undocumented: optimistic if a tactic accumulates in FP16"),
    Rule("strict", "elementwise", _ELEMENTWISE_OPS,
         "one IElementWise / IUnary / IActivation layer per op, dtype in and out (TensorRT warns about "
         "FP16 Pow and Reduce but does not upcast: pytorch/TensorRT #4061)", "dtype",
         "as PyTorch runs it in the dtype (each result rounded to the dtype)",
         TRT + "conversion/impl/elementwise/ops.py, impl/unary/ops.py",
         "a Myelin fusion may keep intermediates in FP32 registers: rounding each result errs pessimistic"),
    Rule("strict", "composite elementwise", (),
         "enabled torch decompositions (hardswish, hardtanh, addcmul, addcdiv, lerp, mish, logsumexp, logaddexp, "
         "celu, ...) become dtype primitives", "dtype",
         "PyTorch's composite kernels (FP32 inside, rounded once)", f"{_TRT_GROUPS} torch_enabled_decompositions",
         "optimistic by double rounding only (a few ulps); not in range"),
    Rule("strict", "cast", _CAST_OPS, "ICast / explicit casts of a strongly typed network", "cast",
         "Tensor.to in the dtype", TRT + "conversion/converter_utils.py cast_trt_tensor"),
    Rule("strict", "shape", _SHAPE_OPS, "IShuffle, ISlice, IConcatenation, IGather, constants, pooling", "none",
         "as PyTorch runs it", TRT + "conversion/aten_ops_converters.py", risk="none"),
    Rule("strict", "no converter", _FALLBACK_OPS,
         "no converter in 2.14 (e.g. the broadcast after a keepdim var, which fuse_prims_broadcast fuses only "
         "after a prims.sum): the op runs in a PyTorch segment (_run_on_gpu) between engines", "none",
         "as PyTorch runs it", TRT + "lowering/passes/fuse_prims_broadcast.py; conversion/aten_ops_converters.py",
         risk="none"),
)

_ONNX_NORM = f"{TS_ONNX}symbolic_opset9.py"
ONNX_RULES = (
    Rule("strict-onnx", "layer_norm", ("aten.layer_norm.default", "aten.native_layer_norm.default"),
         "opset < 17: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add; opset 17: LayerNormalization -> "
         "one INormalizationLayer with compute precision FP32 (stash_type)", "chain",
         "the primitive chain, every result in the dtype; fused_norms=True: FP32 inside, rounded once",
         f"{_ONNX_NORM} native_layer_norm; {TS_ONNX}symbolic_opset17.py layer_norm; {ONNX_TRT} LayerNormalization",
         "pessimistic where TensorRT's weak typing keeps a layer in FP32 (it may run each in FP16)", risk="norm-chain"),
    Rule("strict-onnx", "group_norm", ("aten.group_norm.default", "aten.native_group_norm.default"),
         "InstanceNormalization over [N, groups, -1] (-> INormalizationLayer, kNATIVE_INSTANCENORM) then Mul, Add",
         "norm+dtype", "normalization in FP32 rounded once, then * weight and + bias in the dtype",
         f"{_ONNX_NORM} group_norm; {ONNX_TRT} InstanceNormalization, normalizationHelper; {TRT_HEADERS}",
         "normalization compute precision left at the documented FP32 default"),
    Rule("strict-onnx", "instance_norm", ("aten.instance_norm.default",),
         "InstanceNormalization with scale and bias -> one INormalizationLayer", "fp32",
         "PyTorch's FP16 instance_norm (FP32 inside, rounded once)",
         f"{_ONNX_NORM} instance_norm; {ONNX_TRT} InstanceNormalization", "as group_norm"),
    Rule("strict-onnx", "batch_norm", ("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"),
         "BatchNormalization folded by the importer into scale and shift in FP32, one scale layer", "dtype",
         "x*scale and +shift each stored in the dtype, scale and shift rounded to the dtype",
         f"{_ONNX_NORM} batch_norm; {ONNX_TRT} BatchNormalization (batchnormWeightHelper)",
         "pessimistic by one rounding if the scale layer rounds once"),
    Rule("strict-onnx", "rms_norm", ("aten.rms_norm.default",),
         "Pow, ReduceMean, Add, Sqrt, Div, Mul (an FP32 export of torch's composite)", "chain",
         "the chain in the dtype; fused_norms=True: FP32 inside",
         "not verified in the exporter (no rms_norm symbolic below opset 23 in torch 2.13)",
         "pessimistic", risk="square-chain"),
    Rule("strict-onnx", "softmax", ("aten.softmax.int", "aten._softmax.default"),
         "one Softmax node -> ISoftMaxLayer", "fp32", "PyTorch's FP16 softmax",
         f"{TS_ONNX}symbolic_opset13.py softmax; {ONNX_TRT} Softmax", "ISoftMaxLayer precision undocumented"),
    Rule("strict-onnx", "log_softmax", ("aten.log_softmax.int", "aten._log_softmax.default"),
         "LogSoftmax -> ISoftMaxLayer then IUnaryLayer LOG", "dtype",
         "torch.log(torch.softmax(x)) in the dtype (-inf where probabilities round to 0)",
         f"{TS_ONNX}symbolic_opset13.py log_softmax; {ONNX_TRT} LogSoftmax", risk="log-softmax"),
    Rule("strict-onnx", "gelu", ("aten.gelu.default",),
         "opset < 20: Div sqrt2, Erf, Add 1, Mul x, Mul 0.5 (tanh form: x*x*x, ...); opset 20: Gelu", "chain",
         "the chain in the dtype", f"{_ONNX_NORM} gelu; {TS_ONNX}symbolic_opset20.py gelu",
         "pessimistic where TensorRT fuses the chain into one GELU kernel", risk="gelu-chain"),
    Rule("strict-onnx", "var, std", ("aten.var.correction", "aten.var.dim", "aten.var.default", "aten.std.correction",
                                     "aten.std.dim", "aten.std.default", "aten.var_mean.correction"),
         "ReduceMean, Sub, Mul, ReduceMean, Mul N, Div N-correction (, Sqrt)", "chain", "the chain in the dtype",
         f"{TS_ONNX}symbolic_helper.py _var_mean_helper", risk="norm-chain"),
    Rule("strict-onnx", "vector_norm, normalize", ("aten.linalg_vector_norm.default", "aten.norm.ScalarOpt_dim",
                                                   "aten.norm.Scalar", "aten.frobenius_norm.dim"),
         "ReduceL2 (ReduceSumSquare then Sqrt), ReduceL1, ReduceMax of Abs; normalize: norm, Max eps, Div", "chain",
         "x*x, ReduceSum, Sqrt in the dtype", f"{TS_ONNX}symbolic_opset11.py linalg_vector_norm; {ONNX_TRT} ReduceL2",
         risk="square-chain"),
    Rule("strict-onnx", "scaled_dot_product_attention", ("aten.scaled_dot_product_attention.default",),
         "opset 14: Mul(q, sqrt(scale)), Mul(k^T, sqrt(scale)), MatMul, Add mask, Softmax, MatMul", "chain",
         "the same, matmuls with FP32 accumulation, scores stored in the dtype",
         f"{TS_ONNX}symbolic_opset14.py scaled_dot_product_attention", risk="scores"),
    Rule("strict-onnx", "matmul, linear", _MATMUL_OPS, "MatMul/Gemm -> IMatrixMultiply", "matmul",
         "dtype inputs, FP32 accumulation, bias included, one rounding", ONNX_TRT + " MatMul, Gemm",
         "accumulation undocumented: optimistic if a tactic accumulates in FP16"),
    Rule("strict-onnx", "convolution", _CONV_OPS, "Conv -> IConvolutionLayer", "matmul",
         "dtype inputs, FP32 accumulation, one rounding", ONNX_TRT + " Conv", "as matmul"),
    Rule("strict-onnx", "reductions", _REDUCE_OPS, "ReduceMean/ReduceSum/... -> IReduceLayer", "dtype",
         "FP32 accumulation, the result stored in the dtype", ONNX_TRT + " Reduce*", "as in strict"),
    Rule("strict-onnx", "elementwise", _ELEMENTWISE_OPS, "one ONNX node -> one TensorRT layer", "dtype",
         "as PyTorch runs it in the dtype", ONNX_TRT, "as in strict"),
    Rule("strict-onnx", "cast", _CAST_OPS, "Cast", "cast", "Tensor.to", ONNX_TRT + " Cast"),
    Rule("strict-onnx", "shape", _SHAPE_OPS, "shape and data movement", "none", "as PyTorch runs it", ONNX_TRT,
         risk="none"),
)

RULES: tuple[Rule, ...] = STRICT_RULES + ONNX_RULES

# Torch-TensorRT's remove_assert_nodes pass (lowering/passes/remove_assert_nodes.py) erases these
# before conversion; export puts _assert_tensor_metadata before every .to() cast.
REMOVED_BEFORE_CONVERSION = ("aten._assert_scalar.default", "aten._assert_tensor_metadata.default")


def remove_assert_nodes(gm: Any) -> Any:
    """The graph without the assert nodes no converter sees (Torch-TensorRT's ``remove_assert_nodes``)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and str(node.target) in REMOVED_BEFORE_CONVERSION:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def rule_for(profile: str, op: str, producer: str = "") -> Rule | None:
    """The row of ``profile`` covering ``op`` (e.g. ``"aten.log.default"``); ``producer`` is the op
    that made its first input, for rows that apply only after another op (log after softmax)."""
    rows = [r for r in RULES if r.profile == profile and op in r.aten]
    for r in rows:
        if r.after and r.after == producer:
            return r
    return next((r for r in rows if not r.after), None) or _fallback(profile, op, rows)


def _fallback(profile: str, op: str, rows: list[Rule]) -> Rule | None:
    if rows:  # only conditional rows matched: the op itself is elementwise
        return next((r for r in RULES if r.profile == profile and r.key == "elementwise"), None)
    return None


def rules_markdown() -> str:
    """The table of every rule, as docs/rules.md carries it."""
    lines = ["| profile | op | reaches the converter as | engine | precision | emulation | source | where the sources are silent |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in RULES:
        aten = ", ".join(f"`{a}`" for a in r.aten[:4]) + (f" (+{len(r.aten) - 4} more)" if len(r.aten) > 4 else "")
        cells = [r.profile, r.key, aten or "(decomposed before the converters)", r.engine,
                 f"{r.precision}: {PRECISIONS[r.precision]}", r.emulation, r.source, r.errs or "documented"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- Torch-TensorRT 2.14's decomposition table

TRT_2_14 = {
    "source": _TRT_GROUPS + " and " + _TRT_DECOMP + " get_decompositions(enable_experimental_decompositions=False, "
              "decompose_attention=False)",
    # torch_enabled_decompositions: torch's own decompositions Torch-TensorRT switches on
    "torch_enabled": (
        "aten._adaptive_avg_pool2d_backward", "aten.addcdiv", "aten.addcdiv_", "aten.addcmul", "aten.addcmul_",
        "aten.addr", "aten.aminmax", "aten.arange.default", "aten.arange.start", "aten.avg_pool2d_backward",
        "aten.baddbmm", "aten.binary_cross_entropy", "aten.binary_cross_entropy_backward",
        "aten.binary_cross_entropy_with_logits", "aten.celu", "aten.col2im", "aten.count_nonzero",
        "aten.cudnn_batch_norm", "aten.cudnn_batch_norm_backward", "aten.deg2rad", "aten.detach", "aten.diag_embed",
        "aten.diagonal_backward", "aten.elu_backward", "aten.embedding_dense_backward", "aten.empty_like",
        "aten._euclidean_dist.default", "aten.expand_as", "aten.eye", "aten.fill", "aten.frac",
        "aten._fused_moving_avg_obs_fq_helper", "aten.gelu_backward", "aten.glu_backward", "aten.hardshrink",
        "aten.hardshrink_backward", "aten.hardsigmoid_backward", "aten.hardswish", "aten.hardswish_",
        "aten.hardswish_backward", "aten.hardtanh", "aten.hardtanh_", "aten.hardtanh_backward", "aten.heaviside",
        "aten.huber_loss", "aten.huber_loss_backward", "aten.im2col", "aten.index_add", "aten.index_add_",
        "aten.index_fill", "aten.index_fill_", "aten.isneginf", "aten.isposinf", "aten.l1_loss",
        "aten.leaky_relu_", "aten.leaky_relu_backward", "aten.lerp", "aten.linspace", "aten.logaddexp",
        "aten.logaddexp2", "aten.logit", "aten.logit_backward", "aten.log_sigmoid_backward",
        "aten.log_sigmoid_forward", "aten._log_softmax_backward_data", "aten.logspace", "aten.logsumexp.default",
        "aten.masked_fill", "aten.masked_fill_", "aten.max_pool2d_with_indices_backward", "aten.mish",
        "aten.mse_loss", "aten.mse_loss_backward", "aten.mvlgamma", "aten.nansum", "aten.nan_to_num",
        "aten.narrow", "aten.native_batch_norm_backward", "aten._native_batch_norm_legit_functional",
        "aten.native_dropout_backward", "aten.native_group_norm_backward", "aten.native_layer_norm_backward",
        "aten.new_empty", "aten.new_full", "aten.new_ones", "aten.new_zeros", "aten.nll_loss_backward",
        "aten.nll_loss_forward", "aten.norm", "aten.ones", "aten.ones_like", "aten._prelu_kernel_backward",
        "aten._reshape_alias", "aten.rad2deg", "aten.renorm", "aten.renorm_", "aten.rot90", "aten.rsub",
        "aten.select_backward", "aten.select_scatter", "aten.sgn", "aten.sigmoid_backward", "aten.silu_backward",
        "aten.sinc", "aten.slice_backward", "aten.smooth_l1_loss", "aten.smooth_l1_loss_backward",
        "aten.soft_margin_loss", "aten.soft_margin_loss_backward", "aten._softmax.out", "aten._softmax_backward_data",
        "aten.softplus_backward", "aten.softshrink", "aten.softshrink_backward", "aten.special_entr",
        "aten.special_log_ndtr", "aten.special_xlog1py", "aten.stack", "aten.std", "aten.t", "aten.tanh_backward",
        "aten.threshold", "aten.threshold_backward", "aten.trace", "aten.transpose.int", "aten.tril.default",
        "aten.triu.default", "aten.unbind", "aten.unfold", "aten.unfold_backward", "aten.unfold_copy",
        "aten._unsafe_index", "aten.upsample_nearest2d_backward", "aten.var", "aten.var_mean", "aten.xlogy",
        "aten.zero", "aten.zero_", "aten.zeros", "aten.zeros_like", "aten.clamp_min", "aten.clamp_max",
        "aten.linalg_vector_norm",
    ),
    # torch_disabled_decompositions: kept for their converters (packets compare unequal to overloads,
    # so "aten.repeat" removes nothing from the CIA table, as upstream)
    "torch_disabled": (
        "aten._softmax.default", "aten.upsample_nearest1d.vec", "aten.upsample_nearest2d.vec",
        "aten.upsample_nearest3d.vec", "aten.upsample_linear1d.vec", "aten.upsample_bilinear2d.vec",
        "aten.upsample_trilinear3d.vec", "aten.upsample_bicubic2d.vec", "aten.linear.default",
        "aten.matmul.default", "aten.repeat",
    ),
    # ATTENTION_DECOMPOSITION_OPS: not decomposed unless decompose_attention=True
    "attention": ("aten.scaled_dot_product_attention.default", "aten._scaled_dot_product_flash_attention.default",
                  "aten._scaled_dot_product_efficient_attention.default",
                  "aten._scaled_dot_product_cudnn_attention.default"),
    # TORCH_TRT_DECOMPOSITIONS that change arithmetic or op names, applied below; the others
    # (inplace -> out-of-place, empty_permuted, empty_strided, scatter_add, scatter_reduce,
    # masked_scatter, cudnn_grid_sampler) only move data and are left to torch
    "torch_trt": ("aten.rsqrt", "aten.reciprocal.default", "prims.var.default", "aten._log_softmax",
                  "aten.instance_norm", "aten.silu.default", "aten.silu_.default", "aten.view.default",
                  "aten._unsafe_view", "aten.alias", "aten.lift_fresh_copy", "aten.full_like"),
}


def _resolve(name: str) -> Any:
    """``"aten.var"`` -> the OpOverloadPacket, ``"aten.arange.start"`` -> the OpOverload."""
    namespace, op, *overload = name.split(".")
    packet = getattr(getattr(torch.ops, namespace), op)
    return getattr(packet, overload[0]) if overload else packet


def _trt_custom(aten: Any, prims: Any) -> dict[Any, Callable]:
    """Torch-TensorRT's own decompositions (``_decompositions.py``), the ones that matter here."""
    F = torch.nn.functional

    def rsqrt(x):
        return torch.reciprocal(torch.sqrt(x))

    def reciprocal(x):
        return torch.div(1, x)

    def log_softmax(x, dim, half_to_float):
        return torch.log(torch.softmax(x, dim, dtype=torch.float if half_to_float else None))

    def instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn_enabled):
        if use_input_stats:
            return F.group_norm(input, input.shape[1], weight, bias, eps)
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)

    def silu(x):
        return x * torch.sigmoid(x)

    def var(input_tensor, dims, correction, output_dtype=None):
        dims = [] if dims is None else dims
        n = input_tensor.numel() if len(dims) == 0 else functools.reduce(lambda a, d: a * input_tensor.shape[d], dims, 1)
        mean = torch.mean(input_tensor, dims, keepdim=True)
        diff = input_tensor - mean
        total = torch.sum(diff * diff, dims, keepdim=False)
        term = float(n - 1) if correction is None else float(n - correction)
        return total / term

    def view(x, size):
        return aten._reshape_copy.default(x, size)

    def reshape(x, *args, **kwargs):
        return torch.reshape(x, *args, **kwargs)

    def identity(x):
        return x

    def full_like(*args, **kwargs):
        x, value = args[0], args[1]
        return torch.full(x.shape, value, dtype=kwargs.get("dtype") or x.dtype, device=kwargs.get("device") or x.device)

    table: dict[Any, Callable] = {}
    pairs = [(aten.rsqrt, rsqrt), (aten.reciprocal.default, reciprocal), (prims.var.default, var),
             (aten._log_softmax, log_softmax), (aten.instance_norm, instance_norm), (aten.silu.default, silu),
             (aten.silu_.default, silu), (aten.view.default, view), (aten._unsafe_view, reshape), (aten.alias, identity),
             (aten.lift_fresh_copy, identity), (aten.full_like, full_like)]
    for op, fn in pairs:
        for overload in _overloads(op):
            table[overload] = fn
    return table


def _overloads(op: Any) -> list[Any]:
    if isinstance(op, torch._ops.OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [op]


def _fused_rms_norm_pass() -> dict[Any, Callable]:
    """``replace_fused_rms_norm``, for a torch where ``_fused_rms_norm`` has no composite kernel."""
    from .strict import fused_rms_norm_is_fp32

    op = getattr(torch.ops.aten, "_fused_rms_norm", None)
    if op is None or fused_rms_norm_is_fp32():
        return {}

    def lowered(x, shape, weight, eps):
        eps = 1e-5 if eps is None else eps
        dims = [x.dim() - i - 1 for i in range(len(shape))]
        r = torch.rsqrt(torch.mean(x * x, dims, keepdim=True) + eps)
        y = x * r
        return (y if weight is None else y * weight), r

    return {op.default: lowered}


def trt_decomposition_table() -> dict[Any, Callable]:
    """Torch-TensorRT 2.14's ``get_decompositions()`` with its defaults, rebuilt from :data:`TRT_2_14`.

    Every CompositeImplicitAutograd aten op gets its composite decomposition except the disabled
    and attention ops, then torch's decompositions of ``torch_enabled``, then Torch-TensorRT's own
    (later entries win, as upstream). Use with ``exported_program.run_decompositions(table)``.
    A fresh dict each call (the table is built once).
    """
    return dict(_table())


@functools.lru_cache(maxsize=1)
def _table() -> dict[Any, Callable]:
    from torch._decomp import get_decompositions
    from torch._export.utils import _collect_all_valid_cia_ops_for_aten_namespace, _get_decomp_for_cia

    aten, prims = torch.ops.aten, torch.ops.prims
    enabled = {_resolve(n) for n in TRT_2_14["torch_enabled"] if _exists(n)}
    disabled = {_resolve(n) for n in TRT_2_14["torch_disabled"] if _exists(n)}
    attention = {_resolve(n) for n in TRT_2_14["attention"] if _exists(n)}
    cia = {op: _get_decomp_for_cia(op) for op in _collect_all_valid_cia_ops_for_aten_namespace()
           if op not in disabled and op not in attention}
    return {**get_decompositions(enabled), **cia, **_trt_custom(aten, prims), **_fused_rms_norm_pass()}


def _exists(name: str) -> bool:
    try:
        _resolve(name)
    except (AttributeError, RuntimeError):
        return False
    return True


if __name__ == "__main__":  # python -m torchprobe.targets.rules > docs/rules.md
    print(rules_markdown(), end="")
