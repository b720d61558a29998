"""Multi-process checks (gloo on 127.0.0.1, CPU), run by tests/test_distributed.py.

Usage: python worker.py OUT_DIR W [W ...]. The modules are imported once, then for each world size W
the process forks W ranks (a free port each time) that run :func:`main` and write what the parent
test compares into OUT_DIR/world{W} (rank 0 also computes the one-device reference on an unsharded
copy of the same model).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import socket
import sys
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers import random_llama  # noqa: E402

import wagle  # noqa: E402
from wagle.distributed import ShardedMask  # noqa: E402


def batches(seed: int, count: int, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (2, 9), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


class WithScale(torch.nn.Module):
    """A Llama plus a 2-element parameter: at world size 3 one rank holds an empty shard of it."""

    def __init__(self, llama):
        super().__init__()
        self.llama = llama
        self.scale = torch.nn.Parameter(torch.tensor([1.0, 0.5]))

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = self.llama(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return types.SimpleNamespace(loss=out.loss * (self.scale[0] + self.scale[1]) / 1.5)


def shard(model):
    from torch.distributed.fsdp import fully_shard

    llama = model.llama if isinstance(model, WithScale) else model
    for layer in llama.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def one_rank_backward(model, batch, rank):
    """Backward of ``batch`` on rank 0; zero-weighted on the others (the summed gradient is exact)."""
    out = model(**batch)
    (out.loss if rank == 0 else out.loss * 0.0).backward()


def optimizer_checks(out, rank, world, forget, retain):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from wagle.distributed.attribution import summed_fsdp_gradients
    from wagle.distributed.clipping import clip_grad_norm_
    from wagle.distributed.optim import load_optimizer_state_dict, optimizer_state_dict

    base = random_llama(seed=8)
    full_mask = wagle.attribute(copy.deepcopy(base), forget, retain, ratio=0.5, progress=False)
    data = batches(9, 2)
    results = {}
    configs = [
        ("adamw_dense", wagle.MaskedAdamW, {"lr": 1e-2, "weight_decay": 0.1, "state_layout": "dense"}),
        ("adamw_compact", wagle.MaskedAdamW, {"lr": 1e-2, "weight_decay": 0.1, "state_layout": "compact"}),
        ("sgd_momentum", wagle.MaskedSGD, {"lr": 1e-1, "momentum": 0.9, "weight_decay": 0.1}),
    ]
    for key, cls, kw in configs:
        single = copy.deepcopy(base)
        opt = cls(single.named_parameters(), full_mask, **kw)
        for batch in data:
            single(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(single.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
        model = shard(copy.deepcopy(base))
        # the mask: sharded attribution's own parts (dense) or the full single-file mask (others)
        mask = (
            wagle.attribute(model, forget, retain, ratio=0.5, progress=False)
            if key == "adamw_dense"
            else full_mask
        )
        sharded_opt = cls(model.named_parameters(), mask, **kw)
        with summed_fsdp_gradients(model):
            for step, batch in enumerate(data):
                one_rank_backward(model, batch, rank)
                clip_grad_norm_(model.parameters(), 0.05)
                sharded_opt.step()
                sharded_opt.zero_grad()
                if step == 0:
                    folder = os.path.join(out, f"dcp_{key}")
                    dcp.save(
                        {"model": get_model_state_dict(model), "optim": optimizer_state_dict(sharded_opt)},
                        checkpoint_id=folder,
                    )
        single_params = dict(single.named_parameters())
        results[f"{key}_moved"] = not all(
            torch.equal(p, single_params[n]) for n, p in base.named_parameters()
        )
        results[key] = all(
            torch.equal(p.full_tensor(), single_params[n]) for n, p in model.named_parameters()
        )
        digests = [None] * world
        dist.all_gather_object(digests, sharded_opt.mask_digest())
        results[f"{key}_digest"] = len(set(digests)) == 1
        state = next(iter(sharded_opt.state.values()))
        results[f"{key}_local_state"] = all(not hasattr(v, "device_mesh") for v in state.values())

        # resume from the DCP checkpoint of step 1 and take step 2
        resumed = shard(copy.deepcopy(base))
        resumed_opt = cls(resumed.named_parameters(), mask, **kw)
        template = {"model": get_model_state_dict(resumed), "optim": optimizer_state_dict(resumed_opt)}
        dcp.load(template, checkpoint_id=folder)
        set_model_state_dict(resumed, template["model"])
        load_optimizer_state_dict(resumed_opt, template["optim"])
        with summed_fsdp_gradients(resumed):
            one_rank_backward(resumed, data[1], rank)
            clip_grad_norm_(resumed.parameters(), 0.05)
            resumed_opt.step()
        results[f"{key}_resume"] = all(
            torch.equal(p.full_tensor(), single_params[n]) for n, p in resumed.named_parameters()
        )
    return results


def same(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a.packed(n), b.packed(n)) for n in a)


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    forget, retain = batches(1, 2), batches(2, 2)
    cases = [("wagle", "global", 0.3), ("snip", "per_tensor", 0.5), ("random", "global", 0.6)]

    # FSDP2 attribution == one-device attribution, bit for bit
    base = WithScale(random_llama(seed=3))
    reference = {}
    if rank == 0:
        for method, scope, ratio in cases:
            reference[method] = wagle.attribute(
                copy.deepcopy(base),
                forget,
                retain,
                ratio=ratio,
                method=method,
                scope=scope,
                seed=5,
                progress=False,
            )
    model = shard(copy.deepcopy(base))
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    for method, scope, ratio in cases:
        sharded = wagle.attribute(
            model, forget, retain, ratio=ratio, method=method, scope=scope, seed=5, progress=False
        )
        assert isinstance(sharded, ShardedMask)
        full = sharded.gather()
        if rank == 0:
            results[f"fsdp_{method}"] = same(full, reference[method])
        if method == "wagle":
            sharded.save(os.path.join(out, "sharded_mask"))
            if rank == 0:
                reference[method].save(os.path.join(out, "one_device_mask.safetensors"))
            empty = torch.tensor([int(any(p.numel == 0 for p in sharded.parts.values()))])
            dist.all_reduce(empty)
            results["empty_shard"] = int(empty[0]) > 0
            results["local_matches"] = all(
                torch.equal(
                    sharded.local()[n], full[n].reshape(-1)[p.offset : p.offset + p.numel].view(p.shape)
                )
                for n, p in sharded.parts.items()
            )
    groups = model._get_fsdp_state()._fsdp_param_groups
    results["settings_restored"] = all(
        g.gradient_divide_factor is None and not g.force_sum_reduction_for_comms for g in groups
    )
    results["params_unchanged"] = all(
        torch.equal(before[n], p.full_tensor()) and p.grad is None and p.requires_grad
        for n, p in model.named_parameters()
    )

    # offload + gradient checkpointing on a plain FSDP2 Llama
    llama = random_llama(seed=4)
    ref = None
    if rank == 0:
        ref = wagle.attribute(copy.deepcopy(llama), forget, retain, ratio=0.4, progress=False)
    sharded = wagle.attribute(
        shard(llama),
        forget,
        retain,
        ratio=0.4,
        offload_gradients=True,
        gradient_checkpointing=True,
        progress=False,
    ).gather()
    if rank == 0:
        results["fsdp_offload_checkpointing"] = same(sharded, ref)

    # two masked optimizer steps (weight decay, clipping) on FSDP2 == one device; DCP resume
    results.update(optimizer_checks(out, rank, world, forget, retain))

    # DDP: reduce-scatter, select per range, all-gather: the full mask on every rank
    ddp_base = random_llama(seed=6)
    ddp_ref = wagle.attribute(copy.deepcopy(ddp_base), forget, retain, ratio=0.45, progress=False)
    ddp = torch.nn.parallel.DistributedDataParallel(ddp_base)
    ddp_mask = wagle.attribute(ddp, forget, retain, ratio=0.45, progress=False)
    flags = torch.tensor([int(same(ddp_mask, ddp_ref))])
    dist.all_reduce(flags)
    results["ddp"] = int(flags[0]) == world

    if world == 2:  # wagle.unlearn on FSDP2 (one world size keeps the job short)
        results.update(unlearn_checks(out, rank, world))
    results.update(cli_checks(out, rank, world))
    if rank == 0:
        with open(os.path.join(out, "results.json"), "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


def cli_checks(out, rank, world):
    """`wagle mask` as torchrun runs it (the same environment variables) == `wagle mask` on one device."""
    import shutil

    from helpers import tiny_model, tiny_tokenizer

    from wagle.cli import main as cli
    from wagle.models import save_model
    from wagle.synthetic.authors import generate_rows

    root = os.path.join(out, "cli")
    rows = generate_rows(num_authors=20, seed=0)["full"]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        save_model(tiny_model(), tiny_tokenizer(), os.path.join(root, "model"))
        for name, part in (("forget", rows[:4]), ("retain", rows[4:8])):
            with open(os.path.join(root, f"{name}.jsonl"), "w") as handle:
                for row in part:
                    handle.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    dist.barrier()
    args = ["mask", "--model", os.path.join(root, "model"), "--forget", os.path.join(root, "forget.jsonl")]
    args += ["--retain", os.path.join(root, "retain.jsonl"), "--batch-size", "2", "--ratio", "0.4"]
    args += ["--device", "cpu", "--no-progress"]
    results = {}
    if rank == 0:  # the one-device command
        os.environ["WORLD_SIZE"] = "1"
        results["cli_single_exit"] = cli([*args, "--out", os.path.join(root, "single.safetensors")])
        os.environ["WORLD_SIZE"] = str(world)
    dist.barrier()
    os.environ["LOCAL_RANK"] = str(rank)
    code = cli([*args, "--out", os.path.join(root, "sharded.safetensors")])
    codes = [None] * world
    dist.all_gather_object(codes, code)
    results["cli_sharded_exits"] = codes
    # `wagle unlearn` (masked NPO, a checkpoint per step) on one device, then under torchrun twice
    # (the second run resumes the finished run from its last checkpoint and saves the model again)
    unlearn = ["unlearn", *args[1:7], "--mask", os.path.join(root, "single.safetensors"), "--steps", "2"]
    unlearn += ["--lr", "5e-3", "--grad-accum", "2", "--checkpoint-every", "1", "--device", "cpu"]
    unlearn += ["--no-progress"]
    if rank == 0:
        os.environ["WORLD_SIZE"] = "1"
        results["cli_unlearn_single_exit"] = cli([*unlearn, "--out", os.path.join(root, "u_single")])
        os.environ["WORLD_SIZE"] = str(world)
    dist.barrier()
    for run in ("first", "resumed"):
        code = cli([*unlearn, "--out", os.path.join(root, "u_sharded")])
        dist.all_gather_object(codes, code)
        results[f"cli_unlearn_{run}_exits"] = codes[:]
        if rank == 0:
            shutil.copytree(os.path.join(root, "u_sharded", "model"), os.path.join(root, f"u_{run}"))
        dist.barrier()
    return results


def _params(model):
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def unlearn_checks(out, rank, world):
    """``wagle.unlearn`` on FSDP2 == one device (NPO and GradDiff, masked); DCP resume == uninterrupted;
    ``wagle unlearn`` under torchrun == on one device."""
    import shutil

    from helpers import tiny_model, tiny_tokenizer

    from wagle.data import make_dataloader
    from wagle.distributed.launch import shard_model
    from wagle.synthetic.authors import generate_rows

    tokenizer = tiny_tokenizer()
    base = tiny_model(seed=1)
    rows = generate_rows(num_authors=20, seed=0)["full"]
    forget = [{"question": r["question"], "answer": r["answer"]} for r in rows[:6]]
    retain = [{"question": r["question"], "answer": r["answer"]} for r in rows[6:12]]
    loaders = [make_dataloader(rows, tokenizer, batch_size=3) for rows in (forget, retain)]
    mask = wagle.attribute(copy.deepcopy(base), *loaders, ratio=0.5, progress=False)
    common = {"tokenizer": tokenizer, "mask": mask, "lr": 5e-3, "batch_size": 2, "progress": False}
    cases = {  # grad_accum <= world: every micro-batch enters one SUM reduce-scatter
        "npo": {"method": "npo", "steps": 3, "grad_accum": 2, "max_grad_norm": 0.5},
        "grad_diff": {"method": "grad_diff", "steps": 3, "grad_accum": 1, "clip_mode": "clip_then_mask"},
        "grad_diff_accum4": {"method": "grad_diff", "steps": 2, "grad_accum": 4},
    }
    results = {}
    for key, kw in cases.items():
        reference = copy.deepcopy(base)
        ref = wagle.unlearn(reference, forget, retain, **common, **kw) if rank == 0 else None
        model = shard_model(copy.deepcopy(base))
        got = wagle.unlearn(model, forget, retain, **common, **kw)
        params = _params(model)
        if rank == 0:
            want = dict(reference.named_parameters())
            results[f"unlearn_{key}_moved"] = not all(
                torch.equal(p, want[n]) for n, p in base.named_parameters()
            )
            results[f"unlearn_{key}"] = all(torch.equal(params[n], want[n]) for n in want)
            results[f"unlearn_{key}_max_diff"] = _max_diff(params, {n: p.detach() for n, p in want.items()})
            strip = [{k: v for k, v in r.items() if k != "grad_norm"} for r in got.history]
            want_history = [{k: v for k, v in r.items() if k != "grad_norm"} for r in ref.history]
            if kw["grad_accum"] > world:  # summed in another order: within tolerance, like the weights
                results[f"unlearn_{key}_history"] = len(strip) == len(want_history) and all(
                    a.keys() == b.keys()
                    and all(a[k] == b[k] or abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) for k in a)
                    for a, b in zip(strip, want_history, strict=True)
                )
            else:
                results[f"unlearn_{key}_history"] = strip == want_history

    # resume: 4 steps with a checkpoint at 2; drop the one of step 4 and resume a fresh model from 2
    folder = os.path.join(out, "unlearn_ckpt")
    kw = {**cases["npo"], "steps": 4, "checkpoint_dir": folder, "checkpoint_every": 2}
    whole = shard_model(copy.deepcopy(base))
    wagle.unlearn(whole, forget, retain, **common, **kw)
    uninterrupted = _params(whole)
    if rank == 0:
        shutil.rmtree(os.path.join(folder, "checkpoint-000004"))
    dist.barrier()
    again = shard_model(copy.deepcopy(base))
    resumed = wagle.unlearn(again, forget, retain, **common, **kw)
    params = _params(again)
    if rank == 0:
        results["unlearn_resumed_from"] = resumed.resumed_from
        results["unlearn_resume"] = all(torch.equal(params[n], uninterrupted[n]) for n in params)
    try:
        wagle.unlearn(shard_model(copy.deepcopy(base)), forget, retain, **{**common, **kw, "lr": 1e-3})
        results["unlearn_mismatch_refused"] = False
    except wagle.unlearning.ResumeMismatchError as exc:
        results["unlearn_mismatch_refused"] = "lr 0.005 -> 0.001" in str(exc)
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world)}
    )
    torch.set_num_threads(1)
    main(out)


if __name__ == "__main__":
    import transformers  # noqa: F401 - imported once here, inherited by the forked ranks
    from transformers import LlamaForCausalLM  # noqa: F401

    root = sys.argv[1]
    context = multiprocessing.get_context("fork")
    failed = []
    for world in map(int, sys.argv[2:]):
        port = free_port()
        ranks = [
            context.Process(target=child, args=(r, world, port, os.path.join(root, f"world{world}")))
            for r in range(world)
        ]
        for proc in ranks:
            proc.start()
        for proc in ranks:
            proc.join(600)
        failed += [f"world {world} rank {r}: exit {p.exitcode}" for r, p in enumerate(ranks) if p.exitcode]
    if failed:
        sys.exit("; ".join(failed))
