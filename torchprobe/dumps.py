"""Activation dumps on disk (safetensors) and offline comparison of two dumps.

A dump holds one tensor per module output leaf, keyed by module name: ``encoder.layers.0.norm``,
``blocks.0.attn#1:0`` (``#k`` is the k-th repeated call, k >= 1; ``:path`` names a leaf inside a
tuple/dict output), ``head:logits``. Its safetensors metadata (all strings) says what it is:

    format="torchprobe-dump"  format_version="1"  torchprobe_version  torch_version
    target="strict:fp16"      order='["stem", "blocks.0.attn", ...]' (keys in call order)
    extra='{...}'             (optional JSON)

The second dump of a comparison may come from another tool or machine (a TensorRT engine's
outputs, a C++ runtime): any safetensors file works there, and ``mapping`` renames its keys.
This module is the one place in torchprobe that reads and writes dump files.

Example::

    import torch, torchprobe as tp
    from torchprobe.dumps import save_dump, compare

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
import errno
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tabulate import tabulate
from torch import Tensor

from .atomic import atomic_path
from .errors import DumpError, InvalidArgument
from .metrics import ErrorMetrics, get_metric, measure

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Dump",
    "DumpComparison",
    "TensorComparison",
    "compare",
    "load_dump",
    "save_dump",
]

logger = logging.getLogger(__name__)

FORMAT = "torchprobe-dump"
FORMAT_VERSION = "1"

PathLike = Union[str, "os.PathLike[str]"]

_FULL_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, n))
#: dtypes that metrics.measure takes as they are; anything else is upcast to float64 first.
_MEASURED_AS_IS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: safetensors dtype codes -> torch dtypes, to read shape and dtype without loading the data.
_ST_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
        "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
        "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
        "C128": "complex128", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}


# --------------------------------------------------------------------------------------- writing


def save_dump(
    path: PathLike,
    tensors: Mapping[str, Tensor],
    *,
    target: str,
    order: Sequence[str] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` as a torchprobe dump; return the path written.

    Tensors are detached, copied to the CPU and made contiguous; the caller's tensors are not
    changed. ``order`` is the call order of the keys (default: the mapping's own order) and must
    name every key exactly once. ``extra`` is any JSON-serializable dict stored with the dump.

    The write is atomic: the file is written to a temporary file in the same directory, fsynced,
    and renamed over ``path``. On any failure, KeyboardInterrupt included, the temporary file is
    removed and an existing file at ``path`` is left as it was.

    Raises InvalidArgument for a bad argument (naming the key) and DumpError when the file cannot
    be written.
    """
    path = _as_path(path, "path")
    checked = _check_tensors(tensors)
    keys = _check_order(order, checked)
    metadata = _metadata(target, keys, extra)

    directory = path.parent
    if not directory.is_dir():
        raise DumpError(f"cannot write dump {path}: directory {directory} does not exist; create it first")
    try:
        # The temporary file is reserved before the (possibly large) device-to-host copies, so an
        # unwritable directory fails at once; atomic_path cleans up after any failure.
        with atomic_path(path) as tmp:
            host = _to_host(checked)
            save_file(host, tmp, metadata=metadata)
    except (OSError, SafetensorError) as e:
        raise DumpError(_write_failure(path, e)) from e
    logger.debug("wrote %d tensors to %s", len(host), path)
    return path


def _as_path(value: Any, name: str) -> Path:
    try:
        return Path(os.fspath(value))
    except TypeError:
        raise InvalidArgument(
            f"{name} must be a file path (str or os.PathLike); got {type(value).__name__}"
        ) from None


def _check_tensors(tensors: Any) -> dict[str, Tensor]:
    if not isinstance(tensors, Mapping):
        raise InvalidArgument(
            f"tensors must be a mapping of str keys to torch.Tensor; got {type(tensors).__name__}"
        )
    checked: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(
                f"tensors has the key {key!r} ({type(key).__name__}); keys must be non-empty str "
                "module names such as 'encoder.layers.0' or 'head:logits'"
            )
        if key == "__metadata__":
            raise InvalidArgument("tensors has the key '__metadata__', which safetensors reserves; rename it")
        if not isinstance(value, Tensor):
            raise InvalidArgument(
                f"tensors[{key!r}] is a {type(value).__name__}, expected a torch.Tensor; "
                "flatten containers into one key per tensor leaf (e.g. 'head:logits')"
            )
        if value.layout != torch.strided:
            raise InvalidArgument(
                f"tensors[{key!r}] has layout {value.layout}; only dense tensors can be dumped: "
                "call .to_dense() first"
            )
        if value.is_meta:
            raise InvalidArgument(f"tensors[{key!r}] is on the meta device and has no values to dump")
        checked[key] = value
    return checked


