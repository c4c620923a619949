"""torch.distributed: statistics of the whole logical tensor, global reports, per-rank dumps.

Real process groups (gloo on 127.0.0.1, ``torch.multiprocessing`` spawn) of 2 and 4 processes run
DDP-style batches, DTensor tensor parallelism (``parallelize_module``: a colwise/rowwise MLP and an
attention block) and FSDP2 (``fully_shard``) of a small transformer. Every result is checked
against the same model unsharded in this (pytest) process, measured by NumPy in float64: absmax,
counts and numel equal, mean/rms within 1e-6 relative. Weights and inputs of the MLPs are small
dyadic rationals (k/16), so every sum is exact in float32 and sharded and unsharded runs give the
same bits; where softmax/GELU make a sharded matmul round differently (the attention block's
rowwise output), that row is checked within 1e-6 against the unsharded model and exactly against
the tensors the sharded run itself gathered.

One spawn per world size runs every scenario; the tests read its results. With
``TORCHPROBE_TEST_NCCL=1`` on a machine with two GPUs the same tests also run over NCCL on cuda
(the ``nccl-2`` parameter; skipped with the reason elsewhere).
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchprobe as tp

_NCCL = os.environ.get("TORCHPROBE_TEST_NCCL") == "1"
_TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
needs_two_gpus = pytest.mark.skipif(not (_NCCL and _TWO_GPUS and torch.distributed.is_nccl_available()),
                                    reason="NCCL variant: needs TORCHPROBE_TEST_NCCL=1 and 2 CUDA GPUs")
needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
pytestmark = needs_distributed


# -- models (built identically here and in every worker) ---------------------------------------

def dyadic_(module: nn.Module, seed: int) -> nn.Module:
    """Parameters k/16, |k| <= 8: every product and sum below is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-8, 9, p.shape, generator=g).to(p.dtype) / 16)
    return module


def dyadic_inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-16, 17, shape, generator=g).float() / 8


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class NormNet(nn.Module):
    """fc1 -> LayerNorm -> fc2: under strict-onnx:fp16 the norm's (x - mean)^2 overflows once its input
    passes ~256, while its output stays small: keeping ``norm`` in FP32 fixes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class Attention(nn.Module):
    """Heads from the tensor's own width (``view(B, S, -1, head_dim)``), as tensor-parallel
    attention code is written: under ColwiseParallel each rank holds heads/world heads."""

    def __init__(self, dim: int = 32, head_dim: int = 8) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim), nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Tiny(nn.Module):
    """A two-block pre-norm transformer on (batch, seq, 8) inputs, with a final norm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Branchy(nn.Module):
    """Runs ``extra`` only where the input sum is positive: data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.extra = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        return self.extra(x) if float(x.sum()) > 0 else x


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def ddp_batch(world: int) -> torch.Tensor:
    return dyadic_inputs((2 * world, 16), 11)


def culprit_batch(world: int) -> torch.Tensor:
    """Dyadic inputs where one sample of the LAST rank's share is 512x larger."""
    x = dyadic_inputs((2 * world, 16), 12)
    x[2 * world - 1] *= 512
    return x


def fsdp_batch(world: int, big: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(13)
    x = torch.randn(world, 5, 8, generator=g)
    if big:
        x[world - 1] *= 512
    return x


# -- reference statistics: NumPy in float64, independent of torchprobe -------------------------

def np_stats(t: torch.Tensor) -> dict:
    a = t.detach().double().cpu().numpy().ravel()
    fin = a[np.isfinite(a)]
    mag = np.abs(fin)
    return {
        "numel": a.size, "absmax": float(mag.max()), "min": float(fin.min()), "max": float(fin.max()),
        "mean": float(fin.mean()), "rms": float(np.sqrt(np.mean(fin * fin))),
        "nan": int(np.isnan(a).sum()), "inf": int(np.isinf(a).sum()),
        "beyond_fp16": int((mag > 65504).sum()), "subnormal_fp16": int(((mag > 0) & (mag < 2.0**-14)).sum()),
    }


def outputs_by_module(model: nn.Module, run) -> dict[str, list[torch.Tensor]]:
    """Every module's output tensor(s) per call, through plain forward hooks."""
    out: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=(n or "(root)"): out.setdefault(n, []).append(o.detach().clone()))
               for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


