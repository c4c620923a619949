"""ONNX tensors named in torchprobe's row keys, from the module scopes the dynamo exporter records.

``torch.onnx.export(model, args, path, dynamo=True)`` stores on every ONNX node the nn.Module path
it came from: ``pkg.torch.onnx.name_scopes = ['', 'encoder', 'encoder.layer.0.output.dense',
'linear']`` (the root, each module down to the one that ran the op, then the op's FX node). A module
call's *output* is a value produced inside its scope and used outside it (or a graph output); its
*inputs* are the values it uses that come from outside (weights and constants left out). So the
tensors of a deployed engine (Polygraphy ``--onnx-outputs mark all``, ``--trt-outputs mark all``)
can be named by the keys of :func:`torchprobe.record`: ``stem``, ``blocks.0.attn#1`` (a repeated
call), ``head:1`` (a leaf of a tuple output).

Example (a real run; the innermost module names a tensor that several nested modules return)::

    import torch, torchprobe as tp
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    tp.export_onnx(model, torch.randn(2, 4), "model.onnx")
    tp.onnx_names("model.onnx")    # {'linear_1': '2', 'linear': '0', 'relu': '1'}
    # 'linear_1' is the output of module '2' and of the root: the innermost names it

This module is the only one in torchprobe that imports ``onnx``.
"""
from __future__ import annotations

import ast
import base64
import copy
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from .atomic import atomic_path, write_text
from ..errors import InvalidArgument, TorchprobeError
from ..names import ROOT, module_names
from ..tree import as_call, leaf_key, named_leaves

__all__ = ["OnnxExport", "OnnxScopes", "Origin", "ScopeCall", "ScopeMatch", "export_onnx", "onnx_names", "onnx_scopes"]

logger = logging.getLogger(__name__)

SCOPES = "pkg.torch.onnx.name_scopes"
CLASSES = "pkg.torch.onnx.class_hierarchy"
#: model metadata written by :func:`export_onnx`: the exact call key of every node's scopes.
CALLS = "torchprobe.calls"
#: model metadata written by :func:`export_onnx`: the leaf path of every graph output.
OUTPUTS = "torchprobe.outputs"

REEXPORT = (
    "re-export it with torch.onnx.export(model, args, path, dynamo=True) (torch >= 2.9) or "
    "torchprobe.export_onnx(model, inputs, path), and run the engine on that file"
)

#: ops whose output has exactly the error of their first input, for every metric (they permute or
#: replicate values): a module input made by one of them diverges exactly when its source does.
_SAME_ERROR = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Expand", "Tile"})
#: ops that make floats from integer/bool inputs and constants without arithmetic (attention masks).
_FROM_MASKS = frozenset({"Where", "Cast", "CastLike"})


class Origin(str, Enum):
    """Where a diverging module output's error comes from, judged on the engine's own tensors."""

    INTRODUCED = "introduced"  # every input matches the reference, the output does not
    INHERITED = "inherited"  # an input already diverges

    def __str__(self) -> str:
        return self.value


# ------------------------------------------------------------------------------------ scopes


@dataclass(frozen=True)
class ScopeCall:
    """One module call in an ONNX graph: its call key, and the ONNX tensors it returns and takes.

    ``key`` is the call key of :func:`torchprobe.record` (``blocks.0.attn``, ``blocks.0.attn#1``,
    ``(root)``). ``outputs`` are in graph order (for the root: the graph outputs, in order);
    ``leaves`` names their leaf paths where the file records them (graph outputs of a file
    written by :func:`export_onnx`), else None.
    """

    key: str
    module: str
    module_type: str
    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    leaves: tuple[str, ...] | None = None

    def output_keys(self) -> tuple[str, ...]:
        """Row keys of the outputs: ``key`` for a lone output, ``key:0``, ``key:1``, ... else."""
        if self.leaves is not None and len(self.leaves) == len(self.outputs):
            return tuple(leaf_key(self.key, leaf) for leaf in self.leaves)
        if len(self.outputs) == 1:
            return (self.key,)
        return tuple(leaf_key(self.key, str(i)) for i in range(len(self.outputs)))


@dataclass(frozen=True)
class _Value:
    shape: tuple[int | str, ...] | None
    kind: str | None  # floating, integer, bool, complex, other


