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
from wagle.unlearning.loop import PRECISIONS
from wagle.validation import check_range

logger = logging.getLogger("wagle")

# exceptions that mean "the user asked for something impossible" (exit 2) or "the run failed" (exit 1);
# every other exception is a bug and keeps its traceback
USER_ERRORS = (UserError, OSError)
RUN_FAILURES = (UnlearningDiverged, FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError)

DTYPES = PRECISIONS  # --dtype / --state-dtype names


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


def _load(args: argparse.Namespace, device: torch.device | None = None):
    from wagle.models import load_model

    return load_model(
        args.model, dtype=DTYPES[args.dtype] if args.dtype else None, device=device or _device(args.device)
    )


def _template(args: argparse.Namespace):
    from wagle.data import get_prompt_format

    try:
        return get_prompt_format(args.template, system_prompt=args.system_prompt)
    except ValueError as exc:
        raise UserError(f"--{str(exc).replace('_', '-', 1)}") from None


def run_mask(args: argparse.Namespace) -> int:
    from wagle.attribution import attribute
    from wagle.data import load_dataset_file, make_dataloader

    check_range("--ratio", args.ratio, 0.0, 1.0)
    check_range("--batch-size", args.batch_size, 1)
    from wagle_kernels.scores import SCORE_METHODS

    method = SCORE_METHODS.get(args.method)  # None for wanda
    if method is not None and method.reads_retain and not args.retain:
        raise UserError(f"--retain: method {args.method!r} needs a retain set")
    check_writable(args.out, "--out")
    if args.plot:
        check_writable(args.plot, "--plot")
    forget = load_dataset_file(args.forget, role="forget")
    retain = load_dataset_file(args.retain, role="retain") if args.retain else None
    template = _template(args)
    from wagle.distributed.launch import shard_model, start_session  # torchrun: FSDP2 over the ranks

    session = start_session(args.device)
    model, tokenizer = _load(args, session.device if session else None)
    model = shard_model(model) if session else model
    if args.backend == "triton":
        from wagle_kernels._runtime import require_triton

        try:
            require_triton([next(model.parameters())], "--backend triton")
        except RuntimeError as exc:  # no triton, or a device it cannot run on
            raise UserError(str(exc)) from None
    loader_kw = {"batch_size": args.batch_size, "max_length": args.max_length, "template": template}
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
        progress=not args.no_progress and (session is None or session.is_main),
    )
    if session is not None:  # every rank takes part in the gather; rank 0 writes and prints
        mask = mask.gather()
        if not session.is_main:
            return 0
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


# unlearn() settings in a run fingerprint -> the wagle unlearn option that sets them
_RUN_OPTIONS = {
    "model weights": "--model",
    "mask": "--mask",
    "forget data": "--forget",
    "retain data": "--retain",
    "method": "--method",
    "method settings": "--beta",
    "steps": "--steps",
    "lr": "--lr",
    "warmup steps": "--warmup-ratio",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm",
    "max_length": "--max-length",
    "seed": "--seed",
    "weight dtypes": "--dtype",
    "state_layout": "--state-layout",
    "state_dtype": "--state-dtype",
    "step_in_backward": "--step-in-backward",
    "gradient_checkpointing": "--gradient-checkpointing",
}


def _out_folder(path: str) -> str:
    from wagle.files import ensure_writable_folder, remove_stale_temporaries

    try:
        folder = ensure_writable_folder(path)
        ensure_writable_folder(os.path.join(folder, "checkpoints"))
    except NotADirectoryError as exc:
        raise UserError(f"--out: {exc}") from None
    except OSError as exc:
        raise UserError(f"--out: cannot write to {path}: {exc.strerror or exc}") from None
    for sub in (folder, os.path.join(folder, "checkpoints")):
        remove_stale_temporaries(sub)
    return folder