def reference_rows(model: nn.Module, x: torch.Tensor, slices: int = 1) -> dict[str, dict]:
    """NumPy statistics of every module output of ``model`` on ``x``, run in ``slices`` equal
    parts along the batch (as data-parallel ranks run it) and concatenated."""
    parts = outputs_by_module(model, lambda: [model(p) for p in x.chunk(slices)])
    return {name: np_stats(torch.cat(outs)) for name, outs in parts.items()}


def row_dict(row) -> dict:
    return {f: getattr(row, f) for f in ("key", "shape", "numel", "absmax", "min", "max", "mean", "rms", "nan", "inf",
                                          "beyond_fp16", "subnormal_fp16")}


def assert_rows_match(rows: list[dict], reference: dict[str, dict], rename=lambda k: k, inexact: tuple[str, ...] = ()) -> None:
    assert rows, "no rows"
    for row in rows:
        ref = reference[rename(row["key"])]
        where = f"row {row['key']}"
        assert row["numel"] == ref["numel"], where
        for field in ("nan", "inf", "beyond_fp16", "subnormal_fp16"):
            assert row[field] == ref[field], (where, field)
        for field in ("absmax", "min", "max"):
            if row["key"] in inexact:
                assert row[field] == pytest.approx(ref[field], rel=1e-6, abs=1e-7), (where, field)
            else:
                assert row[field] == ref[field], (where, field)
        for field in ("mean", "rms"):  # relative to the values' scale: a mean near 0 is all rounding
            assert row[field] == pytest.approx(ref[field], rel=1e-6, abs=1e-6 * ref["rms"]), (where, field)


# -- the workers ---------------------------------------------------------------------------------