@dataclass(frozen=True, repr=False)
class OnnxScopes:
    """Every module call of an ONNX graph, read from its node scopes (see :func:`onnx_scopes`)."""

    path: Path
    calls: tuple[ScopeCall, ...]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    #: True when call indices come from :func:`export_onnx`'s metadata (exact); False when they
    #: are inferred from the node order (back-to-back calls with nothing in between merge).
    exact: bool
    values: Mapping[str, _Value] = field(default_factory=dict)
    producers: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)  # value -> (op, inputs)
    constants: frozenset[str] = frozenset()

    def names(self) -> dict[str, str]:
        """ONNX tensor name -> row key; a tensor several nested modules return is named by the innermost."""
        names: dict[str, str] = {}
        for call in self.calls:  # parents open before their children: the innermost writes last
            names.update(zip(call.outputs, call.output_keys()))
        return names

    def match(self, reference: Any) -> ScopeMatch:
        """Pair the row keys of a reference with ONNX tensors: a Recording, a Dump, or a mapping
        of row key -> (shape, dtype) in call order.

        Calls pair by module and call index; leaves by name where the file records them, else in
        order when every shape and dtype kind agrees, else by the one output of a fitting shape.
        A module whose number of calls differs from the reference's (calls merged or dropped by
        the export) is left unmatched rather than guessed.
        """
        ref = {key: _shape_kind(value) for key, value in _reference_of(reference).items()}
        by_module: dict[str, list[ScopeCall]] = {}
        for call in self.calls:
            by_module.setdefault(call.module, []).append(call)
        groups: dict[str, list[tuple[str, str]]] = {}  # call key -> [(leaf, row key)]
        for key in ref:
            call_key, _, leaf = key.partition(":")
            groups.setdefault(call_key, []).append((leaf, key))
        counts = Counter(_split_call(k)[0] for k in groups)

        outputs: dict[str, str] = {}
        inputs: dict[str, tuple[str, ...]] = {}
        unmatched: dict[str, str] = {}
        for call_key, leaves in groups.items():
            module, index = _split_call(call_key)
            calls = by_module.get(module, [])
            call = None
            if not calls:
                reason = (
                    "no ONNX node carries its scope: it runs no op of its own (dropout, identity) or the "
                    "exporter folded it into a neighbour (constant folding, conv + batch norm)"
                )
            elif self.exact:
                call = next((c for c in calls if c.key == call_key), None)
                reason = "this call has no ONNX nodes"
            elif len(calls) != counts[module]:
                reason = f"{counts[module]} calls in the reference, {len(calls)} in the ONNX graph"
            else:
                call = calls[index] if index < len(calls) else None
                reason = "this call has no ONNX nodes"
            if call is None:
                unmatched.update((key, reason) for _, key in leaves)
                continue
            paired = self._pair(call, leaves, ref)
            for _, key in leaves:
                if key in paired:
                    outputs[key] = paired[key]
                    inputs[key] = call.inputs
                else:
                    unmatched[key] = f"no output of {call.key} in the ONNX graph fits its shape and dtype"
        return ScopeMatch(MappingProxyType(outputs), MappingProxyType(inputs), MappingProxyType(unmatched), self)

    def _pair(self, call: ScopeCall, leaves: list[tuple[str, str]], ref: Mapping[str, tuple]) -> dict[str, str]:
        outs = call.outputs
        if call.leaves is not None and len(call.leaves) == len(outs):
            named = dict(zip(call.leaves, outs))
            return {key: named[leaf] for leaf, key in leaves if leaf in named and self._fits(ref[key], named[leaf])}
        if len(outs) == len(leaves) and all(self._fits(ref[key], o) for (_, key), o in zip(leaves, outs)):
            return {key: o for (_, key), o in zip(leaves, outs)}
        paired: dict[str, str] = {}
        fitting = {key: [o for o in outs if self._fits(ref[key], o)] for _, key in leaves}
        for key, candidates in fitting.items():
            if len(candidates) == 1 and sum(candidates[0] in c for c in fitting.values()) == 1:
                paired[key] = candidates[0]
        return paired

    def fits(self, name: str, shape: Sequence[int] | None, dtype: Any = None) -> bool:
        """Whether a tensor of ``shape`` and ``dtype`` can be ONNX tensor ``name`` (symbolic dims fit any size)."""
        return self._fits((None if shape is None else tuple(shape), _torch_kind(dtype)), name)

    def shape_of(self, name: str) -> tuple[int | str, ...] | None:
        """The ONNX file's shape of tensor ``name`` (str for symbolic dims), or None when it records none."""
        value = self.values.get(name)
        return None if value is None else value.shape

    def _fits(self, reference: tuple, name: str) -> bool:
        shape, kind = reference
        value = self.values.get(name)
        if value is None:
            return True
        if value.kind is not None and kind is not None and value.kind != kind:
            return False
        if value.shape is None or shape is None:
            return True
        return len(value.shape) == len(shape) and all(
            isinstance(d, str) or d == s for d, s in zip(value.shape, shape)
        )

    def status(self, name: str, known: Mapping[str, bool], _memo: dict | None = None) -> bool | None:
        """Whether ONNX tensor ``name`` matches the reference: True, False, or None (cannot tell).

        ``known`` holds the verdicts of compared tensors. Graph inputs match (the engine ran on the
        reference's inputs), and so do integer and bool constants. A Transpose/Reshape/... of a
        judged tensor has its verdict; a value computed only from integers and bools (masks,
        indices, shapes), or a Where/Cast of them with constant branches, is exact when they are.
        Anything computed from floats, and float constants (weights: the deployed ones may
        differ), cannot be told.
        """
        memo: dict[str, bool | None] = {} if _memo is None else _memo
        if name in known:
            return known[name]
        if name in memo:
            return memo[name]
        memo[name] = None  # a cycle (not in a valid graph) stays unknown
        memo[name] = verdict = self._judge(name, known, memo)
        return verdict

    def _judge(self, name: str, known: Mapping[str, bool], memo: dict) -> bool | None:
        if name in self.graph_inputs:
            return True
        floating = self._kind(name) == "floating"
        if name in self.constants:
            return None if floating else True
        producer = self.producers.get(name)
        if producer is None:
            return None
        op, inputs = producer
        if op in _SAME_ERROR:
            return self.status(inputs[0], known, memo) if inputs else None
        if any(self._kind(i) == "floating" and i not in self.constants for i in inputs):
            return None
        if floating and op not in _FROM_MASKS:
            return None
        verdicts = [self.status(i, known, memo) for i in inputs if i not in self.constants]
        if any(v is False for v in verdicts):
            return False
        return True if all(v is True for v in verdicts) else None

    def _kind(self, name: str) -> str | None:
        value = self.values.get(name)
        return None if value is None else value.kind

    def __repr__(self) -> str:
        how = "exact call indices" if self.exact else "call indices from node order"
        return f"OnnxScopes({str(self.path)!r}, {len(self.calls)} module calls, {how})"


