"""Offline comparison of two activation dumps, key by key, in the reference's call order.

The second dump of a comparison may come from another tool or machine (a TensorRT engine's
outputs, a C++ runtime): any safetensors file works there, and ``mapping`` renames its keys.

Example::

    import torch, torchprobe as tp
    from torchprobe.io.dumps import save_dump

    torch.manual_seed(0)
    ref = {f"blocks.{i}.norm": torch.randn(4, 64) * (i + 1) for i in range(6)}
    low = {k: v.half() for k, v in ref.items()}
    low["blocks.3.norm"] = low["blocks.3.norm"] * 1.5           # a divergence from block 3 on
    save_dump("fp32.safetensors", ref, target="fp32")
    save_dump("fp16.safetensors", low, target="strict:fp16")
    cmp = tp.compare("fp32.safetensors", "fp16.safetensors")
    print(cmp); raise SystemExit(cmp.exit_code)

prints::

    1 of 6 tensors diverges (rel_l2 > 0.01); first divergence: blocks.3.norm (rel_l2 0.5)
    a: fp32.safetensors [fp32]   b: fp16.safetensors [strict:fp16]

      #  key            shape    dtype                 max_abs    rel_l2    cosine    sqnr dB  status
    ---  -------------  -------  ------------------  ---------  --------  --------  ---------  --------
      0  blocks.0.norm  (4, 64)  float32 vs float16   0.000827  0.000204         1       73.8  ok
      1  blocks.1.norm  (4, 64)  float32 vs float16    0.00181  0.000195         1       74.2  ok
      2  blocks.2.norm  (4, 64)  float32 vs float16    0.00369  0.000214         1       73.4  ok
      3  blocks.3.norm  (4, 64)  float32 vs float16       6.23       0.5         1       6.02  DIVERGE
      4  blocks.4.norm  (4, 64)  float32 vs float16    0.00389  0.000202         1       73.9  ok
      5  blocks.5.norm  (4, 64)  float32 vs float16    0.00685  0.000214         1       73.4  ok

Read it as: FP16 storage costs ~2e-4 relative error per tensor (SQNR ~74 dB), and block 3 alone
is off by 50% -- cosine stays 1 because the error is a pure scale, which is why rel_l2 is the
default metric. ``#`` numbers the compared rows in a's call order.
"""
from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from pathlib import Path
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from .distributed import merge_error_vectors
from .errors import InvalidArgument
from .io.dumps import Dump, PathLike, _few, load_dump
from .io.engine_outputs import link_engine
from .io.jsonable import json_float
from .metrics import ErrorMetrics, error_vector, from_vector, get_metric, measure

__all__ = ["DumpComparison", "TensorComparison", "compare"]

logger = logging.getLogger(__name__)

