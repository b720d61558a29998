"""Run ``wagle compare --preset study`` and record its wall time and results under benchmarks/results/.

    python benchmarks/bench_compare_study.py --out study-run --cache-dir ~/.cache/wagle [--threads 2]

The record holds the environment (torch/triton versions, the pinned torch thread count), the wagle
version and git commit, the wall and CPU seconds of the model building and of the study (this process
plus the two model-training worker processes), the 1-minute load average before and after (a machine
shared with other work makes wall time longer than CPU time / threads), and the study's tables
(mean+-std over seeds, utility at matched forgetting). Run it again with the same ``--out`` to resume
an interrupted study; the timings then cover that call.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, results_path, write_json  # noqa: E402


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return (
            done.stdout.strip() + ("+uncommitted changes" if dirty else "")
            if done.returncode == 0
            else "unknown"
        )
    except OSError:
        return "unknown"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="study output folder (results.jsonl, report.json, ...)")
    parser.add_argument("--cache-dir", required=True, help="where the study models are cached")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--result", default=None, help="record file (default benchmarks/results/...)")
    args = parser.parse_args(argv)

    import torch

    import wagle
    from wagle.comparison.study import run_study

    torch.set_num_threads(args.threads)
    commit = _commit()  # before the run: the code that runs is the code at this commit
    load_before = os.getloadavg()[0]
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    report = run_study(args.out, args.cache_dir, num_threads=args.threads, progress=False)
    wall, cpu, children = time.perf_counter() - wall, time.process_time() - cpu, _children_cpu() - children
    info = environment()
    record = {
        "benchmark": "wagle compare --preset study",
        "environment": info,
        "wagle": wagle.__version__,
        "commit": commit,
        "torch_threads": report["torch_threads"],
        "wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "worker_cpu_seconds": children,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "study_models": {
            "from_cache": report["study_models"]["from_cache"],
            "seconds": report["study_models"]["seconds"],
            "train_seconds": report["study_models"]["manifest"].get("train_seconds"),
            "train_cpu_seconds": report["study_models"]["manifest"].get("train_cpu_seconds"),
            "train_workers": report["study_models"]["manifest"].get("workers"),
            "train_threads_per_model": report["study_models"]["manifest"].get("num_threads"),
            "recipe": report["study_models"]["manifest"]["recipe"],
        },
        "timings_seconds": report["timings_seconds"],
        "runs": report["runs"],
        "grid": report["study"]["grid"],
        "settings": report["study"]["settings"],
        "fingerprint": report["fingerprint"],
        "references": report["references"],
        "table": report["table"].splitlines(),
        "matched_table": report["matched_table"].splitlines(),
        "matched": report["matched"],
        "cells": report["cells"],
    }
    path = args.result or results_path("compare-study", info)
    write_json(path, record)
    print(report["table"])
    print(report["matched_table"])
    print(
        f"wall {wall:.0f}s, CPU {cpu:.0f}s + {children:.0f}s in workers, {args.threads} threads; "
        f"record: {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