class Ctx:
    def __init__(self, rank: int, world: int, backend: str, out: Path) -> None:
        self.rank, self.world, self.backend, self.out = rank, world, backend, out
        self.device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        self._mesh = None

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh

    def share(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch (dim 0)."""
        return x.chunk(self.world)[self.rank].to(self.device)


def _local_rows(rec) -> list[dict]:
    return [row_dict(r) for r in rec.rows]


def sc_ddp(ctx: Ctx) -> dict:
    net = dyadic_(MLP(), 1).to(ctx.device)
    ddp = nn.parallel.DistributedDataParallel(net)
    with tp.record(ddp) as rec:
        ddp(ctx.share(ddp_batch(ctx.world)))
    with tp.record(ddp, group=False) as local:
        ddp(ctx.share(ddp_batch(ctx.world)))
    return {"rows": _local_rows(rec), "local": _local_rows(local), "risks": [str(r.kind) for r in rec.at_risk()]}


def _tp_mlp(ctx: Ctx) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    net = dyadic_(MLP(), 2).to(ctx.device)
    return parallelize_module(net, ctx.mesh, {"fc1": ColwiseParallel(use_local_output=False),
                                              "fc2": RowwiseParallel(use_local_output=False)})


def seen_by_record(model: nn.Module, run) -> dict[str, list]:
    """The placements of each module's output as a process-wide forward hook sees them (the way
    record() hooks): before the module's own hooks, so RowwiseParallel's output is still Partial."""
    names = {m: n or "(root)" for n, m in model.named_modules()}
    seen: dict[str, list] = {}

    def hook(module, args, output):
        if module in names:
            seen[names[module]] = [(type(p).__name__, getattr(p, "dim", None)) for p in output.placements]

    with nn.modules.module.register_module_forward_hook(hook), torch.no_grad():
        run()
    return seen


def sc_tp_mlp(ctx: Ctx) -> dict:
    net = _tp_mlp(ctx)
    x = dyadic_inputs((6, 16), 21).to(ctx.device)
    with tp.record(net) as rec:
        net(x)
    return {"rows": _local_rows(rec), "placements": seen_by_record(net, lambda: net(x))}


def _tp_attention(ctx: Ctx) -> nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(3)
    att = dyadic_(Attention(), 3).to(ctx.device)
    return parallelize_module(att, ctx.mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
                                              "o": RowwiseParallel(use_local_output=False)})


def sc_tp_attention(ctx: Ctx) -> dict:
    att = _tp_attention(ctx)
    x = dyadic_inputs((2, 5, 32), 31).to(ctx.device)
    with tp.record(att) as rec:
        att(x)
    return {"rows": _local_rows(rec), "gathered": gathered_stats(ctx, att, lambda: att(x), dim=-1)}


def gathered_stats(ctx: Ctx, model: nn.Module, run, dim: int) -> dict[str, dict]:
    """NumPy statistics of the tensors the sharded run itself produced, gathered whole: a DTensor
    by ``full_tensor()``, a plain tensor by all_gather and concatenation along ``dim``."""
    out = {}
    for name, outs in outputs_by_module(model, run).items():
        whole = []
        for t in outs:
            if hasattr(t, "full_tensor"):
                whole.append(t.full_tensor())
            else:
                parts = [torch.empty_like(t) for _ in range(ctx.world)]
                torch.distributed.all_gather(parts, t.contiguous())
                whole.append(torch.cat(parts, dim=dim))
        out[name] = np_stats(torch.cat(whole))
    return out


def _fsdp(ctx: Ctx) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = tiny().to(ctx.device)
    for block in model.blocks:
        fully_shard(block, mesh=ctx.mesh)
    fully_shard(model, mesh=ctx.mesh)
    return model


def _registered(model: nn.Module) -> dict:
    """The parameters FSDP has registered (objects and local values) and the hook counts."""
    def local(p):
        return (p.to_local() if hasattr(p, "to_local") else p).detach().clone()

    return {"params": {n: (id(p), type(p).__name__, local(p)) for n, p in model.named_parameters()},
            "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
            "training": {n: m.training for n, m in model.named_modules()}}


def _same_registered(a: dict, b: dict) -> bool:
    return (a["hooks"] == b["hooks"] and a["training"] == b["training"] and a["params"].keys() == b["params"].keys()
            and all(a["params"][k][:2] == b["params"][k][:2] and torch.equal(a["params"][k][2], b["params"][k][2])
                    for k in a["params"]))


def sc_fsdp(ctx: Ctx) -> dict:
    model = _fsdp(ctx)
    x = ctx.share(fsdp_batch(ctx.world))
    with tp.record(model) as rec:
        model(x)
    sharded = sorted({type(p).__name__ for b in model.blocks for p in b.parameters()})
    # the views report() copies: the same sharded parameters (gathered per module for its
    # forward), or gathered whole once; both compute what the FSDP model computes
    before = _registered(model)
    view, whole = tp.distributed.copyable(model), tp.distributed.copyable(model, gather=True)
    with torch.no_grad():
        out, out_view, out_whole = model(x), view(x), whole(x)
    view_params = {type(p).__name__ for p in view.parameters()}
    whole_shapes = {n: tuple(p.shape) for n, p in whole.named_parameters()}
    return {"rows": _local_rows(rec), "block_param_types": sharded,
            "gathered": gathered_stats(ctx, model, lambda: model(x), dim=0),
            "view_params": sorted(view_params), "whole_shapes": whole_shapes,
            "whole_types": sorted({type(p).__name__ for p in whole.parameters()}),
            "view_same": bool(torch.equal(out, out_view)), "whole_diff": float((out - out_whole).abs().max()),
            "view_names": [n for n, _ in view.named_modules()], "names": [n for n, _ in model.named_modules()],
            "unchanged": _same_registered(before, _registered(model))}


def _culprits(rep) -> list[tuple[str, str, str]]:
    return [(c.module, c.target, str(c.reason)) for c in rep.culprits]


def sc_ddp_culprit(ctx: Ctx) -> dict:
    net = dyadic_(NormNet(), 4).to(ctx.device)
    ddp = nn.parallel.DistributedDataParallel(net)
    x = ctx.share(culprit_batch(ctx.world))
    rep = tp.report(ddp, x, targets=("strict-onnx:fp16",))
    alone = tp.report(ddp, x, targets=("strict-onnx:fp16",), group=False)
    table = tp.isolate(ddp, x, target="strict-onnx:fp16")
    fix = tp.bisect(ddp, x, target="strict-onnx:fp16")
    rep.to_json(ctx.out / f"report_written_by_{ctx.rank}.json")
    return {"culprits": _culprits(rep), "alone": _culprits(alone), "ok": bool(rep),
            "root": row_dict(next(r for r in rep.rows if r.key == "(root)")),
            "isolate": [(r.key, r.error) for r in table.rows], "isolate_culprits": [r.module for r in table.culprits],
            "fix": (fix.keep_fp32, bool(fix), fix.error_before, fix.error_after, fix.evaluations)}


def sc_tp_culprit(ctx: Ctx) -> dict:
    """Rank world-1's column shard of fc1 is scaled 2**15: its outputs pass 65504 in FP16."""
    net = _tp_mlp(ctx)
    with torch.no_grad():
        if ctx.rank == ctx.world - 1:
            net.fc1.weight.to_local().mul_(2.0**15)
            net.fc1.bias.to_local().mul_(2.0**15)
    x = dyadic_inputs((6, 16), 22).to(ctx.device)
    before = {n: p.to_local().clone() for n, p in net.named_parameters()}
    rep = tp.report(net, x, targets=("eager:fp16", "strict-onnx:fp16"))
    alone = tp.report(net, x, targets=("eager:fp16",), group=False)
    table = tp.isolate(net, x, target="eager:fp16")
    unchanged = all(torch.equal(before[n], p.to_local()) for n, p in net.named_parameters())
    return {"culprits": _culprits(rep), "alone": _culprits(alone), "isolate_culprits": [r.module for r in table.culprits],
            "fc1": row_dict(next(r for r in rep.rows if r.key == "fc1")), "unchanged": unchanged}