def _check_order(order: Sequence[str] | None, tensors: Mapping[str, Tensor]) -> list[str]:
    if order is None:
        return list(tensors)
    if isinstance(order, str) or not isinstance(order, Sequence):
        raise InvalidArgument(
            f"order must be a sequence of tensor keys in call order; got {type(order).__name__}"
        )
    keys = list(order)
    seen: set[str] = set()
    duplicates = [k for k in keys if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
    unknown = [k for k in keys if k not in tensors]
    absent = [k for k in tensors if k not in seen]
    if duplicates or unknown or absent:
        problems = []
        if duplicates:
            problems.append(f"repeats {_few(duplicates)}")
        if unknown:
            problems.append(f"names keys that are not in tensors: {_few(unknown)}")
        if absent:
            problems.append(f"leaves out {_few(absent)}")
        raise InvalidArgument(
            f"order must list every key of tensors exactly once, but it {'; '.join(problems)}"
        )
    return keys


def _metadata(target: Any, keys: list[str], extra: dict | None) -> dict[str, str]:
    if not isinstance(target, str) or not target:
        raise InvalidArgument(
            f"target must be a non-empty str naming what produced the tensors, such as 'fp32' or "
            f"'strict:fp16'; got {target!r}"
        )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torchprobe_version": _torchprobe_version(),
        "torch_version": str(torch.__version__),
        "target": target,
        "order": json.dumps(keys),
    }
    if extra is not None:
        if not isinstance(extra, dict):
            raise InvalidArgument(
                f"extra must be a JSON-serializable dict or None; got {type(extra).__name__}"
            )
        try:
            metadata["extra"] = json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"extra must be JSON-serializable: {e}") from e
    return metadata


def _torchprobe_version() -> str:
    import sys

    version = getattr(sys.modules.get(__package__ or "torchprobe"), "__version__", None)
    if isinstance(version, str):
        return version
    from importlib import metadata

    try:
        return metadata.version("torchprobe")
    except metadata.PackageNotFoundError:
        return "unknown"