@dataclass(frozen=True, repr=False)
class ScopeMatch:
    """Reference row keys paired with ONNX tensors (from :meth:`OnnxScopes.match`).

    ``outputs``: row key -> the ONNX tensor it is; ``inputs``: row key -> the ONNX input tensors of
    its module call; ``unmatched``: row key -> why no ONNX tensor is it.
    """

    outputs: Mapping[str, str]
    inputs: Mapping[str, tuple[str, ...]]
    unmatched: Mapping[str, str]
    scopes: OnnxScopes

    def origins(self, passed: Mapping[str, bool]) -> dict[str, Origin | None]:
        """Introduced or inherited, for each diverging row of ``passed`` (row key -> within tol).

        A row is *introduced* when every input of its module call matches and *inherited* when
        one diverges; None when it passes or an input cannot be judged from the engine's tensors.
        """
        known: dict[str, bool] = {}
        for key, ok in passed.items():
            name = self.outputs.get(key)
            if name is not None:
                known[name] = known.get(name, True) and bool(ok)
        result: dict[str, Origin | None] = {}
        memo: dict[str, bool | None] = {}
        for key, ok in passed.items():
            result[key] = None
            if ok or key not in self.inputs or not self.inputs[key]:
                continue
            verdicts = [self.scopes.status(name, known, memo) for name in self.inputs[key]]
            if any(v is False for v in verdicts):
                result[key] = Origin.INHERITED
            elif all(v is True for v in verdicts):
                result[key] = Origin.INTRODUCED
        return result

    def __repr__(self) -> str:
        return f"ScopeMatch({len(self.outputs)} matched, {len(self.unmatched)} unmatched)"