def run_unlearn(args: argparse.Namespace) -> int:
    from wagle.data import load_dataset_file
    from wagle.distributed.launch import shard_model, start_session  # torchrun: FSDP2 over the ranks
    from wagle.models import save_model
    from wagle.unlearning import CheckpointError, ResumeMismatchError, unlearn
    from wagle.unlearning.fingerprint import short

    session = start_session(args.device)
    if session is None:
        out = _out_folder(args.out)  # before any work: a run must not fail after its last step
    else:  # rank 0 prepares the folder, every rank uses it
        import torch.distributed as dist

        box = [_out_folder(args.out) if session.is_main else None]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    forget = load_dataset_file(args.forget, role="forget")
    retain = load_dataset_file(args.retain, role="retain") if args.retain else None
    model, tokenizer = _load(args, session.device if session else None)
    partial = "allow" if args.allow_partial_mask else "error"
    mask = WeightMask.load(args.mask, model, partial=partial) if args.mask else None
    if session is not None:  # the full mask on every rank; the optimizer keeps each rank's bits
        from wagle.distributed.unlearning import save_full_model

        model = shard_model(model)
        save_model = save_full_model  # noqa: F811 - every rank gathers, rank 0 writes
    template = _template(args)
    if mask is not None and mask.metadata.get("prompt_format", template.name) != template.name:
        logger.warning(
            "the mask was computed with prompt format %r, unlearning uses %r",
            mask.metadata["prompt_format"],
            template.name,
        )
    objective_kwargs = {"beta": args.beta} if args.beta is not None else None
    try:
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
            checkpoint_dir=os.path.join(out, "checkpoints"),
            checkpoint_every=args.checkpoint_every,
            resume=not args.no_resume,
            seed=args.seed,
            progress=not args.no_progress,
            template=template,
        )
        save_model(model, tokenizer, os.path.join(out, "model"))
    except ResumeMismatchError as exc:
        changed = "; ".join(
            f"{_RUN_OPTIONS.get(key, key)} {short(old)} -> {short(new)}" for key, old, new in exc.changes
        )
        raise UserError(
            f"--out: {args.out} holds a run with other settings ({changed}); rerun with its settings to "
            "resume it, or start over with --no-resume (discards its checkpoints) or another --out"
        ) from None
    except CheckpointError as exc:
        raise UserError(f"{exc}; start over with --no-resume (discards the checkpoints)") from None
    except OSError as exc:
        raise UserError(f"--out: could not write to {args.out}: {exc}") from None
    if session is not None and not session.is_main:
        return 0
    last = result.history[-1] if result.history else {}
    final_loss = last.get("loss", float("nan"))
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from} of {args.steps} ({result.checkpoint})")
    print(
        f"unlearned {args.steps} steps ({result.seconds:.1f}s, prompt format {template.name}); "
        f"final loss {final_loss:.4f}; model saved to {os.path.join(out, 'model')}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from wagle.data import load_dataset_file
    from wagle.evaluation import evaluate, format_privacy_table, format_table, write_json

    check_writable(args.out, "--out")
    if args.forget is None and not args.multiple_choice:
        raise UserError("--forget: give a forget split (with --retain) or --multiple-choice FILE")
    if args.forget is not None and args.retain is None:
        raise UserError("--retain: a retain split is needed with --forget")
    if args.forget is None:
        for flag in ("general", "real_authors", "world_facts", "holdout", "reference_model"):
            if getattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')}: needs --forget and --retain")
    if args.plot and not args.holdout:
        raise UserError("--plot: the MIA plot needs --holdout")
    check_range("--batch-size", args.batch_size, 1)
    check_range("--max-new-tokens", args.max_new_tokens, 1)
    check_range("--max-length", args.max_length, 2)
    check_range("--mia-k", args.mia_k, 0.0, 1.0, inclusive_low=False)
    template = _template(args)
    splits, holdout = {}, None
    if args.forget:
        splits["forget"] = load_dataset_file(args.forget, schema="qa", role="forget")
        splits["retain"] = load_dataset_file(args.retain, schema="qa", role="retain")
    if args.general:
        splits["general"] = load_dataset_file(args.general, schema="qa", role="general")
    options = {"real_authors": args.real_authors, "world_facts": args.world_facts}
    for name, path in options.items():
        if path:
            splits[name] = load_dataset_file(path, schema="qa", role=name.replace("_", " "))
    if args.holdout:
        holdout = load_dataset_file(args.holdout, schema="qa", role="holdout")
    choice_sets = {
        path: load_dataset_file(path, schema="multiple_choice", role="multiple-choice")
        for path in args.multiple_choice or ()
    }
    model, tokenizer = _load(args)
    label = os.path.basename(os.path.normpath(args.model))
    report: dict = {}
    if splits:
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
            max_new_tokens=args.max_new_tokens,
            max_length=args.max_length,
            template=template,
            holdout=holdout,
            mia_k=args.mia_k,
            gradnorm=args.gradnorm,
            progress=not args.no_progress,
        )
        report = result.to_dict()
        print(format_table({label: result}))
        if result.privacy is not None:
            print("\n" + format_privacy_table({label: result}))
        if args.plot:
            from wagle.evaluation import plot_privacy

            plot_privacy({label: result}, args.plot)
            print(f"plot written to {args.plot}")
    if choice_sets:
        from wagle.evaluation import multiple_choice_accuracy

        report["multiple_choice"] = {}
        for path, data in choice_sets.items():
            outcome = multiple_choice_accuracy(model, tokenizer, data, batch_size=args.batch_size)
            report["multiple_choice"][path] = outcome.to_dict()
            print(
                f"multiple choice {path}: accuracy {outcome.accuracy:.3f} on {outcome.num_examples} "
                f"questions (chance {sum(1 / len(c) for c in data['choices']) / outcome.num_examples:.3f})"
            )
    report.setdefault("settings", {**template.describe(), "max_new_tokens": args.max_new_tokens})
    write_json(args.out, report)
    print(f"report written to {args.out}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from wagle.demo import DemoConfig, run

    check_range("--ratio", args.ratio, 0.0, 1.0, inclusive_low=False)
    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.ratio = args.ratio
    config.forget_split = args.forget_split
    config.seed = args.seed
    if args.steps is not None:
        check_range("--steps", args.steps, 1)
        config.steps = args.steps
    if args.workers is not None:
        check_range("--workers", args.workers, 1)
        config.workers = args.workers
    report = run(config, out_dir=args.out, device=_device(args.device), progress=not args.no_progress)
    print(report["table"])
    print("\nUtility at matched forgetting\n" + report["matched_table"])
    print(f"\nHeadline runs (seed {config.seeds[0]}, lr {config.lr:g}): privacy\n" + report["privacy_table"])
    print(f"\nreport: {os.path.join(args.out, 'report.json')}")
    plots = ", ".join(
        os.path.join(args.out, name)
        for name in ("frontier.png", "tradeoff.png", "mask_densities.png", "privacy.png")
    )
    print(f"plots:  {plots}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from wagle.comparison.command import run

    return run(args)


__all__ = ["RUN_FAILURES", "USER_ERRORS", "run_compare", "run_demo", "run_eval", "run_mask", "run_unlearn"]