def _to_host(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared ones)."""
    host: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in tensors.items():
        try:
            t = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        except RuntimeError as e:
            raise InvalidArgument(f"tensors[{key!r}] could not be copied to the CPU: {e}") from e
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()
            else:
                storages.add(ptr)
        host[key] = t
    return host










def _write_failure(path: Path, e: BaseException) -> str:
    code = getattr(e, "errno", None)
    if isinstance(e, IsADirectoryError) or (code is None and path.is_dir()):
        hint = f"{path} is a directory; give a file path such as {path / 'dump.safetensors'}"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the directory is not writable; choose another path"
    elif code in _FULL_ERRNOS or re.search(r"os error (27|28|122)\b", str(e)):  # safetensors: no errno
        hint = "the disk is full or the file is too large; free space or dump fewer tensors"
    else:
        hint = "check that the directory is writable and has free space"
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"could not write dump {path}: {reason}; {hint} (nothing was written to {path})"


# --------------------------------------------------------------------------------------- reading


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


class _LazyTensors(Mapping[str, Tensor]):
    """Tensors of a dump file, read from disk one at a time on access (nothing is cached)."""

    def __init__(self, path: Path, keys: Sequence[str], signature: tuple[int, int, int]):
        self._path = path
        self._keys = tuple(keys)
        self._set = frozenset(keys)
        self._signature = signature

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._set:
            raise KeyError(key)
        with self._open() as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __repr__(self) -> str:
        return f"<{len(self)} tensors read lazily from {self._path}>"

    def info(self, key: str) -> TensorInfo:
        if key not in self._set:
            raise KeyError(key)
        with self._open() as f:
            view = f.get_slice(key)
            shape, code = tuple(view.get_shape()), view.get_dtype()
            dtype = _ST_DTYPES.get(code)
            if dtype is None:
                dtype = f.get_tensor(key).dtype
        return TensorInfo(shape, dtype)

    def _open(self):
        try:
            now = _signature(self._path)
        except OSError as e:
            raise DumpError(
                f"dump {self._path} can no longer be read ({e.strerror}); "
                "it was moved or deleted after loading"
            ) from e
        if now != self._signature:
            raise DumpError(
                f"dump {self._path} changed on disk after it was loaded; load it again with load_dump()"
            )
        try:
            return safe_open(self._path, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise DumpError(f"dump {self._path} can no longer be read: {e}") from e


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


@dataclass(frozen=True, eq=False, repr=False)
class Dump:
    """A dump: tensors keyed by module name, their call order, and the file's metadata.

    ``dump[key]`` reads one tensor; ``dump.keys()`` lists keys in call order; ``dump.tensors`` is
    a mapping (read lazily from disk for a loaded dump). ``path`` is None for an in-memory dump
    made with :meth:`from_tensors`.
    """

    tensors: Mapping[str, Tensor]
    order: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    path: Path | None = None

    @classmethod
    def from_tensors(
        cls,
        tensors: Mapping[str, Tensor],
        *,
        target: str | None = None,
        order: Sequence[str] | None = None,
    ) -> Dump:
        """An in-memory dump (no file), e.g. to compare a recording with a file from elsewhere."""
        checked = _check_tensors(tensors)
        keys = _check_order(order, checked)
        metadata = {} if target is None else {"target": str(target)}
        return cls(MappingProxyType({k: checked[k] for k in keys}), tuple(keys), MappingProxyType(metadata))

    @property
    def target(self) -> str | None:
        return self.metadata.get("target")

    @property
    def is_torchprobe(self) -> bool:
        return self.metadata.get("format") == FORMAT

    @property
    def extra(self) -> dict | None:
        raw = self.metadata.get("extra")
        return None if raw is None else json.loads(raw)

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<in-memory dump>"

    def keys(self) -> tuple[str, ...]:
        return self.order

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.order:
            yield key, self.tensors[key]

    def info(self, key: str) -> TensorInfo:
        """Shape and dtype of one tensor, without reading its values from disk."""
        if isinstance(self.tensors, _LazyTensors):
            return self.tensors.info(key)
        t = self[key]
        return TensorInfo(tuple(t.shape), t.dtype)

    def __getitem__(self, key: str) -> Tensor:
        try:
            return self.tensors[key]
        except KeyError:
            close = difflib.get_close_matches(key, self.order, n=3)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise KeyError(f"{key!r} is not in dump {self.label} ({len(self.order)} tensors){hint}") from None

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __repr__(self) -> str:
        target = f", target={self.target!r}" if self.target else ""
        return f"Dump({self.label!r}, {len(self)} tensors{target})"


def load_dump(path: PathLike, *, require_torchprobe: bool = True) -> Dump:
    """Open a dump file; tensors are read from disk when accessed.

    With ``require_torchprobe=False`` any safetensors file is accepted (e.g. outputs written by
    another tool); when it records no call order, keys come in natural name order
    (``layers.2`` before ``layers.10``). Problems in torchprobe metadata are errors when
    ``require_torchprobe`` is True and logged warnings otherwise.

    Raises DumpError naming the path when the file is missing, is not a readable safetensors
    file (corrupted or truncated), or, with ``require_torchprobe``, is not a torchprobe dump.
    """
    path = _as_path(path, "path")
    if not path.exists():
        raise DumpError(
            f"dump file {path} does not exist; check the path, or write it with tp.dump(model, inputs, path) or rec.save(path)"
        )
    if path.is_dir():
        raise DumpError(f"dump path {path} is a directory; give the .safetensors file inside it")
    try:
        signature = _signature(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise DumpError(
            f"{path} is not a readable safetensors file ({e}); "
            "it may be truncated or corrupted: write it again"
        ) from e

    order = _natural_order(keys)
    if metadata.get("format") == FORMAT:
        problem, parsed = _read_torchprobe_metadata(metadata, keys)
        if problem is None:
            order = parsed
        elif require_torchprobe:
            raise DumpError(f"torchprobe dump {path} {problem}")
        else:
            logger.warning("torchprobe dump %s %s; reading its tensors in name order", path, problem)
    elif require_torchprobe:
        found = f"format={metadata['format']!r}" if "format" in metadata else "no format entry"
        raise DumpError(
            f"{path} is a safetensors file but not a torchprobe dump (metadata has {found}); "
            "load it with require_torchprobe=False, or pass it as the second argument of compare()"
        )
    return Dump(
        tensors=_LazyTensors(path, order, signature),
        order=tuple(order),
        metadata=MappingProxyType(metadata),
        path=path,
    )


def _read_torchprobe_metadata(metadata: Mapping[str, str], keys: list[str]) -> tuple[str | None, list[str]]:
    """(problem, order): problem is None when the metadata is sound."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        return (
            f"has format_version {version!r}, but this torchprobe reads version {FORMAT_VERSION!r}; "
            "upgrade torchprobe or write the dump again",
            [],
        )
    if "extra" in metadata:
        try:
            json.loads(metadata["extra"])
        except ValueError as e:
            return f"has unreadable 'extra' metadata ({e}); write the dump again", []
    raw = metadata.get("order")
    if raw is None:
        return None, _natural_order(keys)
    try:
        order = json.loads(raw)
    except ValueError as e:
        return f"has unreadable 'order' metadata ({e}); write the dump again", []
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
        return "has 'order' metadata that is not a JSON list of keys; write the dump again", []
    if len(order) != len(keys) or set(order) != set(keys):
        extra = sorted(set(order) - set(keys))
        absent = sorted(set(keys) - set(order))
        return (
            f"has 'order' metadata that does not list its tensors exactly once "
            f"(not in file: {_few(extra) or 'none'}; not in order: {_few(absent) or 'none'}); "
            "write the dump again",
            [],
        )
    return None, order