def onnx_scopes(path: str | os.PathLike[str]) -> OnnxScopes:
    """Read the module calls of the ONNX file at ``path`` from its node scopes.

    Raises InvalidArgument when the file is missing or is not ONNX, and TorchprobeError when its
    nodes carry no scopes (exported with the TorchScript exporter, ``dynamo=False``, or by a tool
    that drops node metadata), saying how to re-export.
    """
    onnx = _import_onnx()
    path = Path(os.fspath(path))
    if not path.is_file():
        raise InvalidArgument(f"onnx={str(path)!r}: no such file; give the .onnx file the engine was built from")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise InvalidArgument(f"onnx={str(path)!r} is not a readable ONNX model: {_first_line(e)}") from e
    return _scopes_of(model, path)


def onnx_names(path: str | os.PathLike[str], reference: Any = None) -> dict[str, str]:
    """ONNX tensor name -> torchprobe row key, for every tensor that is a module call's output.

    Without ``reference`` the keys come from the file alone: ``name`` (``name#k`` for the k-th
    repeated call) for a module with one output, ``name:0``, ``name:1``, ... for several; leaf names
    of the graph outputs where :func:`export_onnx` recorded them (``(root):logits``). With
    ``reference`` (a :class:`~torchprobe.Recording`, a :class:`~torchprobe.Dump`, or a mapping of
    row key -> (shape, dtype)) the keys are the reference's own, paired by call and shape, so they
    are exactly what ``record()`` writes for the model (``encoder:last_hidden_state``). A tensor
    that several nested modules return is named after the innermost; :func:`onnx_scopes` has all.

        >>> names = tp.onnx_names("model.onnx", reference=tp.load_dump("fp32.safetensors"))
        >>> names["conv2d_3"]            # a tiny ConvNeXt (transformers' ConvNextModel)
        'encoder.stages.1.downsampling_layer.1'
    """
    scopes = onnx_scopes(path)
    if reference is None:
        return scopes.names()
    matched = scopes.match(reference)
    names: dict[str, str] = {}
    for key, name in matched.outputs.items():  # reference order: children return before parents
        names.setdefault(name, key)
    return names


def _scopes_of(model: Any, path: Path) -> OnnxScopes:
    graph = model.graph
    metadata = {p.key: p.value for p in model.metadata_props}
    exact_calls = _json_entry(metadata, CALLS, path)
    out_leaves = _json_entry(metadata, OUTPUTS, path)
    chains_table = exact_calls.get("chains") if isinstance(exact_calls, dict) else None
    node_chain = exact_calls.get("nodes") if isinstance(exact_calls, dict) else None
    exact = isinstance(chains_table, list) and isinstance(node_chain, dict)

    initializers = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    graph_inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    graph_outputs = tuple(o.name for o in graph.output)
    values = _value_types(graph)

    nodes: list[tuple[Any, tuple[str, ...] | None, list[str] | None]] = []  # (node, module chain, classes)
    scoped = 0
    for node in graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = _literal_list(props.get(SCOPES))
        classes = _literal_list(props.get(CLASSES))
        chain = None
        if scopes is not None and len(scopes) >= 2:
            scoped += 1
            modules = tuple(ROOT if s == "" else s for s in scopes[:-1])
            if exact:
                index = node_chain.get(scopes[-1])
                known = chains_table[index] if isinstance(index, int) and 0 <= index < len(chains_table) else None
                chain = tuple(known) if isinstance(known, list) and len(known) == len(modules) else modules
            else:
                chain = modules
        nodes.append((node, chain, classes))
    if not scoped:
        raise TorchprobeError(
            f"{path} has no module scopes ({SCOPES} node metadata): it was exported with the TorchScript "
            f"exporter (dynamo=False) or by a tool that drops node metadata; {REEXPORT}"
        )
    if scoped < len(nodes):
        logger.debug("%s: %d of %d nodes carry no module scope", path, len(nodes) - scoped, len(nodes))

    constants = set(initializers)
    producers: dict[str, tuple[str, tuple[str, ...]]] = {}
    consumers: dict[str, list[int]] = {}
    for i, (node, _, _) in enumerate(nodes):
        ins = [n for n in node.input if n]
        if node.op_type == "Constant" or all(n in constants for n in ins) and node.op_type not in ("RandomNormal", "RandomUniform"):
            constants.update(o for o in node.output if o)
        for o in node.output:
            if o:
                producers[o] = (node.op_type, tuple(ins))
        for n in ins:
            consumers.setdefault(n, []).append(i)

    frames = _frames(nodes, exact)
    calls: list[ScopeCall] = []
    outputs_set = set(graph_outputs)
    for key, module, module_type, members in frames:
        member_set = set(members)
        produced: list[str] = []
        produced_set: set[str] = set()
        used: dict[str, None] = {}  # ordered set
        for i in members:
            node = nodes[i][0]
            for n in node.input:
                if n and n not in produced_set and n not in constants:
                    used.setdefault(n)
            for o in node.output:
                if o:
                    produced.append(o)
                    produced_set.add(o)
        if module == ROOT:
            outs = graph_outputs
        else:
            outs = tuple(
                o for o in produced
                if o not in constants
                and (o in outputs_set or any(c not in member_set for c in consumers.get(o, ())))
            )
        ins = tuple(n for n in used if n not in produced_set)
        leaves = tuple(out_leaves) if module == ROOT and isinstance(out_leaves, list) else None
        calls.append(ScopeCall(key, module, module_type, outs, ins, leaves))
    return OnnxScopes(
        path=path,
        calls=tuple(c for c in calls if c.outputs),
        graph_inputs=graph_inputs,
        graph_outputs=graph_outputs,
        exact=exact,
        values=MappingProxyType(values),
        producers=MappingProxyType(producers),
        constants=frozenset(constants),
    )


