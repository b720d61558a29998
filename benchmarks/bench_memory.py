"""Memory and time of a real-size run: attribution (g_f, g_r, mask) and one NPO+WAGLE step.

A model with the Llama-2-7B architecture (random init, bf16) on the GPU, one forget and one retain
batch of ``--seq`` tokens. Phases, each with peak allocated memory and time:

* ``attribution``      - wagle.attribute (forget grads moved out of .grad, retain grads in .grad, mask),
  for the first ratio with g_f on the device, for the others with ``offload_gradients=True``;
* ``npo step r=...``   - NPO (reference log-probs precomputed) + retain NLL, backward with
  gradient checkpointing, MaskedAdamW(compact, fp32 and bf16 moments) stepping each parameter in
  backward (no model-sized gradient buffer), for every ratio;
* ``reference step``   - the reference implementation's procedure as far as it fits: a second model
  copy for NPO, full torch AdamW state, grad * bool mask.

    python benchmarks/bench_memory.py --arch llama2-7b          # GPU
    python benchmarks/bench_memory.py --arch tiny --device cpu  # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, results_path, synchronize, write_json  # noqa: E402

STATE_DTYPES = (torch.float32, torch.bfloat16)
ARCHS = {
    "llama2-7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    },
}


def build_model(arch: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **ARCHS[arch],
        num_key_value_heads=ARCHS[arch]["num_attention_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def batch(vocab: int, seq: int, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
        "example_index": torch.zeros(1, dtype=torch.long, device=device),
    }


class Phase:
    """Context manager recording time and peak allocated memory of one phase."""

    def __init__(self, name: str, device: str, rows: list):
        self.name, self.device, self.rows = name, device, rows

    def __enter__(self):
        synchronize(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb):
        synchronize(self.device)
        row = {"phase": self.name, "seconds": time.perf_counter() - self.start}
        if self.device.startswith("cuda"):
            row["peak_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
        if exc_type is torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            self.rows.append(row)
            torch.cuda.empty_cache()
            return True
        self.rows.append(row)
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama2-7b")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ratios", default="0.5,0.1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import wagle
    from wagle.models import activation_checkpointing
    from wagle.objectives import NPO

    device, rows = args.device, []
    model = build_model(args.arch, device)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    vocab = ARCHS[args.arch]["vocab_size"]
    forget, retain = batch(vocab, args.seq, device, 1), batch(vocab, args.seq, device, 2)
    masks = {}
    for index, ratio in enumerate(float(r) for r in args.ratios.split(",")):
        offload = index > 0  # the first ratio with g_f on the device, the others with g_f in host memory
        with Phase(f"attribution r={ratio} offload_gradients={offload}", device, rows):
            masks[ratio] = wagle.attribute(
                model,
                [forget],
                [retain],
                ratio=ratio,
                offload_gradients=offload,
                gradient_checkpointing=True,
                progress=False,
            )
    for (ratio, mask), state_dtype in [(item, dt) for item in masks.items() for dt in STATE_DTYPES]:
        trial = model  # the step changes selected weights only; fine for a memory/time measurement
        objective = NPO(beta=0.1)
        objective.prepare(trial, [forget], None, progress=False)
        trainable = [(n, p) for n, p in trial.named_parameters() if mask.selected(n) > 0]
        names = {n for n, _ in trainable}
        for n, p in trial.named_parameters():
            p.requires_grad_(n in names)
        optimizer = wagle.MaskedAdamW(
            trainable, mask, lr=1e-5, state_layout="compact", state_dtype=state_dtype, unmasked="freeze"
        )
        hooks = wagle.StepInBackward(optimizer, clip_norm_per_param=1.0)
        trial.train()
        for step in range(2):  # the first step allocates optimizer state (and compiles kernels)
            name = f"npo+wagle step {step} r={ratio} state={str(state_dtype)[6:]}"
            with Phase(name, device, rows), activation_checkpointing(trial):
                loss, _ = objective(trial, forget, retain)
                loss.backward()
        hooks.remove()
        rows[-1]["optimizer_state_GB"] = optimizer.state_nbytes() / 1e9
        del optimizer, hooks
        for p in trial.parameters():
            p.requires_grad_(True)
            p.grad = None
    if not args.skip_reference:
        mask = masks[max(masks)]
        bool_masks = {n: mask[n].to(device) for n in mask}
        name = "reference step (frozen copy, full AdamW, grad*mask)"
        with Phase(name, device, rows), activation_checkpointing(model):
            model.train()
            frozen = copy.deepcopy(model).eval()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            for _ in range(2):
                from wagle.objectives.base import mean_nll, sequence_logprob

                with torch.no_grad():
                    ref, _ = sequence_logprob(frozen, forget)
                logp, _ = sequence_logprob(model, forget)
                loss = -(2 / 0.1) * torch.nn.functional.logsigmoid(-0.1 * (logp - ref)).mean() + mean_nll(
                    model, retain
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                for n, p in model.named_parameters():
                    p.grad.mul_(bool_masks[n])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    payload = {
        "benchmark": "7B memory study",
        "environment": environment(),
        "config": {"arch": args.arch, "seq": args.seq, "device": device, "weights_GB": weights_gb},
        "results": rows,
    }
    path = args.out or results_path(f"memory-{args.arch}", payload["environment"])
    write_json(path, payload)
    print(f"{args.arch}: bf16 weights {weights_gb:.2f} GB")
    for row in rows:
        peak = row.get("peak_allocated_GB")
        extra = f"  peak {peak:.1f} GB ({peak / weights_gb:.2f}x weights)" if peak is not None else ""
        print(f"{row['phase']:<55} {row['seconds']:8.2f}s{extra} {row.get('error', '')}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
