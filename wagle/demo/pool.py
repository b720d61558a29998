"""Independent demo computations on a fixed torch thread count, in parallel processes or in-process.

A CPU BLAS sums a matrix product in an order that depends on the number of threads, so a model
trained with 2 threads differs in the last bits from one trained with 1, and a long unlearning run
turns those bits into a visibly different table. :class:`PinnedPool` runs every task with torch's
intra-op threads set to ``num_threads``, either in this process (``workers=1``) or in ``workers``
spawned processes (each pinned the same way). Tasks are module-level functions of picklable
arguments that depend on nothing else (models are rebuilt from state dicts, RNGs seeded inside),
so a task's result is the same whichever process runs it and however many there are.
"""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import resource
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from wagle.errors import UserError
from wagle.models.finetune import _torch_threads
from wagle.validation import check_number


def default_workers(tasks: int) -> int:
    """``min(os.cpu_count(), tasks)`` (at least 1)."""
    return max(1, min(os.cpu_count() or 1, tasks))


def _dumps(obj: Any) -> bytes:
    """Pickle through ``torch.save`` (tensors as plain bytes, no shared-memory file descriptors)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _pin(num_threads: int) -> None:
    torch.set_num_threads(num_threads)


def _call(payload: bytes) -> bytes:
    fn, args = _loads(payload)
    return _dumps(fn(*args))


class PinnedPool:
    """Run ``fn(*args)`` tasks with torch pinned to ``num_threads`` intra-op threads: in-process when
    ``workers == 1``, else in ``workers`` spawned processes. Results come back in task order."""

    def __init__(self, workers: int = 1, num_threads: int = 1):
        check_number("workers", workers, low=1, integer=True)
        check_number("num_threads", num_threads, low=1, integer=True)
        self.workers, self.num_threads = workers, num_threads
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        if workers > 1:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_pin,
                initargs=(num_threads,),
            )

    def run(
        self, calls: Iterable[tuple[Callable, Sequence]], *, on_done: Callable[[], None] | None = None
    ) -> list:
        """``[fn(*args) for fn, args in calls]``; ``on_done`` is called in this process after each call."""
        calls = [(fn, tuple(args)) for fn, args in calls]
        if self._executor is None:
            results = []
            with _torch_threads(self.num_threads):
                for fn, args in calls:
                    results.append(fn(*args))
                    if on_done is not None:
                        on_done()
            return results
        futures = [self._executor.submit(_call, _dumps(call)) for call in calls]
        try:
            if on_done is not None:
                for _ in concurrent.futures.as_completed(futures):
                    on_done()
            return [_loads(f.result()) for f in futures]
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise UserError(f"workers: a demo worker process died ({exc}); rerun with workers=1") from None

    def map(self, fn: Callable, tasks: Iterable[Sequence]) -> list:
        """``[fn(*args) for args in tasks]``."""
        return self.run((fn, args) for args in tasks)

    def close(self) -> None:
        """Shut the worker processes down (their CPU time then counts in :func:`cpu_seconds`)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> PinnedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished (joined) child processes."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