def _natural_order(keys: Sequence[str]) -> list[str]:
    def key(name: str) -> tuple:
        return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))

    return sorted(keys, key=key)


# ------------------------------------------------------------------------------------- comparing


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
            else {name: _json_float(self.metrics[name]) for name in ErrorMetrics.__dataclass_fields__},
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
        return not self.missing and all(row.passed for row in self.rows)

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
        n = len(self.rows)
        m = get_metric(self.metric)
        rule = f"{self.metric} {'<' if m.higher_is_better else '>'} {m.bound(self.tol):g}"
        missing = f"{len(self.missing)} of a's tensors missing from b" if self.missing else ""
        if n == 0:
            return (
                f"no tensors in common: {len(self.missing)} in a are missing from b, "
                f"{len(self.extra)} in b are not in a; pass mapping= to match their names"
            )
        failing = self.diverging()
        if failing:
            first = failing[0]
            verb = "diverges" if len(failing) == 1 else "diverge"
            line = (
                f"{len(failing)} of {n} tensors {verb} ({rule}); first divergence: {self._name(first)} "
                f"({self._why(first)})"
            )
            return f"{line}; {missing}" if missing else line
        ok_rule = m.rule(self.tol)
        worst = max(self.rows, key=self._badness)
        worst_text = f"worst: {self._name(worst)} ({self.metric} {_num(worst.metrics[self.metric])})"
        if missing:
            return f"all {n} common tensors match ({ok_rule}), but {missing}; {worst_text}"
        return f"all {n} tensors match ({ok_rule}); {worst_text}"

    def to_text(self, max_rows: int | None = 40, context: int = 2) -> str:
        """Verdict, sources, a table in call order, then missing and extra keys.

        Tables longer than ``max_rows`` keep the diverging rows (else the worst ones) with
        ``context`` rows around each, and the last row; skipped stretches read ``... N more``.
        """
        lines = [
            self.verdict(),
            f"a: {self.a}{_bracket(self.target_a)}   b: {self.b}{_bracket(self.target_b)}",
        ]
        if self.onnx is not None:
            lines.append(
                f"matched {len(self.rows)} of {len(self.rows) + len(self.unmatched)} module outputs of a "
                f"by name through {self.onnx}"
            )
        if self.rows:
            lines += ["", self._table(max_rows, context)]
        if self.missing:
            shown = [f"{k} (as {self.mapping[k]})" if k in self.mapping else k for k in self.missing]
            lines += ["", f"missing from b ({len(self.missing)}): {_few(shown, 20)}"]
        if self.extra:
            lines += ["", f"in b only ({len(self.extra)}): {_few(self.extra, 20)}"]
        if self.unmatched:
            lines += ["", f"no engine tensor ({len(self.unmatched)}): {_few(self.unmatched, 20)}"]
        return "\n".join(lines)

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
            "tol": _json_float(self.tol),
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

    # rendering helpers -----------------------------------------------------------------------

    def _name(self, row: TensorComparison) -> str:
        return row.key if row.key_b is None else f"{row.key} (b: {row.key_b})"

    def _why(self, row: TensorComparison) -> str:
        if row.metrics is None:
            return row.problem or "not compared"
        text = f"{self.metric} {_num(row.metrics[self.metric])}"
        return f"{text}; {row.problem}" if row.problem else text

    def _badness(self, row: TensorComparison) -> float:
        if row.metrics is None:
            return math.inf
        value = row.metrics[self.metric]
        if math.isnan(value):
            return math.inf
        return get_metric(self.metric).badness(value)

    def _table(self, max_rows: int | None, context: int) -> str:
        keep = _rows_to_show(self.rows, max_rows, context, self._badness)
        origin = any(row.origin for row in self.rows)
        blank = [""] * (8 if origin else 7)
        body: list[list[Any]] = []
        previous = -1
        for i in keep:
            if i > previous + 1:
                body.append(["", f"... {i - previous - 1} more", *blank])
            body.append(self._cells(i, self.rows[i]) + ([self.rows[i].origin or ""] if origin else []))
            previous = i
        if previous < len(self.rows) - 1:
            body.append(["", f"... {len(self.rows) - 1 - previous} more", *blank])
        headers = ["#", "key", "shape", "dtype", "max_abs", "rel_l2", "cosine", "sqnr dB", "status"]
        align = ("right", "left", "left", "left", "right", "right", "right", "right", "left")
        if origin:
            headers, align = [*headers, "origin"], (*align, "left")
        return tabulate(body, headers=headers, disable_numparse=True, colalign=align)

    def _cells(self, index: int, row: TensorComparison) -> list[Any]:
        shape = _shape_str(row.shape_a) if row.shape_a == row.shape_b else f"{row.shape_a} vs {row.shape_b}"
        dtype = (
            _dtype_str(row.dtype_a)
            if row.dtype_a == row.dtype_b
            else f"{_dtype_str(row.dtype_a)} vs {_dtype_str(row.dtype_b)}"
        )
        m = row.metrics
        if m is None:
            values = ["", "", "", ""]
        else:
            values = [_num(m.max_abs), _num(m.rel_l2), _num(m.cosine, 6), _num(m.sqnr)]
        status = "ok" if row.passed else ("DIVERGE" if row.problem is None else f"DIVERGE: {row.problem}")
        key = row.key if row.key_b is None else f"{row.key} -> {row.key_b}"
        return [str(index), key, shape, dtype, *values, status]


