"""Implementations of the ``wagle`` CLI commands (argument parsing lives in :mod:`wagle.cli`).

These functions are the edge of the library: they print results and choose exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from wagle.errors import UserError
from wagle.files import check_writable
from wagle.mask import WeightMask
from wagle.unlearning import UnlearningDiverged

logger = logging.getLogger("wagle")

# exceptions that mean "the user asked for something impossible" (exit 2) or "the run failed" (exit 1);
# every other exception is a bug and keeps its traceback
USER_ERRORS = (UserError, OSError)
RUN_FAILURES = (UnlearningDiverged, FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def configure_libraries(*, progress: bool, verbose: bool) -> None:
    """Quiet the libraries' own progress bars and warnings unless asked for."""
    import datasets
    import transformers

    if not progress:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    if not verbose:
        datasets.logging.set_verbosity_error()
        transformers.logging.set_verbosity_error()


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {name} requested but no CUDA device is available")
    return device


def _check_range(option: str, value, low, high=None, *, inclusive_low=True) -> None:
    bad = value < low if inclusive_low else value <= low
    if bad or (high is not None and value > high):
        span = f"[{low}, {high}]" if high is not None else (f">= {low}" if inclusive_low else f"> {low}")
        raise UserError(f"{option}: must be {span}, got {value}")


def _load(args: argparse.Namespace):
    from wagle.models import load_model

    return load_model(
        args.model, dtype=DTYPES[args.dtype] if args.dtype else None, device=_device(args.device)
    )


def run_mask(args: argparse.Namespace) -> int:
    from wagle.attribution import attribute
    from wagle.data import load_dataset_file, make_dataloader

    _check_range("--ratio", args.ratio, 0.0, 1.0)
    _check_range("--batch-size", args.batch_size, 1)
    needs_retain = args.method == "wagle"
    if needs_retain and not args.retain:
        raise UserError("--retain: method 'wagle' needs a retain set")
    check_writable(args.out, "--out")
    if args.plot:
        check_writable(args.plot, "--plot")
    forget = load_dataset_file(args.forget, role="forget")
    retain = load_dataset_file(args.retain, role="retain") if args.retain else None
    model, tokenizer = _load(args)
    if args.backend == "triton":
        from wagle_kernels._runtime import require_triton

        try:
            require_triton([next(model.parameters())], "--backend triton")
        except RuntimeError as exc:  # no triton, or a device it cannot run on
            raise UserError(str(exc)) from None
    loader_kw = {"batch_size": args.batch_size, "max_length": args.max_length}
    started = time.perf_counter()
    mask = attribute(
        model,
        make_dataloader(forget, tokenizer, **loader_kw),
        make_dataloader(retain, tokenizer, **loader_kw) if retain is not None else None,
        ratio=args.ratio,
        method=args.method,
        gamma=args.gamma,
        scope=args.scope,
        include=args.include,
        exclude=args.exclude,
        backend=args.backend,
        seed=args.seed,
        nonfinite=args.nonfinite,
        offload_gradients=args.offload_gradients,
        gradient_checkpointing=args.gradient_checkpointing,
        progress=not args.no_progress,
    )
    mask.save(args.out)
    if args.plot:
        from wagle.mask_plot import plot_mask_densities

        plot_mask_densities(mask, args.plot)
    print(mask.summary(max_rows=40))
    print(
        f"saved {args.out}: {mask.num_selected}/{mask.numel} weights selected ({mask.density:.2%}), "
        f"{mask.nbytes / 2**20:.2f} MiB, {time.perf_counter() - started:.1f}s"
    )
    return 0


def run_unlearn(args: argparse.Namespace) -> int:
    from wagle.data import load_dataset_file
    from wagle.models import save_model
    from wagle.unlearning import unlearn

    forget = load_dataset_file(args.forget, role="forget")
    retain = load_dataset_file(args.retain, role="retain") if args.retain else None
    model, tokenizer = _load(args)
    partial = "allow" if args.allow_partial_mask else "error"
    mask = WeightMask.load(args.mask, model, partial=partial) if args.mask else None
    objective_kwargs = {"beta": args.beta} if args.beta is not None else None
    result = unlearn(
        model,
        forget,
        retain,
        tokenizer=tokenizer,
        method=args.method,
        mask=mask,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        state_layout=args.state_layout,
        state_dtype=DTYPES[args.state_dtype],
        step_in_backward=args.step_in_backward,
        gradient_checkpointing=args.gradient_checkpointing,
        objective_kwargs=objective_kwargs,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        checkpoint_every=args.checkpoint_every,
        resume=not args.no_resume,
        seed=args.seed,
        progress=not args.no_progress,
    )
    save_model(model, tokenizer, os.path.join(args.out, "model"))
    last = result.history[-1] if result.history else {}
    final_loss = last.get("loss", float("nan"))
    print(
        f"unlearned {args.steps} steps ({result.seconds:.1f}s); final loss {final_loss:.4f}; "
        f"model saved to {os.path.join(args.out, 'model')}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from wagle.data import load_dataset_file
    from wagle.evaluation import evaluate, format_table, write_json

    check_writable(args.out, "--out")
    splits = {
        "forget": load_dataset_file(args.forget, schema="qa", role="forget"),
        "retain": load_dataset_file(args.retain, schema="qa", role="retain"),
    }
    if args.general:
        splits["general"] = load_dataset_file(args.general, schema="qa", role="general")
    options = {"real_authors": args.real_authors, "world_facts": args.world_facts}
    for name, path in options.items():
        if path:
            splits[name] = load_dataset_file(path, schema="qa", role=name.replace("_", " "))
    model, tokenizer = _load(args)
    reference = None
    if args.reference_model:
        from wagle.models import load_model

        reference, _ = load_model(args.reference_model, device=_device(args.device))
    utility = tuple(name for name in ("retain", "general", *options) if name in splits)
    result = evaluate(
        model,
        tokenizer,
        splits,
        reference=reference,
        utility_splits=utility,
        option_splits=tuple(name for name in options if name in splits),
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    write_json(args.out, result.to_dict())
    print(format_table({os.path.basename(os.path.normpath(args.model)): result}))
    print(f"report written to {args.out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from wagle.demo import DemoConfig, run

    _check_range("--ratio", args.ratio, 0.0, 1.0, inclusive_low=False)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.ratio = args.ratio
    config.forget_split = args.forget_split
    config.seed = args.seed
    if args.steps is not None:
        _check_range("--steps", args.steps, 1)
        config.steps = args.steps
    report = run(config, out_dir=args.out, device=_device(args.device), progress=not args.no_progress)
    print(report["table"])
    print(f"\nreport: {os.path.join(args.out, 'report.json')}")
    print(f"plots:  {os.path.join(args.out, 'tradeoff.png')}, {os.path.join(args.out, 'mask_densities.png')}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from wagle.comparison.command import run

    return run(args)


__all__ = ["RUN_FAILURES", "USER_ERRORS", "run_compare", "run_demo", "run_eval", "run_mask", "run_unlearn"]