#: dtypes that metrics.measure takes as they are; anything else is upcast to float64 first.
_MEASURED_AS_IS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TensorComparison:
    """One key of dump a against its counterpart in dump b.

    ``metrics`` is None when the tensors could not be compared (``problem`` says why: a shape or
    dtype-kind mismatch). ``problem`` also notes NaN/Inf positions that differ. ``key_b`` is b's
    key when a mapping renamed it, else None. ``origin`` (compare with ``onnx=``) says whether a
    diverging module's error is ``introduced`` (its inputs in b match) or ``inherited``.
    """

    key: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: torch.dtype
    dtype_b: torch.dtype
    metrics: ErrorMetrics | None
    passed: bool
    problem: str | None
    key_b: str | None = None
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "key_b": self.key_b if self.key_b is not None else self.key,
            "shape_a": list(self.shape_a),
            "shape_b": list(self.shape_b),
            "dtype_a": _dtype_str(self.dtype_a),
            "dtype_b": _dtype_str(self.dtype_b),
            "metrics": None
            if self.metrics is None
            else {name: json_float(self.metrics[name]) for name in ErrorMetrics.__dataclass_fields__},
            "passed": self.passed,
            "problem": self.problem,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class DumpComparison:
    """The result of :func:`compare`: one row per common key, in dump a's call order.

    ``bool(cmp)`` is True when every common tensor is within tolerance and no key of a is missing
    from b; ``cmp.exit_code`` is 0 then, 1 otherwise. ``cmp[key]`` is the row of one key of a.
    """

    rows: tuple[TensorComparison, ...]
    missing: tuple[str, ...]
    extra: tuple[str, ...]
    metric: str
    tol: float
    a: str
    b: str
    target_a: str | None = None
    target_b: str | None = None
    mapping: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: with ``onnx=``: the ONNX file, and a's keys that have no tensor in b (not a failure)
    onnx: str | None = None
    unmatched: tuple[str, ...] = ()

    def first_divergence(self) -> TensorComparison | None:
        """The first row in call order that is not within tolerance, or None."""
        return next((row for row in self.rows if not row.passed), None)

    def diverging(self) -> tuple[TensorComparison, ...]:
        return tuple(row for row in self.rows if not row.passed)

    def __bool__(self) -> bool:
        """True only when something was compared, all of it is within tolerance, and no key of a
        is missing from b (an empty comparison is not a pass)."""
        return bool(self.rows) and not self.missing and all(row.passed for row in self.rows)

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    def __getitem__(self, key: str) -> TensorComparison:
        for row in self.rows:
            if row.key == key:
                return row
        where = "is missing from b" if key in self.missing else "is not a key of a"
        raise KeyError(f"{key!r} {where}; compared keys: {_few([r.key for r in self.rows])}")

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[TensorComparison]:
        return iter(self.rows)

    def verdict(self) -> str:
        """One line: how many tensors diverge and where the first divergence is."""
        from .render.compare import comparison_verdict

        return comparison_verdict(self)

    def to_text(self, max_rows: int | None = 40, context: int = 2) -> str:
        """Verdict, sources, a table in call order, then missing and extra keys.

        Tables longer than ``max_rows`` keep the diverging rows (else the worst ones) with
        ``context`` rows around each, and the last row; skipped stretches read ``... N more``.
        """
        from .render.compare import comparison_text

        return comparison_text(self, max_rows, context)

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return (
            f"DumpComparison({len(self.rows)} compared, {len(self.diverging())} diverge, "
            f"{len(self.missing)} missing, {len(self.extra)} extra; {self.metric} tol={self.tol:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; non-finite metric values become the strings 'inf', '-inf', 'nan'."""
        first = self.first_divergence()
        return {
            "a": self.a,
            "b": self.b,
            "target_a": self.target_a,
            "target_b": self.target_b,
            "metric": self.metric,
            "tol": json_float(self.tol),
            "passed": bool(self),
            "exit_code": self.exit_code,
            "verdict": self.verdict(),
            "first_divergence": None if first is None else first.key,
            "rows": [row.to_dict() for row in self.rows],
            "missing": list(self.missing),
            "extra": list(self.extra),
            "mapping": dict(self.mapping),
            "onnx": self.onnx,
            "unmatched": list(self.unmatched),
        }

    def badness(self, row: TensorComparison) -> float:
        """How bad a row is under this comparison's metric (grows as it gets worse)."""
        if row.metrics is None:
            return math.inf
        return get_metric(self.metric).badness(row.metrics[self.metric])

    def worst(self) -> TensorComparison | None:
        return max(self.rows, key=self.badness, default=None)


def compare(
    a: PathLike | Dump,
    b: PathLike | Dump,
    *,
    tol: float = 1e-2,
    metric: str = "rel_l2",
    mapping: Mapping[str, str] | PathLike | None = None,
    onnx: PathLike | None = None,
    runner: str | None = None,
    by_rank: bool = False,
) -> DumpComparison | tuple[DumpComparison, ...]:
    """Compare dump ``b`` (under test) with dump ``a`` (the reference), key by key.

    ``a`` and ``b`` are paths or :class:`Dump` objects. Neither needs torchprobe metadata (``b``
    may come from another tool or machine); keys are taken in a's call order, or natural name
    order when a records none. ``mapping`` (a dict, or a path to a JSON object) maps keys of a to
    keys of b; keys it leaves out are matched by identical name.

    With ``onnx`` (the ONNX file the engine was built from, exported with ``dynamo=True``), ``b``
    is an engine's outputs keyed by ONNX tensor name: a Polygraphy ``--save-outputs`` JSON
    (``runner`` picks one; default the first that is not the reference), an .npz or a
    safetensors file. Its tensors are named by module through the ONNX scopes
    (:mod:`torchprobe.io.engine_outputs`); a's keys without an engine tensor are listed as
    ``unmatched`` (not a failure), and each diverging row gets an ``origin``.

    For each common key, both tensors are upcast to float64 and measured with every metric of
    :mod:`torchprobe.metrics`; a row passes when ``metric`` is within ``tol`` (``<= tol``, or
    ``>= tol`` for cosine and sqnr, where larger is better) and no NaN/Inf position differs.
    FP16 against FP32 is a normal comparison; a shape mismatch, or dtypes of different kinds
    (bool, integer, floating, complex), is reported as a failing row without metrics.

    Per-rank dumps of a distributed recording (``name.rank<r>.safetensors``, see
    ``rec.save``): ``a`` and ``b`` may each be a list of the rank files of one run, or the name
    without the rank (``"fp32.safetensors"`` finds ``fp32.rank*.safetensors``). Both sets must
    have the same world size; rank r of a is compared with rank r of b, and each row merges the
    ranks' error sums (values a lower rank also holds counted once), so it measures the whole
    logical tensor. ``by_rank=True`` returns one comparison per rank instead. A set that mixes
    runs, world sizes or repeats a rank is refused, naming the files.

    Example::

        cmp = torchprobe.compare("fp32.safetensors", "engine.safetensors",
                                 mapping={"head:logits": "output0"})
        print(cmp); cmp.first_divergence(); raise SystemExit(cmp.exit_code)
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or math.isnan(tol) or tol <= 0:
        raise InvalidArgument(f"tol must be a number such as 1e-2 (positive; inf passes anything finite); got {tol!r}")
    get_metric(metric)  # InvalidArgument naming the valid metrics
    if metric not in ErrorMetrics.__dataclass_fields__:
        raise InvalidArgument(
            f"metric={metric!r} is registered but not measured by compare; valid: "
            f"{', '.join(ErrorMetrics.__dataclass_fields__)}"
        )
    set_a, set_b = _rank_set(a, "a"), _rank_set(b, "b")
    if set_a is not None or set_b is not None:
        if onnx is not None or runner is not None:
            raise InvalidArgument("onnx=/runner= compare one engine's outputs; they do not take per-rank dump sets")
        return _compare_ranks(set_a, set_b, a, b, float(tol), metric, mapping, by_rank)
    if by_rank:
        raise InvalidArgument("by_rank=True compares sets of per-rank dumps (name.rank<r>.safetensors); "
                              f"a={_label(a)} and b={_label(b)} are single dumps")
    dump_a = _as_dump(a, "a")
    link = None
    if onnx is not None:  # b holds an engine's tensors keyed by ONNX name (torchprobe.io)
        link = link_engine(b, onnx, {k: dump_a.info(k) for k in dump_a.order}, runner=runner)
        engine = link.engine
        dump_b = Dump(MappingProxyType(dict(engine.tensors)), tuple(engine.tensors),
                      MappingProxyType({"target": engine.runner} if engine.runner else {}), engine.path)
        renames = {**link.mapping, **_load_mapping(mapping, dump_a)}
    elif runner is not None:
        raise InvalidArgument(f"runner={runner!r} picks a Polygraphy runner; it needs onnx=")
    else:
        dump_b = _as_dump(b, "b")
        renames = _load_mapping(mapping, dump_a)

    rows: list[TensorComparison] = []
    missing: list[str] = []
    matched: set[str] = set()
    for key in dump_a.order:
        if link is not None and key not in renames:
            continue  # no engine tensor is this module's output: unmatched, not missing
        key_b = renames.get(key, key)
        if key_b not in dump_b:
            missing.append(key)
            continue
        matched.add(key_b)
        rows.append(_compare_one(dump_a, dump_b, key, key_b, metric, float(tol)))
    extra = tuple(k for k in dump_b.order if k not in matched)
    onnx_fields: dict[str, Any] = {}
    if link is not None:
        origins = link.origins({row.key: row.passed for row in rows})
        rows = [replace(row, origin=None if origins.get(row.key) is None else str(origins[row.key])) for row in rows]
        extra = ()  # b's other tensors are values inside modules, not module outputs
        onnx_fields = {"onnx": str(link.onnx), "unmatched": tuple(k for k in dump_a.order if k not in renames)}
    result = DumpComparison(
        rows=tuple(rows),
        missing=tuple(missing),
        extra=extra,
        metric=metric,
        tol=float(tol),
        a=dump_a.label,
        b=dump_b.label,
        target_a=dump_a.target,
        target_b=dump_b.target,
        mapping=MappingProxyType({k: v for k, v in renames.items() if k != v}),
        **onnx_fields,
    )
    logger.debug("%r", result)
    return result


_RANK_FILE = re.compile(r"^(?P<stem>.*)\.rank(?P<rank>\d+)(?P<suffix>\.[^.]*)?$")


def _label(value: Any) -> str:
    return value.label if isinstance(value, Dump) else repr(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else repr(value)


def _rank_set(value: Any, name: str) -> list[Dump] | None:
    """The rank dumps of one run, in rank order, when ``value`` names a set: a list/tuple of
    dumps, or a path that does not exist beside ``<stem>.rank<r><suffix>`` files. None otherwise."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidArgument(f"{name}=[] names no dump; give the rank files of one run")
        dumps = [_as_dump(v, f"{name}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, (str, os.PathLike)) and not Path(os.fspath(value)).exists():
        p = Path(os.fspath(value))
        stem, suffix = (p.name[: -len(p.suffix)], p.suffix) if p.suffix else (p.name, "")
        found = sorted(f for f in p.parent.glob(f"{_glob_escape(stem)}.rank*{suffix}")
                       if (m := _RANK_FILE.match(f.name)) and m["stem"] == stem and (m["suffix"] or "") == suffix)
        if not found:
            return None  # load_dump names the missing file
        dumps = [load_dump(f, require_torchprobe=False) for f in found]
    else:
        return None
    return _check_rank_set(dumps, name)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _check_rank_set(dumps: list[Dump], name: str) -> list[Dump]:
    labels = ", ".join(d.label for d in dumps)
    plain = [d.label for d in dumps if d.rank is None]
    if plain:
        raise InvalidArgument(f"{name}: {', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not a per-rank dump "
                              "(no rank metadata); a set takes the rank files rec.save/tp.dump wrote under torch.distributed")
    runs = sorted({str(d.run) for d in dumps})
    if len(runs) > 1:
        by_run = "; ".join(f"run {r}: " + ", ".join(d.label for d in dumps if str(d.run) == r) for r in runs)
        raise InvalidArgument(f"{name}: the rank files come from {len(runs)} different recordings ({by_run}); "
                              "a set takes the files of one run only")
    worlds = sorted({d.world_size for d in dumps})
    if len(worlds) > 1:
        raise InvalidArgument(f"{name}: the rank files disagree on the world size ({worlds}): {labels}")
    world = worlds[0]
    ranks = sorted(d.rank for d in dumps)
    if ranks != list(range(world)):
        repeated = sorted({r for r in ranks if ranks.count(r) > 1})
        absent = [r for r in range(world) if r not in ranks]
        problem = "; ".join(p for p in (f"rank {', '.join(map(str, repeated))} repeated" if repeated else "",
                                        f"rank {', '.join(map(str, absent))} missing" if absent else "") if p)
        raise InvalidArgument(f"{name}: a run of world size {world} needs one file per rank 0..{world - 1} ({problem}): {labels}")
    dumps = sorted(dumps, key=lambda d: d.rank)
    for d in dumps[1:]:
        if d.order != dumps[0].order:
            raise InvalidArgument(f"{name}: {d.label} holds other keys than {dumps[0].label} (rank 0); "
                                  "the ranks of one run record the same modules")
    return dumps


def _set_label(dumps: list[Dump]) -> str:
    first = dumps[0]
    if first.path is None:
        return f"<{len(dumps)} rank dumps>"
    m = _RANK_FILE.match(first.path.name)
    stem, suffix = (m["stem"], m["suffix"] or "") if m else (first.path.stem, first.path.suffix)
    return str(first.path.with_name(f"{stem}.rank{{0..{len(dumps) - 1}}}{suffix}"))


def _compare_ranks(set_a: list[Dump] | None, set_b: list[Dump] | None, a: Any, b: Any, tol: float, metric: str,
                   mapping: Any, by_rank: bool) -> DumpComparison | tuple[DumpComparison, ...]:
    if set_a is None or set_b is None:
        single, which = (a, "a") if set_a is None else (b, "b")
        raise InvalidArgument(f"{which}={_label(single)} is one dump but the other side is a set of per-rank dumps; "
                              "compare a set with a set of the same world size (rank r against rank r)")
    if len(set_a) != len(set_b):
        raise InvalidArgument(f"a has {len(set_a)} ranks ({_set_label(set_a)}) and b has {len(set_b)} ({_set_label(set_b)}); "
                              "rank r is compared with rank r: record both with the same world size")
    if by_rank:
        return tuple(compare(x, y, tol=tol, metric=metric, mapping=mapping) for x, y in zip(set_a, set_b))
    first_a, first_b = set_a[0], set_b[0]
    renames = _load_mapping(mapping, first_a)
    rows: list[TensorComparison] = []
    missing: list[str] = []
    matched: set[str] = set()
    for key in first_a.order:
        key_b = renames.get(key, key)
        if key_b not in first_b:
            missing.append(key)
            continue
        matched.add(key_b)
        rows.append(_compare_merged(set_a, set_b, key, key_b, metric, tol))
    return DumpComparison(
        rows=tuple(rows),
        missing=tuple(missing),
        extra=tuple(k for k in first_b.order if k not in matched),
        metric=metric,
        tol=tol,
        a=_set_label(set_a),
        b=_set_label(set_b),
        target_a=first_a.target,
        target_b=first_b.target,
        mapping=MappingProxyType({k: v for k, v in renames.items() if k != v}),
    )


def _compare_merged(set_a: list[Dump], set_b: list[Dump], key: str, key_b: str, metric: str, tol: float) -> TensorComparison:
    """One key over every rank pair: the ranks' error vectors merged (replicas counted once)."""
    vectors = []
    for r, (da, db) in enumerate(zip(set_a, set_b)):
        ia, ib = da.info(key), db.info(key_b)
        if ia.shape != ib.shape or _kind(ia.dtype) != _kind(ib.dtype):  # named without reading values
            row = _compare_one(da, db, key, key_b, metric, tol)
            return replace(row, problem=f"rank {r}: {row.problem}")
        if key not in da.layout.get("replicas", ()):
            vectors.append(error_vector(_measurable(da[key]), _measurable(db[key_b])).tolist())
    metrics = from_vector(merge_error_vectors(vectors))
    info_a, info_b = set_a[0].info(key), set_b[0].info(key_b)
    shape_a = tuple(set_a[0].layout.get("global_shapes", {}).get(key, info_a.shape))
    shape_b = tuple(set_b[0].layout.get("global_shapes", {}).get(key_b, info_b.shape))
    problem = None
    if metrics.nonfinite_mismatch:
        problem = f"{int(metrics.nonfinite_mismatch)} NaN/Inf positions differ"
    elif metrics.nonfinite_both:
        problem = f"{int(metrics.nonfinite_both)} NaN/Inf in both (undefined error)"
    passed = get_metric(metric).passes(metrics[metric], tol) and metrics.finite
    return TensorComparison(key, shape_a, shape_b, info_a.dtype, info_b.dtype, metrics, passed, problem,
                            key_b if key_b != key else None)


def _as_dump(value: Any, name: str) -> Dump:
    if isinstance(value, Dump):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_dump(value, require_torchprobe=False)
    raise InvalidArgument(
        f"{name} must be a path to a .safetensors dump or a Dump; got {type(value).__name__}"
    )


def _load_mapping(mapping: Any, dump_a: Dump) -> dict[str, str]:
    if mapping is None:
        return {}
    source = "mapping"
    if isinstance(mapping, (str, os.PathLike)):
        source = f"mapping file {os.fspath(mapping)}"
        try:
            with open(mapping, encoding="utf-8") as f:
                mapping = json.load(f)
        except FileNotFoundError:
            raise InvalidArgument(
                f"{source} does not exist; pass a JSON object {{key_in_a: key_in_b}} or a dict"
            ) from None
        except (OSError, ValueError) as e:
            raise InvalidArgument(f"{source} is not a readable JSON object: {e}") from e
    if not isinstance(mapping, Mapping):
        raise InvalidArgument(
            f"{source} must be a JSON object / dict of key_in_a -> key_in_b; got {type(mapping).__name__}"
        )
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise InvalidArgument(
            f"{source} must map str keys to str keys; bad entries: {_few([repr(k) for k in bad])}"
        )
    unknown = [k for k in mapping if k not in dump_a]
    if unknown:
        hints = []
        for k in unknown[:3]:
            close = difflib.get_close_matches(k, dump_a.order, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InvalidArgument(
            f"{source} names keys that are not in a ({dump_a.label}): {', '.join(hints)}"
            + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        )
    return dict(mapping)


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def _compare_one(
    dump_a: Dump, dump_b: Dump, key: str, key_b: str, metric: str, tol: float
) -> TensorComparison:
    info_a, info_b = dump_a.info(key), dump_b.info(key_b)
    renamed = key_b if key_b != key else None

    def row(metrics: ErrorMetrics | None, passed: bool, problem: str | None) -> TensorComparison:
        return TensorComparison(
            key, info_a.shape, info_b.shape, info_a.dtype, info_b.dtype, metrics, passed, problem, renamed
        )

    if info_a.shape != info_b.shape:
        problem = f"shape mismatch: {info_a.shape} vs {info_b.shape}"
        if math.prod(info_a.shape) == math.prod(info_b.shape):
            problem += " (same number of elements: reshaped or transposed?)"
        return row(None, False, problem)
    if _kind(info_a.dtype) != _kind(info_b.dtype):
        a_, b_ = info_a.dtype, info_b.dtype
        problem = f"dtype mismatch: {_dtype_str(a_)} ({_kind(a_)}) vs {_dtype_str(b_)} ({_kind(b_)})"
        return row(None, False, problem)
    ref, test = _measurable(dump_a[key]), _measurable(dump_b[key_b])
    metrics = measure(ref, test)
    value = metrics[metric]
    within = get_metric(metric).passes(value, tol)
    problem = None
    if metrics.nonfinite_mismatch:
        problem = f"{int(metrics.nonfinite_mismatch)} NaN/Inf positions differ"
    elif metrics.nonfinite_both:
        problem = f"{int(metrics.nonfinite_both)} NaN/Inf in both (undefined error)"
    return row(metrics, within and metrics.finite, problem)


def _measurable(t: Tensor) -> Tensor:
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    if t.dtype not in _MEASURED_AS_IS:
        t = t.to(torch.float64)
    return t



def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