def sc_fsdp_culprit(ctx: Ctx) -> dict:
    model = _fsdp(ctx)
    x = ctx.share(fsdp_batch(ctx.world, big=True))
    with torch.no_grad():
        model(x)  # FSDP's root keeps its parameters unsharded after a forward: the usual state
    before = _registered(model)
    rep = tp.report(model, x, targets=("strict-onnx:fp16",))
    alone = tp.report(model, x, targets=("strict-onnx:fp16",), group=False)
    fix = tp.bisect(model, x, target="strict-onnx:fp16", candidates=[c.module for c in rep.culprits] or None)
    return {"culprits": _culprits(rep), "alone": _culprits(alone), "ok": bool(rep),
            "fix": (fix.keep_fp32, bool(fix), fix.error_before, fix.error_after, fix.evaluations),
            "unchanged": _same_registered(before, _registered(model))}


def sc_mismatch(ctx: Ctx) -> dict:
    torch.manual_seed(5)
    net = Branchy().to(ctx.device)
    x = torch.full((2, 4), 1.0 if ctx.rank == ctx.world - 1 else -1.0, device=ctx.device)
    with torch.no_grad():
        net.fc.weight.copy_(torch.eye(4))
        net.fc.bias.zero_()
    try:
        with tp.record(net) as rec:
            net(x)
    except tp.distributed.RankMismatch as e:
        return {"error": str(e), "type": type(e).__name__}
    return {"error": None, "rows": _local_rows(rec)}


