"""Sharded selection benchmark: bytes communicated and time per phase, per world size (gloo on CPU,
NCCL on GPUs).

For each world size W the script forks W ranks (127.0.0.1, a free port each time). Every rank holds
``torch.chunk``-sized flat ranges of every parameter of a Llama-2 shape set (its own random bf16
weights and gradients: the values do not matter for the cost) and runs
:func:`wagle.distributed.select_segments`, then gathers the full mask. Reported per rank 0: bytes it
sent per collective kind (all-reduce of histograms and counts, all-gather of tie counts), wall time
per phase (keys, counts, radix, ties, masks) and of the full-mask gather. Bytes per selection do not
depend on the number of weights: the table shows two shape sets.

    python benchmarks/bench_sharded.py --shapes llama2-5m llama2-50m --worlds 1 2 3
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import SHAPE_SETS, environment, results_path, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(rank, world, port, shapes_name, ratio, scope, repeats, queue):
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    torch.set_num_threads(1)
    from wagle.distributed import Collectives, Segment, select_segments

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shapes = SHAPE_SETS[shapes_name]()
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    segments = []
    for name, shape in shapes.items():
        n = math.prod(shape)
        size = -(-n // world)
        lo = min(rank * size, n)
        num = min(n, lo + size) - lo
        w, gf, gr = (torch.randn(num, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
        segments.append(Segment(name, lo, num, w.mul_(0.02), gf.mul_(1e-3), gr.mul_(1e-9)))
    rows = []
    for _ in range(repeats):
        comm = Collectives()
        dist.barrier()
        start = time.perf_counter()
        mask, stats = select_segments(
            shapes, segments, ratio=ratio, scope=scope, method="wagle", comm=comm, return_stats=True
        )
        selected = time.perf_counter() - start
        before = comm.stats.total_bytes
        sent = {
            "all_reduce": stats.comm.all_reduce_bytes,
            "all_gather": stats.comm.all_gather_bytes,
            "broadcast": stats.comm.broadcast_bytes,
            "total": before,
        }
        calls = dict(stats.comm.calls)
        start = time.perf_counter()
        full = mask.gather(comm)
        gathered = time.perf_counter() - start
        rows.append(
            {
                "seconds_select": selected,
                "seconds_phases": stats.seconds,
                "seconds_gather_full_mask": gathered,
                "bytes_selection": sent,
                "bytes_gather_full_mask": comm.stats.total_bytes - before,
                "collectives": calls,
                "radix_passes": stats.radix_passes,
                "tie_gathers": stats.tie_gathers,
                "selected": full.num_selected,
            }
        )
    if rank == 0:
        best = min(rows, key=lambda r: r["seconds_select"])
        queue.put(
            {
                "world_size": world,
                "shapes": shapes_name,
                "numel": sum(map(math.prod, shapes.values())),
                **best,
            }
        )
    dist.destroy_process_group()


def commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["llama2-5m", "llama2-50m"], choices=sorted(SHAPE_SETS)
    )
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--scope", default="global", choices=["global", "per_tensor"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    import wagle

    context = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    rows = []
    for shapes in args.shapes:
        for world in args.worlds:
            queue = context.Queue()
            port = free_port()
            procs = [
                context.Process(
                    target=rank_main,
                    args=(r, world, port, shapes, args.ratio, args.scope, args.repeats, queue),
                )
                for r in range(world)
            ]
            for p in procs:
                p.start()
            row = queue.get(timeout=1800)
            for p in procs:
                p.join()
            if any(p.exitcode for p in procs):
                raise RuntimeError(f"a rank failed (world {world}, shapes {shapes})")
            rows.append(row)
            sent = row["bytes_selection"]
            print(
                f"{shapes:>11} N={row['numel']:>10} W={world}: select {row['seconds_select']:.3f}s "
                f"gather {row['seconds_gather_full_mask']:.3f}s, sent {sent['total']} B "
                f"(all-reduce {sent['all_reduce']}, all-gather {sent['all_gather']})"
            )
    info = environment()
    payload = {
        "benchmark": "sharded selection: bytes communicated per rank and time per phase",
        "environment": {**info, "wagle": wagle.__version__, "commit": commit()},
        "config": {
            "ratio": args.ratio,
            "scope": args.scope,
            "method": "wagle",
            "dtype": "bf16",
            "repeats": args.repeats,
        },
        "results": rows,
    }
    write_json(args.out or results_path("sharded", info), payload)
    return payload


if __name__ == "__main__":
    main()
