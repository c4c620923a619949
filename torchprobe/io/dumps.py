"""Activation dumps on disk (safetensors): writing, safe reading, lazy tensors.

A dump holds one tensor per module output leaf, keyed by module name: ``encoder.layers.0.norm``,
``blocks.0.attn#1:0`` (``#k`` is the k-th repeated call, k >= 1; ``:path`` names a leaf inside a
tuple/dict output), ``head:logits``. Its safetensors metadata (all strings) says what it is:

    format="torchprobe-dump"  format_version="1"  torchprobe_version  torch_version
    target="strict:fp16"      order='["stem", "blocks.0.attn", ...]' (keys in call order)
    extra='{...}'             (optional JSON)

A dump of one rank under torch.distributed (``rec.save``/``tp.dump`` there write
``name.rank<r>.safetensors`` per rank) also has ``rank``, ``world_size``, ``run`` (one id per
recording, shared by its rank files) and ``layout`` (JSON: ``replicas``, the keys whose values
a lower rank also holds, counted once when merged; ``global_shapes`` of DTensor outputs).

The second dump of a comparison may come from another tool or machine (a TensorRT engine's
outputs, a C++ runtime): any safetensors file works there, and ``mapping`` renames its keys.
This module is the one place in torchprobe that imports safetensors.

Example::

    save_dump("fp32.safetensors", {"blocks.0.norm": torch.randn(4, 64)}, target="fp32")
    d = load_dump("fp32.safetensors"); d.target, d.keys()   # ("fp32", ("blocks.0.norm",))
"""
from __future__ import annotations

import difflib
import errno
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, NamedTuple, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .atomic import atomic_path
from ..errors import DumpError, InvalidArgument

__all__ = ["FORMAT", "FORMAT_VERSION", "Dump", "TensorInfo", "load_dump", "save_dump", "PathLike"]

logger = logging.getLogger(__name__)

FORMAT = "torchprobe-dump"
FORMAT_VERSION = "1"

PathLike = Union[str, "os.PathLike[str]"]

_FULL_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EFBIG", "EDQUOT") if hasattr(errno, n))
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
    ranks: dict | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` as a torchprobe dump; return the path written.

    Tensors are detached, copied to the CPU and made contiguous; the caller's tensors are not
    changed. ``order`` is the call order of the keys (default: the mapping's own order) and must
    name every key exactly once. ``extra`` is any JSON-serializable dict stored with the dump.
    ``ranks`` (one rank's part of a distributed recording) is ``{"rank", "world_size", "run",
    "replicas", "global_shapes"}``, stored as the ``rank``/``world_size``/``run``/``layout`` entries.

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
    if ranks is not None:
        metadata.update(_rank_metadata(ranks, keys))

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


def _rank_metadata(ranks: Any, keys: list[str]) -> dict[str, str]:
    if not isinstance(ranks, dict) or not {"rank", "world_size", "run"} <= set(ranks):
        raise InvalidArgument(f"ranks must be a dict with rank, world_size and run; got {ranks!r}")
    r, world = ranks["rank"], ranks["world_size"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (r, world)) or not 0 <= r < world:
        raise InvalidArgument(f"ranks: need 0 <= rank < world_size (integers); got rank={r!r}, world_size={world!r}")
    known = set(keys)
    layout = {"replicas": [k for k in ranks.get("replicas", ()) if k in known],
              "global_shapes": {k: list(v) for k, v in dict(ranks.get("global_shapes", {})).items() if k in known}}
    return {"rank": str(r), "world_size": str(world), "run": str(ranks["run"]), "layout": json.dumps(layout)}


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
    def rank(self) -> int | None:
        """The rank that wrote this dump (a distributed recording), else None."""
        value = self.metadata.get("rank")
        return None if value is None else int(value)

    @property
    def world_size(self) -> int | None:
        value = self.metadata.get("world_size")
        return None if value is None else int(value)

    @property
    def run(self) -> str | None:
        """The id shared by the rank dumps of one recording."""
        return self.metadata.get("run")

    @property
    def layout(self) -> dict:
        """``{"replicas": [...], "global_shapes": {...}}`` of a rank dump (empty otherwise)."""
        raw = self.metadata.get("layout")
        return {"replicas": [], "global_shapes": {}} if raw is None else json.loads(raw)

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
    if "rank" in metadata or "world_size" in metadata:
        problem = _rank_problem(metadata)
        if problem is not None:
            return problem, []
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


def _rank_problem(metadata: Mapping[str, str]) -> str | None:
    try:
        r, world = int(metadata["rank"]), int(metadata["world_size"])
        layout = json.loads(metadata.get("layout", "{}"))
    except (KeyError, ValueError) as e:
        return f"has unreadable rank metadata ({e}); write the dump again"
    if not 0 <= r < world or not isinstance(layout, dict):
        return f"has rank metadata out of range (rank {r}, world_size {world}); write the dump again"
    return None


def _natural_order(keys: Sequence[str]) -> list[str]:
    def key(name: str) -> tuple:
        return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))

    return sorted(keys, key=key)



def _few(items: Sequence[str], limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def safetensors_entries(path: PathLike) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every tensor in any safetensors file, loaded one at a time on the CPU.

    Raises what safetensors raises (OSError, SafetensorError); callers word the error."""
    handle = safe_open(str(path), framework="pt", device="cpu")
    for name in handle.keys():
        yield name, handle.get_tensor(name)