def _frames(nodes: Sequence[tuple[Any, tuple[str, ...] | None, Any]], exact: bool) -> list[tuple[str, str, str, list[int]]]:
    """Module calls as (call key, module, module type, node indices), parents before children.

    With exact chains (call keys from export_onnx) a call is every node whose chain names it.
    Otherwise a call is a maximal run of consecutive nodes inside the module's scope, numbered per
    module in order. A node without a scope belongs to the calls its neighbours share.
    """
    chains: list[tuple[str, ...] | None] = [c for _, c, _ in nodes]
    resolved: list[tuple[str, ...]] = []
    for i, chain in enumerate(chains):
        if chain is not None:
            resolved.append(chain)
            continue
        before = next((c for c in reversed(chains[:i]) if c is not None), ())
        after = next((c for c in chains[i + 1:] if c is not None), ())
        common = []
        for a, b in zip(before, after):
            if a != b:
                break
            common.append(a)
        resolved.append(tuple(common))

    frames: dict[Any, tuple[str, str, str, list[int]]] = {}
    order: list[Any] = []
    counts: Counter = Counter()
    open_stack: list[tuple[str, Any]] = []  # (module, identity)
    for i, chain in enumerate(resolved):
        if exact:
            for depth, call_key in enumerate(chain):
                ident = call_key
                if ident not in frames:
                    module = call_key.partition("#")[0]
                    frames[ident] = (call_key, module, _type_at(nodes, i, depth, chain), [])
                    order.append(ident)
                frames[ident][3].append(i)
            continue
        keep = 0
        while keep < len(open_stack) and keep < len(chain) and open_stack[keep][0] == chain[keep]:
            keep += 1
        del open_stack[keep:]
        for depth in range(keep, len(chain)):
            module = chain[depth]
            index = counts[module]
            counts[module] += 1
            ident = (module, index)
            key = module if index == 0 else f"{module}#{index}"
            frames[ident] = (key, module, _type_at(nodes, i, depth, chain), [])
            order.append(ident)
            open_stack.append((module, ident))
        for _, ident in open_stack:
            frames[ident][3].append(i)
    return [frames[ident] for ident in order]


def _type_at(nodes: Sequence[tuple[Any, Any, list[str] | None]], i: int, depth: int, chain: tuple[str, ...]) -> str:
    classes = nodes[i][2]
    if classes and len(classes) == len(chain) + 1:
        return classes[depth].rsplit(".", 1)[-1]
    return ""


def _value_types(graph: Any) -> dict[str, _Value]:
    onnx = _import_onnx()
    values: dict[str, _Value] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        t = info.type
        if not t.HasField("tensor_type"):
            continue
        tt = t.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
            )
        name = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type else ""
        values[info.name] = _Value(shape, _onnx_kind(name))
    return values


def _onnx_kind(name: str) -> str | None:
    if not name or name == "UNDEFINED":
        return None
    if name == "BOOL":
        return "bool"
    if name.startswith("COMPLEX"):
        return "complex"
    if name.startswith(("FLOAT", "DOUBLE", "BFLOAT")):
        return "floating"
    if name.startswith(("INT", "UINT")):
        return "integer"
    return "other"


