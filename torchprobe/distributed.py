"""Statistics of the whole logical tensor under torch.distributed: one collective per read.

Each rank summarizes its own tensors on its own device, as in one process (:mod:`.stats`). When
the rows are read, the per-rank summary vectors ``[min, max, sum, sumsq, 9 bucket counts]`` are
stacked and merged across the ranks of a process group by ONE ``all_gather`` (after a 3-integer
``all_gather`` of a fingerprint of the row keys, so that ranks that recorded different modules
are named instead of mis-merged): min and max by min and max, sums, sums of squares and counts
added, mean, rms and headroom computed again from the merged sums. Every rank gets the same rows.

What a rank contributes for one tensor:

- a plain tensor: its own data (DDP, FSDP2: each rank's share of the batch);
- a DTensor, by its placements: ``Shard`` — every rank its shard; ``Replicate`` — counted once
  (the lowest rank of the group among those holding the same values); ``Partial`` — reduced
  first (``redistribute`` to ``Replicate``, the one collective made inside a hook), then as
  ``Replicate``. Nothing here calls ``.numpy()`` on a tensor subclass: a DTensor is summarized
  through ``to_local()``, an ``AsyncCollectiveTensor`` after ``wait()``.

Error vectors (:func:`torchprobe.metrics.error_vector`) merge the same way
(:func:`merge_error_vectors`), which is how ``compare`` merges a set of rank dumps.

FSDP2 (``fully_shard``) modules refuse ``copy.deepcopy``. :func:`copyable` gives report(),
isolate(), bisect() and dump() a plain module tree that holds the same *sharded* parameters
(no copy, no gather) and gathers each module's own parameters for the length of its forward
(``DTensor.full_tensor()``), so the copies that targets make stay sharded; ``gather=True``
gathers the whole model once instead (faster, the full model on every rank).

    >>> import torchprobe as tp                       # under torchrun --nproc-per-node 2
    >>> with tp.record(ddp_model) as rec:             # every rank, same steps
    ...     ddp_model(x_of_this_rank)
    >>> rec["(root)"].numel                           # both ranks' batches: 2 x 4 x 8
    64

This module imports only torch, :mod:`.errors`, :mod:`.stats` and :mod:`.metrics`; capture, the
report passes, search and compare call it.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import stats as _stats
from .errors import InvalidArgument, TorchprobeError
from .metrics import VECTOR_LEN as ERROR_VECTOR_LEN

log = logging.getLogger(__name__)

__all__ = [
    "RankMismatch", "resolve_group", "rank", "world_size", "is_writer", "local_view", "local_pair",
    "LocalSummarizer", "summarizer", "merged_stats", "merge_error_vectors", "gather_objects", "worst_over_ranks",
    "merge_items", "merge_failures", "all_max", "merge_monitor", "agree", "copyable", "is_fsdp", "rank_path",
    "local_tensors",
]


class RankMismatch(TorchprobeError):
    """The ranks of a group recorded different modules (or measured different things), so their
    statistics cannot be merged row by row; the message names the first rank and row that differ."""


# -- groups -----------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    return dist


def initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def resolve_group(group: Any = None, argument: str = "group") -> Any:
    """The process group to merge over, or None for this process alone.

    ``None``: the world when torch.distributed is initialized (else None); ``False``: None (local
    statistics only); a ``ProcessGroup``: that group (this rank must belong to it)."""
    if group is False:
        return None
    if group is None:
        return _dist().group.WORLD if initialized() else None
    dist = _dist()
    if not initialized():
        raise InvalidArgument(f"{argument}={group!r} needs torch.distributed: call torch.distributed.init_process_group() "
                              "first, or pass group=None (local) / group=False")
    if not isinstance(group, dist.ProcessGroup):
        raise InvalidArgument(f"{argument}= takes None (the world), False (this process only) or a "
                              f"torch.distributed.ProcessGroup; got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise InvalidArgument(f"{argument}=: rank {dist.get_rank()} is not a member of this process group "
                              f"(ranks {dist.get_process_group_ranks(group)})")
    return group


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when not distributed)."""
    return _dist().get_rank(group) if group is not None else 0


def world_size(group: Any = None) -> int:
    return _dist().get_world_size(group) if group is not None else 1


