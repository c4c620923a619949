"""Overhead of ``torchprobe.record()`` under torch.distributed: 2 CPU ranks (gloo) against one process.

    python benchmarks/distributed_overhead.py              # small ResNet b8 32x32, BERT 4L-256 b8 s128
    python benchmarks/distributed_overhead.py --quick      # fewer repetitions

First one process runs the plain forward and ``record(group=False)``; then two processes (spawned,
gloo on 127.0.0.1, one intra-op thread each) run, on the same per-rank batch, the plain forward,
``record(group=False)`` (local statistics) and ``record()`` (rows merged across both ranks when the
block exits: a 3-integer fingerprint all_gather, then one all_gather of the stacked summary
vectors), and the merge alone (``torchprobe.distributed.merged_stats`` on a finished recording).
Variants run interleaved in a rotating order, the ranks meeting at a barrier (untimed) before
every sample so that both time the same work; one sample is ``with tp.record(model) as rec:
model(x)`` followed by ``rec.rows``. The table gives rank 0's medians of wall time (a collective
waits for the other rank: thread CPU time would hide that) and, for the merge, of thread CPU time.
The headline is merged / local within the same 2-rank run: on a machine with fewer free cores than
ranks the forward itself slows down (compare the plain columns), which is not torchprobe's cost.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torchprobe as tp  # noqa: E402
from torchprobe import distributed as D  # noqa: E402

WORKLOADS = {"cnn": C.small_cnn, "bert": C.small_bert}


def _samples(variants: dict[str, Callable[[], Any]], reps: int, warmup: int, barrier: Callable[[], None]) -> dict[str, dict]:
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            barrier()
            variants[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            barrier()
            t0, c0 = time.perf_counter(), time.thread_time()
            variants[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.thread_time() - c0)
    return {n: {"wall": statistics.median(wall[n]), "cpu": statistics.median(cpu[n])} for n in names}


def _variants(w: C.Workload, distributed: bool) -> tuple[dict[str, Callable[[], Any]], int]:
    def plain() -> Any:
        return w.call()

    def local() -> Any:
        with tp.record(w.model, group=False) as rec:
            w.call()
        return rec.rows

    variants = {"plain": plain, "record local": local}
    with tp.record(w.model, group=False) as done:
        w.call()
    rows = len(done.rows)
    if distributed:
        entries = [(p.dtype, p.shape, p.vector) for p in done._pending]
        keys = [p.key for p in done._pending]
        group = D.resolve_group(None)

        def merged() -> Any:
            with tp.record(w.model) as rec:
                w.call()
            return rec.rows

        variants["record merged"] = merged
        variants["merge only"] = lambda: D.merged_stats(entries, keys, group, done._summarize.layout)
    return variants, rows


def _run(names: list[str], reps: int, warmup: int, distributed: bool) -> dict[str, Any]:
    barrier = torch.distributed.barrier if distributed else (lambda: None)
    out: dict[str, Any] = {}
    for name in names:
        w = WORKLOADS[name]("cpu")
        variants, rows = _variants(w, distributed)
        out[w.name] = {"rows": rows, **_samples(variants, reps, warmup, barrier)}
    return out


def _worker(rank: int, world: int, port: int, names: list[str], reps: int, warmup: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    if loopback:  # gloo's own connections stay on 127.0.0.1 too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        result = _run(names, reps, warmup, distributed=True)
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--world", type=int, default=2)
    args, _ = C.setup(p, argv)
    reps = args.reps or (5 if args.quick else 20)
    warmup = 1 if args.quick else 3
    one = _run(args.models, reps, warmup, distributed=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(args.world, port, args.models, reps, warmup, d), nprocs=args.world)
        ranks = [pickle.loads(Path(d, f"rank{r}.pkl").read_bytes()) for r in range(args.world)]
    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    table = []
    for name, single in one.items():
        r0 = ranks[0][name]
        slowest = max(r[name]["record merged"]["wall"] for r in ranks)
        table.append([
            f"{name} ({single['rows']} rows)", ms(single["plain"]["wall"]), ms(single["record local"]["wall"]),
            ms(r0["plain"]["wall"]), ms(r0["record local"]["wall"]), ms(r0["record merged"]["wall"]), ms(slowest),
            f"**{r0['record merged']['wall'] / r0['record local']['wall']:.2f}x**",
            f"{r0['record merged']['wall'] / single['record local']['wall']:.2f}x",
            f"{ms(r0['merge only']['wall'])} / {ms(r0['merge only']['cpu'])}",
        ])
    print(f"{C.environment(torch.device('cpu'))}; {args.world} gloo ranks on 127.0.0.1; {reps} samples, medians of wall time")
    print(tabulate(table, headers=["model", "1 proc plain ms", "1 proc record ms", "rank 0 plain ms", "rank 0 record local ms",
                                   "rank 0 record merged ms", "slowest rank merged ms", "merged / local",
                                   "merged / 1 proc record", "merge only ms (wall / cpu)"], tablefmt="github"))


if __name__ == "__main__":
    main()