def _torch_kind(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name == "bool":
        return "bool"
    if name.startswith("complex"):
        return "complex"
    if name.startswith(("float", "bfloat", "half", "double")):
        return "floating"
    if name.startswith(("int", "uint", "long", "short")):
        return "integer"
    return "other"


def _shape_kind(value: Any) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, kind) of a reference entry: (shape, dtype), an object with .shape/.dtype, or a shape."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None and isinstance(value, tuple) and len(value) == 2 and not isinstance(value[1], int):
        shape, dtype = value
    elif shape is None and isinstance(value, (tuple, list)):
        shape = value
    return (None if shape is None else tuple(int(d) for d in shape)), _torch_kind(dtype)


def _reference_of(reference: Any) -> dict[str, Any]:
    rows = getattr(reference, "rows", None)
    if rows is not None and not isinstance(reference, Mapping):  # a Recording
        return {row.key: (tuple(row.shape), row.dtype) for row in rows}
    info = getattr(reference, "info", None)
    order = getattr(reference, "order", None)
    if callable(info) and order is not None:  # a Dump
        return {key: info(key) for key in order}
    if isinstance(reference, Mapping):
        return dict(reference)
    raise InvalidArgument(
        f"reference must be a Recording, a Dump, or a mapping of row key -> (shape, dtype); "
        f"got {type(reference).__name__}"
    )


def _split_call(call_key: str) -> tuple[str, int]:
    module, sep, index = call_key.rpartition("#")
    if sep and index.isdigit():
        return module, int(index)
    return call_key, 0


def _literal_list(text: str | None) -> list[str] | None:
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _json_entry(metadata: Mapping[str, str], key: str, path: Path) -> Any:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        logger.warning("%s: unreadable %s metadata; call indices are inferred from node order", path, key)
        return None


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise TorchprobeError(
            f"reading ONNX files needs the onnx package ({e}); pip install 'torchprobe[polygraphy]'"
        ) from e
    return onnx


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


