"""Run ``wagle`` and kill -9 the process at a chosen point (a helper of tests/test_faults.py).

usage: python fault_driver.py POINT N WAGLE-ARGS...

POINT names where the N-th occurrence of an event ends the process with SIGKILL:

* ``loss``: inside the N-th objective call (mid-step, after the earlier micro-batches' backward);
* ``optimizer-step``: in the N-th optimizer step, after its first parameters were updated;
* ``checkpoint-write``: half of the N-th checkpoint's ``optimizer.pt`` written;
* ``checkpoint-publish``: the N-th checkpoint complete under its temporary name, not yet renamed;
* ``latest``: the N-th checkpoint renamed into place, ``latest`` not yet replaced;
* ``prune``: one file of the N-th pruned checkpoint deleted, the rest not;
* ``model-write``: half of the final model's ``model.safetensors`` written;
* ``model-swap``: the previous model folder moved aside, the new one not yet moved in.
"""

from __future__ import annotations

import io
import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counter(n: int):
    calls = {"count": 0}

    def hit() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    return hit


def install(point: str, n: int) -> None:
    import shutil

    import torch
    import transformers

    import wagle.unlearning.checkpoint as checkpoint
    from wagle.objectives import Objective
    from wagle.optim import MaskedAdamW

    hit = counter(n)
    if point == "loss":
        real_call = Objective.__call__

        def call(self, *args):
            if hit():
                die()
            return real_call(self, *args)

        Objective.__call__ = call
    elif point == "optimizer-step":
        real_items = MaskedAdamW._step_items

        def step_items(self, group, items):
            real_items(self, group, items[:1])
            if hit():
                die()
            if len(items) > 1:
                real_items(self, group, items[1:])

        MaskedAdamW._step_items = step_items
    elif point == "checkpoint-write":
        real_save = torch.save

        def save(obj, path, *args, **kwargs):
            if not hit():
                return real_save(obj, path, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(path, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            die()

        torch.save = save
    elif point == "checkpoint-publish":
        real_replace = checkpoint.replace_folder

        def replace_folder(tmp, path):
            if hit():
                die()
            real_replace(tmp, path)

        checkpoint.replace_folder = replace_folder
    elif point == "latest":
        real_write = checkpoint.atomic_write_text

        def write(path, text):
            if hit():
                die()
            real_write(path, text)

        checkpoint.atomic_write_text = write
    elif point == "prune":
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if os.path.basename(str(path)).startswith("checkpoint-") and hit():
                os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))
                die()
            real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif point == "model-write":
        real_save_pretrained = transformers.PreTrainedModel.save_pretrained

        def save_pretrained(self, folder, *args, **kwargs):
            real_save_pretrained(self, folder, *args, **kwargs)
            if hit():
                path = os.path.join(folder, "model.safetensors")
                os.truncate(path, os.path.getsize(path) // 2)
                die()

        transformers.PreTrainedModel.save_pretrained = save_pretrained
    elif point == "model-swap":
        real_os_replace = os.replace

        def replace(src, dst):
            real_os_replace(src, dst)
            if os.path.basename(str(src)) == "model" and ".old-model-" in str(dst) and hit():
                die()

        os.replace = replace
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    from wagle.cli import main

    raise SystemExit(main(sys.argv[3:]))