def is_writer(rank_: int | None = 0, group: Any = None) -> bool:
    """Whether this process writes files and output: always when not distributed; else when its
    rank in ``group`` (default: the world) is ``rank_`` (None: every rank writes)."""
    if rank_ is None or not initialized():
        return True
    group = resolve_group(group)
    if not isinstance(rank_, int) or isinstance(rank_, bool) or not 0 <= rank_ < world_size(group):
        raise InvalidArgument(f"rank={rank_!r}: give the rank that writes (0 <= rank < {world_size(group)}) "
                              "or None for every rank")
    return rank(group) == rank_


def _collective_device(group: Any) -> torch.device:
    """CUDA for NCCL groups (NCCL moves only CUDA tensors), else the CPU (gloo)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: Tensor, group: Any) -> Tensor:
    """[world, *t.shape] on the CPU: one all_gather on the group's device."""
    dist = _dist()
    device = _collective_device(group)
    t = t.to(device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return torch.stack(out).cpu()


def gather_objects(obj: Any, group: Any) -> list[Any]:
    """``obj`` of every rank of ``group``, in rank order (one ``all_gather_object``)."""
    out: list[Any] = [None] * world_size(group)
    _dist().all_gather_object(out, obj, group=group)
    return out


# -- summaries of tensor subclasses -----------------------------------------------------------

def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # noqa: BLE001 - no distributed build: no DTensor can exist
        return None
    return DTensor


@dataclass(frozen=True)
class Layout:
    """Where a DTensor's local values sit: its mesh and placements (Partial already reduced)."""

    mesh: Any
    placements: tuple

    def weight(self, group: Any) -> int:
        """1 when this rank's local values count for the group, 0 when a lower rank of the group
        holds the same values (a Replicate dimension)."""
        return _weight(self, group)


_weights: dict[tuple, tuple[Any, Any, int]] = {}


def _weight(layout: Layout, group: Any) -> int:
    dist = _dist()
    key = (id(layout.mesh), layout.placements, id(group))
    hit = _weights.get(key)
    if hit is not None and hit[0] is layout.mesh and hit[1] is group:
        return hit[2]
    me = dist.get_rank()
    ranks = layout.mesh.mesh  # global ranks, shaped like the mesh
    coordinate = layout.mesh.get_coordinate()
    if coordinate is None:  # not in the mesh: no local values
        weight = 0
    else:
        same = torch.ones_like(ranks, dtype=torch.bool)
        for dim, p in enumerate(layout.placements):
            if not p.is_replicate():
                index = [slice(None)] * ranks.dim()
                index[dim] = coordinate[dim]
                keep = torch.zeros_like(same)
                keep[tuple(index)] = True
                same &= keep
        members = set(dist.get_process_group_ranks(group))
        holders = [int(r) for r in ranks[same].tolist() if int(r) in members]
        weight = int(bool(holders) and me == min(holders))
    _weights[key] = (layout.mesh, group, weight)
    return weight


def local_view(x: Tensor) -> tuple[Tensor, Layout | None]:
    """A plain tensor holding this rank's values of ``x``, and the DTensor layout (None for a
    plain tensor). A Partial DTensor is reduced first (a collective: every rank of its mesh
    must get here); an AsyncCollectiveTensor is waited on; the result is never a subclass that
    NumPy refuses."""
    DTensor = _dtensor_type()
    with torch.no_grad():
        x = x.detach()
        layout = None
        if DTensor is not None and isinstance(x, DTensor):
            placements = tuple(x.placements)
            if any(p.is_partial() for p in placements):
                from torch.distributed.tensor import Replicate

                placements = tuple(Replicate() if p.is_partial() else p for p in placements)
                x = x.redistribute(x.device_mesh, placements)
            layout = Layout(x.device_mesh, placements)
            x = x.to_local()
        wait = getattr(x, "wait", None)
        if type(x) is not Tensor and callable(wait) and hasattr(x, "elem"):  # AsyncCollectiveTensor
            x = wait()
        return x, layout


def local_pair(ref: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's values of a (reference, test) pair, laid out alike, as plain tensors: a test
    DTensor is redistributed to the reference's placements; a DTensor paired with a plain tensor
    is gathered whole (``full_tensor()``, a collective)."""
    DTensor = _dtensor_type()
    r_is, t_is = (DTensor is not None and isinstance(ref, DTensor)), (DTensor is not None and isinstance(test, DTensor))
    with torch.no_grad():
        if r_is and t_is:
            ref, layout = local_view(ref)
            test = test.detach()
            if tuple(test.placements) != layout.placements or test.device_mesh != layout.mesh:
                test = test.redistribute(layout.mesh, layout.placements)
            return ref, local_view(test)[0]
        if r_is:
            ref = ref.detach().full_tensor()
        if t_is:
            test = test.detach().full_tensor()
        return local_view(ref)[0], local_view(test)[0]


class LocalSummarizer:
    """A :class:`~torchprobe.stats.Summarizer` that also takes tensor subclasses: DTensors by
    their local values (their layout kept for the merge), AsyncCollectiveTensors once waited,
    any other subclass through torch ops only (no NumPy). Plain tensors go straight through."""

    def __init__(self, inner: _stats.Summarizer) -> None:
        self.inner = inner
        self.fused = inner.fused
        self._eager = _stats.Summarizer(fused=False)
        self._layouts: dict[int, tuple[Any, Layout]] = {}

    def __call__(self, x: Tensor) -> Any:
        if type(x) is Tensor or type(x) is nn.Parameter:
            return self.inner(x)
        local, layout = local_view(x)
        # The fused kernel's slab rows decode with the tensor's numel, which would be the global
        # one for a DTensor: subclasses on CUDA take the branch-free eager ops instead.
        plain_cpu = type(local) is Tensor and local.device.type == "cpu"
        summary = self.inner(local) if plain_cpu else self._eager(local)
        if summary is not None and layout is not None:
            self._layouts[id(summary)] = (summary, layout)
        return summary

    def layout(self, summary: Any) -> Layout | None:
        hit = self._layouts.get(id(summary))
        return hit[1] if hit is not None and hit[0] is summary else None


def summarizer(fused: bool | None = None) -> Any:
    """The summarizer a Recording uses: the plain one in one process, a :class:`LocalSummarizer`
    when torch.distributed is initialized (DTensor outputs can only exist then)."""
    inner = _stats.Summarizer(fused)
    return LocalSummarizer(inner) if initialized() else inner


# -- merging statistics -----------------------------------------------------------------------

def _host_vectors(entries: Sequence[tuple[torch.dtype, tuple[int, ...], Any]]) -> list[list[float] | None]:
    """Each summary as a host list (None where there is none): one copy per device and slab,
    the same reads as :func:`torchprobe.stats.read`."""
    out: list[list[float] | None] = [None] * len(entries)
    plain = [i for i, (_, _, v) in enumerate(entries) if v is not None and not isinstance(v, _stats.SlabRow)]
    for i, row in zip(plain, _stats.to_host([entries[i][2] for i in plain])):
        out[i] = row
    slabs: dict[int, tuple[Tensor, list[int]]] = {}
    for i, (_, _, v) in enumerate(entries):
        if isinstance(v, _stats.SlabRow):
            slabs.setdefault(id(v.block), (v.block, []))[1].append(i)
    for block, idx in slabs.values():
        where = [entries[i][2].index for i in idx]
        rows = block[: max(where) + 1].cpu()[where]
        numels = [math.prod(entries[i][1]) for i in idx]
        for i, row in zip(idx, _stats._decode_slab_rows(rows, numels)):
            out[i] = row
    return out


def fingerprint(keys: Iterable[str]) -> int:
    """A signed 63-bit hash of the ordered keys."""
    h = hashlib.blake2b(digest_size=8)
    for k in keys:
        h.update(k.encode())
        h.update(b"\0")
    return int.from_bytes(h.digest(), "little", signed=True) >> 1


def check_same_keys(keys: Sequence[str], group: Any, what: str = "record()") -> int:
    """Check that every rank of ``group`` has the same ordered ``keys``; returns rank 0's run
    token (a random 62-bit number, the same on every rank). Raises :class:`RankMismatch` on every
    rank, naming the first rank and key that differ from rank 0, when they do not agree."""
    token = int.from_bytes(os.urandom(8), "little") >> 2
    mine = torch.tensor([len(keys), fingerprint(keys), token], dtype=torch.int64)
    every = _all_gather(mine, group)
    if bool((every[:, :2] == every[0, :2]).all()):
        return int(every[0, 2])
    lists = gather_objects(list(keys), group)
    raise RankMismatch(_mismatch(lists, what))


def _mismatch(lists: list[list[str]], what: str) -> str:
    first = lists[0]
    for r, other in enumerate(lists[1:], 1):
        if other == first:
            continue
        i = next((i for i, (a, b) in enumerate(zip(first, other)) if a != b), min(len(first), len(other)))
        a = first[i] if i < len(first) else None
        b = other[i] if i < len(other) else None
        if a is not None and b is not None and a.split("|")[0] == b.split("|")[0]:  # same key, other dtype
            a, b = a.replace("|torch.", " in "), b.replace("|torch.", " in ")
        else:
            a, b = (repr(v.split("|")[0]) if v is not None else "nothing (it stopped)" for v in (a, b))
        return (f"{what}: ranks disagree on the modules they ran: at row {i}, rank 0 has {a} and rank {r} has "
                f"{b} ({len(first)} vs {len(other)} rows); modules must run in the same order on every rank to "
                "merge their statistics (data-dependent control flow?): record with group=False for per-rank "
                "statistics, or make the ranks take the same path")
    return f"{what}: ranks disagree on the modules they ran"


_PAYLOAD = 3 + _stats._VECTOR_LEN  # weight, local numel, has summary, the summary vector


def merged_stats(entries: Sequence[tuple[torch.dtype, tuple[int, ...], Any]], keys: Sequence[str], group: Any,
                 layout: Callable[[Any], Layout | None] | None = None, what: str = "record()") -> tuple[list[_stats.TensorStats], int]:
    """TensorStats of the whole logical tensors: ``entries`` are this rank's (dtype, shape,
    summary) in ``keys`` order, ``layout(summary)`` the DTensor layout of a summary (None: a
    plain tensor, this rank's own data). Two collectives (key fingerprint, then the stacked
    vectors). Returns the stats and the run token of :func:`check_same_keys`."""
    dtype_keys = [f"{k}|{d}" for k, (d, _, _) in zip(keys, entries)]
    token = check_same_keys(dtype_keys, group, what)
    host = _host_vectors(entries)
    empty = [0.0] * _stats._VECTOR_LEN
    rows = []
    for (_, shape, summary), vector in zip(entries, host):
        lay = layout(summary) if (layout is not None and summary is not None) else None
        weight = 1.0 if lay is None else float(lay.weight(group))
        rows.append([weight, float(math.prod(shape)), 0.0 if vector is None else 1.0, *(empty if vector is None else vector)])
    merged = merge_vectors(_all_gather(torch.tensor(rows, dtype=torch.float64), group)) if entries else []
    out = []
    for (dtype, shape, _), (numel, vector) in zip(entries, merged):
        if vector is None:
            out.append(_stats.TensorStats(dtype=str(dtype).replace("torch.", ""), shape=shape, numel=int(numel)))
        else:
            out.append(_stats._from_vector(dtype, shape, vector))
    return out, token


def merge_vectors(gathered: Tensor) -> list[tuple[float, list[float] | None]]:
    """Merge ``[ranks, rows, 3 + 13]`` payloads (weight, local numel, has summary, summary) into
    one (numel, summary or None) per row: min of the minima and max of the maxima over the
    summaries that hold a finite value, sums, sums of squares and bucket counts added; a row
    without any summary (an integer tensor) adds the numels."""
    w, numel, has, v = gathered[..., 0], gathered[..., 1], gathered[..., 2] > 0, gathered[..., 3:]
    use = has & (w > 0)
    finite = v[..., 5:12].sum(-1) > 0  # buckets 1..7 hold the finite values
    lo = torch.where(use & finite, v[..., 0], math.inf).amin(0)
    hi = torch.where(use & finite, v[..., 1], -math.inf).amax(0)
    rest = torch.where(use[..., None], v[..., 2:], 0.0).sum(0)
    merged = torch.cat([lo[:, None], hi[:, None], rest], dim=1).tolist()
    plain_numel = (w * numel).sum(0).tolist()
    return [(sum(vector[4:]), vector) if any_summary else (n, None)
            for vector, n, any_summary in zip(merged, plain_numel, use.any(0).tolist())]


def merge_error_vectors(vectors: Sequence[Sequence[float]]) -> list[float]:
    """One :func:`~torchprobe.metrics.error_vector` from several (disjoint parts of one tensor
    pair): max |difference| by max, sums of squares and products and counts added."""
    if not vectors:
        return [0.0] * ERROR_VECTOR_LEN
    rows = torch.tensor([list(map(float, v)) for v in vectors], dtype=torch.float64)
    return [float(rows[:, 0].max()), *rows[:, 1:].sum(0).tolist()]


# -- results that must agree on every rank ----------------------------------------------------

def worst_over_ranks(per_rank: Sequence[Sequence[Any]], badness: Callable[[Any], float], what: str = "") -> list[Any]:
    """Item by item, the worst of the ranks' items (ties: the lowest rank): ``per_rank[r][i]``
    is rank r's item i. Every rank passes the same lists (from :func:`gather_objects`) and so
    gets the same answer. Raises :class:`RankMismatch` when the ranks have different counts."""
    counts = {len(items) for items in per_rank}
    if len(counts) > 1:
        sizes = ", ".join(f"rank {r}: {len(items)}" for r, items in enumerate(per_rank))
        raise RankMismatch(f"{what or 'results'}: the ranks measured different numbers of items ({sizes}); "
                           "they must run the same modules in the same order")
    out = []
    for items in zip(*per_rank):
        best, best_badness = items[0], badness(items[0])
        for item in items[1:]:
            b = badness(item)
            if b > best_badness:
                best, best_badness = item, b
        out.append(best)
    return out


def merge_items(items: Sequence[Any], key: Callable[[Any], Any], badness: Callable[[Any], Any], group: Any,
                what: str) -> list[Any]:
    """The ranks' lists of results, item by item the worst (one ``all_gather_object``); every
    rank must pass its items in the same order, with the same keys, else :class:`RankMismatch`."""
    per_rank = gather_objects([(key(i), i) for i in items], group)
    keys = [[str(k) for k, _ in lst] for lst in per_rank]
    if any(k != keys[0] for k in keys[1:]):
        raise RankMismatch(_mismatch(keys, what))
    return worst_over_ranks([[i for _, i in lst] for lst in per_rank], badness, what)


def merge_failures(failures: dict[str, str], group: Any) -> dict[str, str]:
    """``{what: message}`` of every rank, united: the lowest failing rank's message, with the
    ranks it failed on."""
    per_rank = gather_objects(dict(failures), group)
    out: dict[str, str] = {}
    for name in dict.fromkeys(k for d in per_rank for k in d):
        ranks = [r for r, d in enumerate(per_rank) if name in d]
        first = per_rank[ranks[0]][name]
        where = "rank" if len(ranks) == 1 else "ranks"
        out[name] = f"{first} (on {where} {', '.join(map(str, ranks))} of {len(per_rank)})"
    return out


def all_max(values: dict[str, float], group: Any) -> dict[str, float]:
    """Per name, the maximum over the ranks (names missing on a rank count as absent)."""
    out: dict[str, float] = {}
    for d in gather_objects(dict(values), group):
        for k, v in d.items():
            out[k] = max(out.get(k, v), v)
    return out


def merge_monitor(host: dict[int, Any], n: int, group: Any, acc_type: type, grad_type: type) -> dict[int, Any]:
    """Merge one Monitor sample over the ranks (one all_gather): per module, the largest absmax
    and the summed NaN/Inf count of its output, and of its gradient the largest absmax and the
    summed counts. ``host`` maps module index -> accumulator (``absmax``, ``nonfinite``, ``grad``)."""
    mine = torch.zeros(n, 9, dtype=torch.float64)
    for i, acc in host.items():
        mine[i, :3] = torch.tensor([1.0, acc.absmax, acc.nonfinite], dtype=torch.float64)
        g = acc.grad
        if g is not None:
            mine[i, 3:] = torch.tensor([1.0, g.absmax, g.tiny, g.zeros, g.nonfinite, g.numel], dtype=torch.float64)
    every = _all_gather(mine, group)
    out: dict[int, Any] = {}
    for i in range(n):
        rows = every[:, i]
        seen = rows[:, 0] > 0
        if not bool(seen.any()):
            continue
        acc = acc_type(absmax=float(rows[seen, 1].max()), nonfinite=int(rows[seen, 2].sum()))
        with_grad = rows[:, 3] > 0
        if bool(with_grad.any()):
            g = rows[with_grad]
            acc.grad = grad_type(absmax=float(g[:, 4].max()), tiny=int(g[:, 5].sum()), zeros=int(g[:, 6].sum()),
                                 nonfinite=int(g[:, 7].sum()), numel=int(g[:, 8].sum()))
        out[i] = acc
    return out


def agree(error: BaseException | None, group: Any) -> None:
    """Make a failure global: when any rank of ``group`` passes an exception, raise one on every
    rank (the lowest failing rank's, of the same type when it can be rebuilt from its message),
    so that no rank goes on to a collective the others never reach."""
    failures = gather_objects(None if error is None else (type(error), str(error)), group)
    for r, failure in enumerate(failures):
        if failure is None:
            continue
        kind, message = failure
        if error is not None and r == rank(group):
            raise error
        try:
            raised = kind(f"on rank {r}: {message}")
        except Exception:  # noqa: BLE001 - an exception type that cannot be rebuilt from a message
            raised = TorchprobeError(f"on rank {r}: {kind.__name__}: {message}")
        raise raised


# -- FSDP2 ------------------------------------------------------------------------------------

def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # noqa: BLE001
        return None
    return FSDPModule


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` or a submodule is an FSDP2 (``fully_shard``) module."""
    FSDPModule = _fsdp_module_type()
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


class GatherShards:
    """Hooks of one module of an FSDP2 :func:`copyable` view: for the length of its forward its
    own sharded parameters are replaced by gathered plain ones (``DTensor.full_tensor()``, an
    all_gather over the FSDP mesh), then put back, also when the forward raises. So the module
    also runs when called alone (torchprobe's per-module replays). Instances deep-copy with
    their module (the shards are copied, never gathered, by the copy)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._held: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"names": self.names, "_held": []}

    def enter(self, module: nn.Module, args: tuple) -> None:
        held = {}
        with torch.no_grad():
            for name in self.names:
                p = module._parameters.get(name)
                if p is not None and type(p) is not Tensor and hasattr(p, "full_tensor"):
                    held[name] = p
                    module._parameters[name] = nn.Parameter(_plain_local(p.full_tensor()), requires_grad=False)
        self._held.append(held)

    def exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._held:
            module._parameters.update(self._held.pop())


def _plain_local(t: Tensor) -> Tensor:
    return local_view(t)[0]


def _is_fsdp_hook(fn: Any) -> bool:
    owner = getattr(fn, "__self__", None)
    where = getattr(owner if owner is not None else fn, "__module__", "") or ""
    return where.startswith("torch.distributed.fsdp")


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _fsdp_params(model: nn.Module) -> dict[int, dict[str, Tensor]]:
    """{id(module): {param name: sharded DTensor parameter}} of every FSDP2-managed parameter,
    read from FSDP's state (its registered parameter may be the unsharded one after a forward)."""
    FSDPModule = _fsdp_module_type()
    out: dict[int, dict[str, Tensor]] = {}
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        try:
            groups = m._get_fsdp_state()._fsdp_param_groups
            for group in groups:
                for fp in group.fsdp_params:
                    info = fp._module_info
                    out.setdefault(id(info.module), {})[info.param_name] = fp.sharded_param
                    for shared_module, shared_name in zip(info.shared_modules, info.shared_param_names):
                        out.setdefault(id(shared_module), {})[shared_name] = fp.sharded_param
        except AttributeError as e:  # FSDP2 internals moved: say so instead of guessing
            raise TorchprobeError(f"torchprobe cannot read the FSDP2 state of this torch ({torch.__version__}): {e}; "
                                  "pass copyable(model, gather=True)'s model, or an unsharded model") from e
    return out


def copyable(model: nn.Module, gather: bool = False) -> nn.Module:
    """``model`` itself when it can be deep-copied; for an FSDP2 model, a plain module tree
    with the same names, classes, buffers and non-FSDP hooks whose parameters are FSDP's sharded
    DTensors (shared, not copied; buffers are copies). ``gather=False``: each module gathers its own parameters
    for its forward (:class:`GatherShards`), so copies of the view stay sharded; ``gather=True``:
    every parameter is gathered once into a plain tensor (the whole model on every rank). The
    user's model is not changed (FSDP's registered parameters and hooks stay as they are).

    What runs: eager, autocast and strict copies (forward only, no_grad); the view is not an
    FSDP module (no prefetching, no mixed-precision policy: the reference is FP32, each target
    sets its own dtype); 2-D meshes (HSDP, FSDP + TP) and modules that read a child's parameter
    without calling the child are not supported with ``gather=False``."""
    if not is_fsdp(model):
        return model
    FSDPModule = _fsdp_module_type()
    shards = _fsdp_params(model)
    for params in shards.values():
        for name, p in params.items():
            if p.device_mesh.ndim != 1:
                raise TorchprobeError(f"copyable(): parameter {name!r} is sharded on a {p.device_mesh.ndim}-D mesh "
                                      "(HSDP or FSDP + TP); only 1-D FSDP2 meshes are supported: pass gather=True")
    memo: dict[int, nn.Module] = {}

    def view(m: nn.Module) -> nn.Module:
        if id(m) in memo:  # a shared module stays shared
            return memo[id(m)]
        cls = type(m)
        if isinstance(m, FSDPModule):
            cls = next(b for b in cls.__bases__ if b is not FSDPModule)
        new = cls.__new__(cls)
        memo[id(m)] = new
        state = {k: v for k, v in m.__dict__.items()  # less FSDP's own state (composable-API keys, flags)
                 if not k.startswith("__composable_api") and k not in ("_is_fsdp_managed_module", "_fsdp_use_orig_params")}
        for name in _HOOK_DICTS:
            if name in state:
                hooks = type(state[name])()
                for hid, fn in state[name].items():
                    fn_ = fn[0] if isinstance(fn, tuple) else fn
                    if not _is_fsdp_hook(fn_):
                        hooks[hid] = fn
                state[name] = hooks
        sharded = shards.get(id(m), {})
        params = {}
        for name, p in m._parameters.items():
            if name in sharded:
                p = sharded[name]
                if gather:
                    with torch.no_grad():
                        p = nn.Parameter(_plain_local(p.full_tensor()), requires_grad=p.requires_grad)
            params[name] = p
        state["_parameters"] = params
        state["_buffers"] = {k: (None if b is None else b.clone()) for k, b in m._buffers.items()}  # BN stats stay the user's
        state["_modules"] = {k: (None if c is None else view(c)) for k, c in m._modules.items()}
        new.__dict__.update(state)
        if sharded and not gather:
            hooks = GatherShards(list(sharded))
            new.register_forward_pre_hook(hooks.enter)
            new.register_forward_hook(hooks.exit, always_call=True)
        return new

    return view(model)


# -- per-rank dumps ---------------------------------------------------------------------------

_RANK_SUFFIX = re.compile(r"\.rank(\d+)$")


def rank_path(path: str | os.PathLike, rank_: int) -> Path:
    """``fp32.safetensors`` -> ``fp32.rank0.safetensors`` (a path already naming a rank keeps it)."""
    p = Path(os.fspath(path))
    suffix = p.suffix or ".safetensors"
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    if _RANK_SUFFIX.search(stem):
        stem = _RANK_SUFFIX.sub("", stem)
    return p.with_name(f"{stem}.rank{rank_}{suffix}")


def local_tensors(tensors: dict[str, Tensor], group: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This rank's values of captured tensors (DTensors as their local part, Partial reduced) and
    the layout to store with them: ``{"replicas": [keys another rank of the group also holds],
    "global_shapes": {DTensor key: logical shape}}``. Collective when a DTensor is Partial."""
    local: dict[str, Tensor] = {}
    replicas: list[str] = []
    shapes: dict[str, list[int]] = {}
    for key, t in tensors.items():
        plain, lay = local_view(t)
        local[key] = plain
        if lay is not None:
            shapes[key] = list(t.shape)
            if lay.weight(group) == 0:
                replicas.append(key)
    return local, {"replicas": replicas, "global_shapes": shapes}