def compare(
    a: PathLike | Dump,
    b: PathLike | Dump,
    *,
    tol: float = 1e-2,
    metric: str = "rel_l2",
    mapping: Mapping[str, str] | PathLike | None = None,
    onnx: PathLike | None = None,
    runner: str | None = None,
) -> DumpComparison:
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
    dump_a = _as_dump(a, "a")
    link = None
    if onnx is not None:  # b holds an engine's tensors keyed by ONNX name (torchprobe.io)
        from .io.engine_outputs import link_engine

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


def _rows_to_show(rows: Sequence[TensorComparison], max_rows: int | None, context: int, badness) -> list[int]:
    """Indices of the rows a trimmed table shows, in call order."""
    n = len(rows)
    if max_rows is None or n <= max_rows:
        return list(range(n))
    budget = max(1, max_rows - 1)  # one row is kept for the last (final output) row
    failing = [i for i, r in enumerate(rows) if not r.passed]
    ranked = failing or sorted(range(n), key=lambda i: badness(rows[i]), reverse=True)
    keep: set[int] = set()
    for i in ranked:
        window = set(range(max(0, i - context), min(n, i + context + 1)))
        if len(keep | window) <= budget:
            keep |= window
        elif len(keep | {i}) <= budget:
            keep.add(i)  # no room left for its context: the row alone
        else:
            break
    keep.add(n - 1)
    return sorted(keep)


# ------------------------------------------------------------------------------------ formatting


def _few(items: Sequence[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _num(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _json_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_str(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _bracket(text: str | None) -> str:
    return f" [{text}]" if text else ""