def sc_subgroup(ctx: Ctx) -> dict:
    """Ranks in pairs (0, 1), (2, 3): record(group=pair) merges over the pair only."""
    pairs = [torch.distributed.new_group([r, r + 1]) for r in range(0, ctx.world, 2)]  # every rank creates every group
    net = dyadic_(MLP(), 1).to(ctx.device)
    with tp.record(net, group=pairs[ctx.rank // 2]) as rec:
        net(ctx.share(ddp_batch(ctx.world)))
    return {"rows": _local_rows(rec)}


def sc_dumps(ctx: Ctx) -> dict:
    d = ctx.out
    net = dyadic_(MLP(), 1).to(ctx.device)
    ddp = nn.parallel.DistributedDataParallel(net)
    x = ctx.share(ddp_batch(ctx.world))
    with tp.record(ddp, capture=True) as rec:
        ddp(x)
    paths = [str(rec.save(d / "ddp_fp32.safetensors"))]
    paths.append(str(tp.dump(ddp, x, d / "ddp_fp16.safetensors", target="eager:fp16")))
    net2 = _tp_mlp(ctx)
    xt = dyadic_inputs((6, 16), 21).to(ctx.device)
    with tp.record(net2, capture=True) as rec2:
        net2(xt)
    paths.append(str(rec2.save(d / "tp_fp32.safetensors")))
    paths.append(str(tp.dump(net2, xt, d / "tp_fp16.safetensors", target="eager:fp16")))
    fsdp = _fsdp(ctx)
    paths.append(str(tp.dump(fsdp, ctx.share(fsdp_batch(ctx.world)), d / "fsdp_fp32.safetensors")))
    return {"paths": paths}


def sc_monitor(ctx: Ctx) -> dict:
    net = dyadic_(MLP(), 1).to(ctx.device)
    xs = [culprit_batch(ctx.world) * (2.0**s) for s in range(3)]
    with tp.Monitor(net, every=1) as mon:
        for x in xs:
            mon.step()
            with torch.no_grad():
                net(ctx.share(x))
    mon.save(ctx.out / f"monitor_written_by_{ctx.rank}.json")
    return {"absmax": {h.module: list(h.absmax) for h in mon.history}}


SCENARIOS = {
    2: ("ddp", "tp_mlp", "tp_attention", "fsdp", "ddp_culprit", "tp_culprit", "fsdp_culprit", "mismatch", "dumps",
        "monitor"),
    4: ("ddp", "tp_mlp", "tp_attention", "fsdp", "ddp_culprit", "fsdp_culprit", "subgroup"),
}


def _worker(rank: int, world: int, port: int, backend: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    if backend == "gloo" and loopback:  # gloo's own connections stay on 127.0.0.1 too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=90))
    ctx = Ctx(rank, world, backend, Path(out))
    results = {}
    try:
        for name in SCENARIOS[world]:
            try:
                results[name] = globals()[f"sc_{name}"](ctx)
            except Exception:  # noqa: BLE001 - reported by the test that reads this scenario
                results[name] = {"exception": traceback.format_exc()}
            torch.distributed.barrier()
    finally:
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """The results of one spawn: ``world[name]`` is the list of every rank's result of scenario ``name``."""

    def __init__(self, backend: str, size: int, out: Path) -> None:
        self.backend, self.size, self.out = backend, size, out
        self.ranks = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(size)]

    def __getitem__(self, name: str) -> list[dict]:
        if name not in SCENARIOS[self.size]:
            pytest.skip(f"scenario {name!r} runs with {', '.join(str(w) for w, s in SCENARIOS.items() if name in s)} "
                        "processes only (CI time)")
        results = [r[name] for r in self.ranks]
        for r, res in enumerate(results):
            if "exception" in res:
                pytest.fail(f"rank {r} failed in scenario {name!r}:\n{res['exception']}")
        return results


RUNS = [pytest.param(("gloo", 2), id="gloo-2"), pytest.param(("gloo", 4), id="gloo-4"),
        pytest.param(("nccl", 2), id="nccl-2", marks=needs_two_gpus)]


@pytest.fixture(scope="module", params=RUNS)
def world(request, tmp_path_factory) -> World:
    import torch.multiprocessing as mp

    backend, size = request.param
    out = tmp_path_factory.mktemp(f"{backend}{size}")
    ctx = mp.start_processes(_worker, args=(size, _free_port(), backend, str(out)), nprocs=size, join=False, start_method="spawn")
    deadline = 240.0
    import time

    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {size} {backend} workers did not finish within {deadline:.0f} s (a collective hung?)")
    return World(backend, size, out)


# -- record(): the whole logical tensor -------------------------------------------------------

def _ddp_name(key: str) -> str:
    """DDP names its module ``module``: module.fc1 -> fc1; module and (root) -> (root)."""
    return "(root)" if key in ("module", "(root)") else key.removeprefix("module.")


def test_ddp_rows_are_statistics_of_the_global_batch(world):
    results = world["ddp"]
    reference = reference_rows(dyadic_(MLP(), 1), ddp_batch(world.size))
    for res in results:
        assert_rows_match(res["rows"], reference, _ddp_name)
    assert all(res["rows"] == results[0]["rows"] for res in results)
    # group=False: each rank alone sees its own share only (the issue: rank 1 reported 17 of 1567)
    shares = [reference_rows(dyadic_(MLP(), 1), ddp_batch(world.size).chunk(world.size)[r]) for r in range(world.size)]
    for res, share in zip(results, shares):
        assert_rows_match(res["local"], share, _ddp_name)


def test_tensor_parallel_mlp_rows_follow_placements(world):
    results = world["tp_mlp"]
    reference = reference_rows(dyadic_(MLP(), 2), dyadic_inputs((6, 16), 21))
    # Shard merged across the mesh, Partial reduced before its statistics, Replicate counted once
    assert results[0]["placements"] == {"fc1": [("Shard", 1)], "act": [("Shard", 1)], "fc2": [("Partial", None)],
                                        "(root)": [("Replicate", None)]}
    for res in results:
        assert_rows_match(res["rows"], reference)
        assert {r["key"]: r["shape"] for r in res["rows"]}["fc1"] == (6, 32)  # the logical shape


def test_tensor_parallel_attention_rows(world):
    results = world["tp_attention"]
    torch.manual_seed(3)
    reference = reference_rows(dyadic_(Attention(), 3), dyadic_inputs((2, 5, 32), 31))
    for res in results:
        # o sums softmax-weighted values split over the ranks: the last bits differ from one process
        assert_rows_match(res["rows"], reference, inexact=("o", "(root)"))
        assert_rows_match(res["rows"], results[0]["gathered"])  # exactly what the sharded run held
        assert [r["key"] for r in res["rows"]] == ["q", "k", "v", "o", "(root)"]


def test_fsdp2_rows_are_statistics_of_the_global_batch(world):
    results = world["fsdp"]
    reference = reference_rows(tiny(), fsdp_batch(world.size), slices=world.size)
    assert results[0]["block_param_types"] == ["DTensor"]  # really sharded
    # FSDP's gathered parameters sit at other addresses than the unsharded model's, and CPU kernels
    # round by alignment: the last bit of a value may differ from one process
    everything = tuple(reference)
    for res in results:
        assert_rows_match(res["rows"], reference, inexact=everything)
        assert_rows_match(res["rows"], results[0]["gathered"])  # exactly what the sharded run held
        assert len(res["rows"]) == len(reference)
        # copyable(): the view keeps FSDP's shards (no gather), gather=True holds plain full tensors
        assert res["view_params"] == ["DTensor"] and res["whole_types"] == ["Parameter"]
        assert res["whole_shapes"] == {n: tuple(p.shape) for n, p in tiny().named_parameters()}
        assert res["view_same"] and res["whole_diff"] < 1e-5 and res["view_names"] == res["names"]
        assert res["unchanged"]


def test_a_subgroup_merges_its_own_ranks_only(world):
    results = world["subgroup"]
    x = ddp_batch(world.size)
    for r, res in enumerate(results):
        pair = torch.cat(x.chunk(world.size)[r // 2 * 2: r // 2 * 2 + 2])
        assert_rows_match(res["rows"], reference_rows(dyadic_(MLP(), 1), pair))


def test_ranks_that_ran_different_modules_are_named(world):
    results = world["mismatch"]
    last = world.size - 1
    for res in results:
        assert res["type"] == "RankMismatch"
        assert f"rank {last} has 'extra'" in res["error"] and "rank 0 has '(root)'" in res["error"]


# -- report, isolate, bisect: global verdicts, the same on every rank ---------------------------

def test_ddp_culprit_on_one_rank_is_found_on_every_rank(world):
    results = world["ddp_culprit"]
    expected = [("module.norm", "strict-onnx:fp16", "overflow")]
    for res in results:
        assert res["culprits"] == expected
        assert not res["ok"]
        assert res["isolate_culprits"] == ["module.norm"]
        keep, fixed, before, after, _ = res["fix"]
        assert keep == ("module.norm",) and fixed and after < 1e-2 < before
    assert all(res["fix"] == results[0]["fix"] and res["isolate"] == results[0]["isolate"] for res in results)
    assert results[0]["alone"] == [] and results[-1]["alone"] == expected  # only the last rank holds the outlier
    assert tp.Report.from_json(world.out / "report_written_by_0.json").culprits[0].module == "module.norm"
    assert not any((world.out / f"report_written_by_{r}.json").exists() for r in range(1, world.size))
    reference = reference_rows(dyadic_(NormNet(), 4), culprit_batch(world.size), slices=world.size)
    assert_rows_match([results[0]["root"]], reference, _ddp_name)


def test_tensor_parallel_culprit_in_one_shard_is_found_on_every_rank(world):
    results = world["tp_culprit"]
    for res in results:
        assert ("fc1", "eager:fp16", "overflow") in res["culprits"]
        assert res["isolate_culprits"][0] == "fc1"
        assert res["fc1"]["absmax"] > 65504 and res["unchanged"]
        assert res["culprits"] == results[0]["culprits"]
    # alone, rank 0 sees fc2 overflow (its output is all-reduced, so every rank holds it) but
    # not where it starts: fc1's overflowing columns sit on the last rank only
    assert ("fc1", "eager:fp16", "overflow") not in results[0]["alone"]
    assert ("fc1", "eager:fp16", "overflow") in results[-1]["alone"]


def test_fsdp2_culprit_on_one_rank_is_found_and_fixed_on_every_rank(world):
    results = world["fsdp_culprit"]
    for res in results:
        assert ("norm", "strict-onnx:fp16", "overflow") in res["culprits"] and not res["ok"]
        keep, fixed, before, after, _ = res["fix"]
        assert fixed and "norm" in keep and after < 1e-2 < before
        assert res["culprits"] == results[0]["culprits"] and res["fix"] == results[0]["fix"]
        assert res["unchanged"]  # FSDP's registered parameters, hooks and flags as they were
    assert results[0]["alone"] == []


# -- dumps: one file per rank, merged by compare -------------------------------------------------

def _single_process_dumps(tmp_path: Path, model: nn.Module, x: torch.Tensor, name: str) -> tp.DumpComparison:
    a = tp.dump(model, x, tmp_path / f"{name}_fp32.safetensors")
    b = tp.dump(model, x, tmp_path / f"{name}_fp16.safetensors", target="eager:fp16")
    return tp.compare(a, b)


def test_rank_dumps_carry_rank_and_world_size(world):
    results = world["dumps"]
    for r, res in enumerate(results):
        for path in res["paths"]:
            d = tp.load_dump(path)
            assert Path(path).name.endswith(f".rank{r}.safetensors")
            assert (d.rank, d.world_size) == (r, world.size) and d.run
    # tensor parallel: fc1 is a column shard on every rank; fc2 (Partial, reduced) and the root are
    # held whole by every rank and counted from rank 0 only
    layouts = [tp.load_dump(res["paths"][2]).layout for res in results]
    assert all(lay["global_shapes"]["fc1"] == [6, 32] for lay in layouts)
    assert layouts[0]["replicas"] == []
    assert all(lay["replicas"] == ["fc2", "(root)"] for lay in layouts[1:])  # fc2 as Partial, reduced
    assert tp.load_dump(results[0]["paths"][2])["fc1"].shape == (6, 32 // world.size)


def test_compare_merges_rank_dumps_like_one_process(world, tmp_path):
    world["dumps"]
    out = world.out
    single = _single_process_dumps(tmp_path, dyadic_(MLP(), 1), ddp_batch(world.size), "one")
    merged = tp.compare(out / "ddp_fp32.safetensors", out / "ddp_fp16.safetensors")
    assert [r.key for r in merged.rows] == ["module.fc1", "module.act", "module.fc2", "module", "(root)"]
    assert [r.key for r in single.rows] == ["fc1", "act", "fc2", "(root)"]
    for row in merged.rows:
        ref = single[_ddp_name(row.key)]
        for name in ("max_abs", "rel_l2", "cosine", "sqnr"):
            assert row.metrics[name] == pytest.approx(ref.metrics[name], rel=1e-9), (row.key, name)
    per_rank = tp.compare(out / "ddp_fp32.safetensors", out / "ddp_fp16.safetensors", by_rank=True)
    assert len(per_rank) == world.size and all(len(c.rows) == len(merged.rows) for c in per_rank)
    # tensor parallel: shards merged, replicas (the reduced Partial, the root) counted once. FP16
    # rowwise partial sums round otherwise than one FP16 matmul, so the reference is the rank
    # files' own tensors put together whole, measured in one piece
    fp32 = sorted(out.glob("tp_fp32.rank*.safetensors"))
    fp16 = sorted(out.glob("tp_fp16.rank*.safetensors"))
    tp_merged = tp.compare(fp32, fp16)
    for row in tp_merged.rows:
        whole = tp.measure(_whole(fp32, row.key), _whole(fp16, row.key))
        assert row.shape_a == tuple(_whole(fp32, row.key).shape) == (6, 32 if row.key in ("fc1", "act") else 16)
        for name in ("max_abs", "rel_l2", "cosine", "sqnr"):
            assert row.metrics[name] == pytest.approx(whole[name], rel=1e-9), (row.key, name)


def _whole(paths: list[Path], key: str) -> torch.Tensor:
    """One key of a set of tensor-parallel rank dumps as the whole logical tensor."""
    dumps = [tp.load_dump(p) for p in paths]
    shape = dumps[0].layout["global_shapes"][key]
    if key in dumps[1].layout["replicas"]:
        return dumps[0][key]
    parts = [d[key] for d in dumps]
    dim = next(i for i, (a, b) in enumerate(zip(parts[0].shape, shape)) if a != b)
    return torch.cat(parts, dim=dim)


def test_compare_refuses_a_mixed_set_of_rank_files(world):
    paths = [res["paths"] for res in world["dumps"]]
    ddp = [p[0] for p in paths]
    with pytest.raises(tp.InvalidArgument, match="different recordings"):
        tp.compare([ddp[0], paths[1][2]], [p[1] for p in paths])  # rank 0 of one run, rank 1 of another
    with pytest.raises(tp.InvalidArgument, match="rank 1 missing"):
        tp.compare([ddp[0]], [paths[0][1]])
    with pytest.raises(tp.InvalidArgument, match="rank 0 repeated"):
        tp.compare([ddp[0], ddp[0]], [p[1] for p in paths])
    with pytest.raises(tp.InvalidArgument, match="one dump but the other side is a set"):
        tp.compare(ddp[0], [p[1] for p in paths])


# -- Monitor ---------------------------------------------------------------------------------------

def test_monitor_samples_are_global_and_rank_0_writes(world):
    results = world["monitor"]
    net = dyadic_(MLP(), 1)
    expected: dict[str, list[float]] = {}
    for s in range(3):
        for name, stats in reference_rows(net, culprit_batch(world.size) * (2.0**s)).items():
            expected.setdefault(name, []).append(stats["absmax"])
    for res in results:
        assert res["absmax"] == expected
    assert (world.out / "monitor_written_by_0.json").exists()
    assert not any((world.out / f"monitor_written_by_{r}.json").exists() for r in range(1, world.size))


# -- without a process group: nothing changes --------------------------------------------------

def test_without_torch_distributed_group_options_are_local():
    net = dyadic_(MLP(), 1)
    x = ddp_batch(2)
    with tp.record(net) as rec:
        net(x)
    assert rec.group is None
    assert_rows_match([row_dict(r) for r in rec.rows], reference_rows(net, x))
    with pytest.raises(tp.InvalidArgument, match="needs torch.distributed"):
        with tp.record(net, group=object()):
            pass
    assert tp.distributed.copyable(net) is net
    assert tp.distributed.is_writer(0) and tp.distributed.is_writer(None)


def test_rank_path_names():
    from torchprobe.distributed import rank_path

    assert rank_path("out/fp32.safetensors", 1).as_posix() == "out/fp32.rank1.safetensors"
    assert rank_path("fp32.rank0.safetensors", 3).name == "fp32.rank3.safetensors"
    assert rank_path("dump", 0).name == "dump.rank0.safetensors"