# ------------------------------------------------------------------------------------ export


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote: the model, and its inputs for the engine tools."""

    onnx: Path
    inputs_json: Path  # Polygraphy: polygraphy run model.onnx --load-inputs inputs_json
    inputs_npz: Path  # numpy.load(inputs_npz): one array per ONNX input name
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def export_onnx(
    model: torch.nn.Module,
    inputs: Any,
    path: str | os.PathLike[str],
    *,
    inputs_json: str | os.PathLike[str] | None = None,
    inputs_npz: str | os.PathLike[str] | None = None,
    **export_options: Any,
) -> OnnxExport:
    """Export ``model`` with ``torch.onnx.export(..., dynamo=True)`` and write its inputs too.

    ``inputs`` is a tensor, a tuple of positional args or a dict of keyword args, as for
    :func:`torchprobe.dump`. Besides ``path``, the inputs are written as a Polygraphy
    ``--load-inputs`` JSON (default ``<stem>.inputs.json``) and an ``.npz`` keyed by ONNX input
    name (default ``<stem>.inputs.npz``), so the engine runs on exactly the reference's inputs.
    ``export_options`` go to ``torch.onnx.export`` (``opset_version``, ``dynamic_shapes``, ...).
    The file also records each node's exact module call and the graph outputs' leaf names
    (model metadata ``torchprobe.calls``/``torchprobe.outputs``), so repeated calls and dict
    outputs are named exactly. The export runs on a copy; ``model`` is not changed.

        >>> exp = tp.export_onnx(model, images, "model.onnx")
        >>> exp.inputs_json
        PosixPath('model.inputs.json')
        $ polygraphy run model.onnx --trt --fp16 --trt-outputs mark all \\
              --load-inputs model.inputs.json --save-outputs engine.json
    """
    if not isinstance(model, torch.nn.Module):
        raise InvalidArgument(f"model must be an nn.Module; got {type(model).__name__}")
    path = Path(os.fspath(path))
    json_path = Path(os.fspath(inputs_json)) if inputs_json is not None else path.with_name(path.stem + ".inputs.json")
    npz_path = Path(os.fspath(inputs_npz)) if inputs_npz is not None else path.with_name(path.stem + ".inputs.npz")
    for p in (path, json_path, npz_path):
        if not p.parent.is_dir():
            raise InvalidArgument(f"cannot write {p}: directory {p.parent} does not exist; create it first")
    for bad in ("f", "dynamo", "verbose"):
        if bad in export_options:
            raise InvalidArgument(f"export_onnx sets {bad}= itself; leave it out of the export options")
    _import_onnx()
    args, kwargs = as_call(inputs)

    copied = copy.deepcopy(model).eval()  # as tp.dump runs it: deployment graphs are inference graphs
    try:
        program = torch.onnx.export(copied, args, kwargs=kwargs or None, dynamo=True, verbose=False, **export_options)
    except Exception as e:
        raise TorchprobeError(f"torch.onnx.export(dynamo=True) failed: {type(e).__name__}: {_first_line(e)}") from e
    graph = program.model.graph
    input_names = tuple(v.name for v in graph.inputs)
    output_names = tuple(v.name for v in graph.outputs)
    feeds = _feeds(args, kwargs, input_names)
    _record_calls(program, copied, len(output_names))

    _save_program(program, path)
    _write_inputs(feeds, json_path, npz_path)
    logger.info("exported %s (%d inputs, %d outputs)", path, len(input_names), len(output_names))
    return OnnxExport(path, json_path, npz_path, input_names, output_names)


def _feeds(args: tuple, kwargs: dict, input_names: Sequence[str]) -> dict[str, Any]:
    from torch.utils import _pytree as pytree

    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if len(leaves) != len(input_names):
        raise TorchprobeError(
            f"the exported graph has {len(input_names)} inputs ({', '.join(input_names)}) but inputs hold "
            f"{len(leaves)} tensors; pass only tensors the model's forward uses"
        )
    return {name: t.detach().to("cpu").contiguous().numpy() for name, t in zip(input_names, leaves)}


def _record_calls(program: Any, model: torch.nn.Module, n_outputs: int) -> None:
    """Store each FX node's exact call keys (and the graph outputs' leaf paths) in the model."""
    ep = program.exported_program
    names = module_names(model)
    canonical = {alias: n.name for n in names.values() for alias in (n.name, *n.aliases)}
    canonical[""] = ROOT
    shared = {n.name for n in names.values() if n.aliases}

    first_seen: dict[str, list[str]] = {}  # canonical -> call identities in order (shared modules)
    chains: list[list[str]] = []
    chain_index: dict[tuple[str, ...], int] = {}
    node_chain: dict[str, int] = {}
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        chain = []
        for ident, (qualname, _) in stack.items():
            name = canonical.get(qualname, qualname or ROOT)
            head, sep, tail = ident.rpartition("@")
            index = int(tail) if sep and tail.isdigit() else 0
            if name in shared:  # record() counts calls of the module over all its names
                seen = first_seen.setdefault(name, [])
                if ident not in seen:
                    seen.append(ident)
                index = seen.index(ident)
            chain.append(name if index == 0 else f"{name}#{index}")
        key = tuple(chain)
        if key not in chain_index:
            chain_index[key] = len(chains)
            chains.append(chain)
        node_chain[node.name] = chain_index[key]
    metadata = program.model.metadata_props
    metadata[CALLS] = json.dumps({"chains": chains, "nodes": node_chain}, separators=(",", ":"))

    spec = ep.call_spec.out_spec if ep.call_spec is not None else None
    if spec is not None:
        from torch.utils import _pytree as pytree

        try:
            placeholder = pytree.tree_unflatten([torch.empty(0) for _ in range(spec.num_leaves)], spec)
            leaves = [path for path, _ in named_leaves(placeholder)]
        except Exception as e:  # a container whose unflatten needs real values
            logger.debug("output leaf names not recorded: %s", e)
            return
        if len(leaves) == n_outputs:
            metadata[OUTPUTS] = json.dumps(leaves)


def _save_program(program: Any, path: Path) -> None:
    """Save in a temp folder next to ``path``, then move it (and any external data) into place."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(tmp_dir / path.name)
        written = sorted(tmp_dir.iterdir(), key=lambda p: p.name == path.name)  # the model last
        for p in written:
            os.replace(p, path.parent / p.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_inputs(feeds: Mapping[str, Any], json_path: Path, npz_path: Path) -> None:
    import numpy as np

    encoded = {}
    for name, array in feeds.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        # Polygraphy's JSON encoding of a NumPy array (polygraphy/json/serde.py), one feed dict per iteration.
        encoded[name] = {"array": base64.b64encode(buffer.getvalue()).decode(), "polygraphy_class": "ndarray"}
    write_text(json_path, json.dumps([encoded]))
    with atomic_path(npz_path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **feeds)
