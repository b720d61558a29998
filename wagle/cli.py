"""The ``wagle`` command line: ``demo``, ``mask``, ``unlearn``, ``eval``, ``compare``.

A mistake the user can fix (a :class:`~wagle.errors.UserError`, or an ``OSError`` on one of the
user's paths) ends with one ``wagle: error: ...`` line on stderr and exit status 2; a run that failed
(diverged, non-finite loss, out of memory) with one line and exit status 1. Anything else is a bug:
its traceback is shown and the exit status is 1. ``-v``/``--verbose`` also shows the traceback of the
one-line errors.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def finite_float(text: str) -> float:
    """argparse type: a float that is neither NaN nor infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_data_options(parser: argparse.ArgumentParser, *, retain_required: bool = False) -> None:
    parser.add_argument(
        "--forget", required=True, help="forget set: .json/.jsonl/.csv/.parquet or a saved dataset dir"
    )
    parser.add_argument("--retain", required=retain_required, help="retain set (same formats)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per batch (default 4)")
    parser.add_argument("--max-length", type=int, default=256, help="max tokens per example (default 256)")


def _add_template_options(parser: argparse.ArgumentParser) -> None:
    from wagle.data.format import DEFAULT_PROMPT_FORMAT, PROMPT_FORMATS

    parser.add_argument(
        "--template",
        choices=list(PROMPT_FORMATS),
        default=DEFAULT_PROMPT_FORMAT,
        help="prompt format of QA rows (default wagle: 'Question: {q}\\nAnswer:'; reference: the WAGLE "
        "reference code's '### Question:'; openunlearning: 'Question: {q}\\nAnswer: '; llama2-chat: "
        "'[INST] {q} [/INST]'; chat: the tokenizer's chat template)",
    )
    parser.add_argument(
        "--system-prompt", default=None, help="system message for --template chat (default: none)"
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="load the model in this dtype"
    )


def _add_checkpointing_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer's activations in backward (less memory, ~1 extra forward pass)",
    )


def _add_mask_options(parser: argparse.ArgumentParser) -> None:
    from wagle.attribution.from_model import attribution_methods

    parser.add_argument(
        "--ratio", type=finite_float, required=True, help="fraction of weights selected, in [0, 1]"
    )
    parser.add_argument(
        "--method", choices=attribution_methods(), default="wagle", help="scoring method (default wagle)"
    )
    parser.add_argument("--gamma", type=finite_float, default=1e-6, help="WAGLE's gamma (default 1e-6)")
    parser.add_argument("--scope", choices=["global", "per_tensor"], default="global")
    parser.add_argument(
        "--include", action="append", default=None, help="parameter-name glob to include (repeatable)"
    )
    parser.add_argument(
        "--exclude", action="append", default=None, help="parameter-name glob to exclude (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default 0)")
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument(
        "--nonfinite",
        choices=["error", "lowest"],
        default="error",
        help="a NaN/Inf score: stop with an error (default) or rank it below every finite score",
    )
    parser.add_argument(
        "--offload-gradients",
        action="store_true",
        help="keep the forget gradients in host memory (device memory ~ weights + one gradient buffer)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wagle",
        description="WAGLE weight attribution and masked LLM unlearning (Triton-accelerated).",
    )
    parser.add_argument("--version", action="version", version=f"wagle {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details; tracebacks for every error"
    )
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="end-to-end demo on the bundled benchmark and a tiny model",
        description="Build tiny target/retain models on the bundled benchmark, compute a WAGLE "
        "mask, unlearn with NPO (dense, WAGLE mask, random mask) at several learning rates and seeds "
        "and compare them (mean+-std over seeds, Pareto frontier). Every computation runs on one torch "
        "thread, the independent ones in parallel processes: the report does not depend on the "
        "machine's thread count.",
    )
    demo.add_argument("--out", default="wagle-demo", help="output directory (default ./wagle-demo)")
    demo.add_argument(
        "--ratio", type=finite_float, default=0.5, help="mask ratio for WAGLE and random (default 0.5)"
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="unlearning steps (default: the demo's setting)"
    )
    demo.add_argument("--forget-split", choices=["forget01", "forget05", "forget10"], default="forget10")
    demo.add_argument("--quick", action="store_true", help="a much smaller configuration (for tests)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the benchmark and the models")
    demo.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the independent runs (default: min(CPU count, runs); 1 = in this process)",
    )
    demo.add_argument("--device", default=None)

    mask = sub.add_parser(
        "mask",
        parents=[common],
        help="compute a weight mask for a model",
        description="Compute a weight mask "
        "(top --ratio of weights by attribution score) and save it as safetensors.",
    )
    _add_model_options(mask)
    _add_data_options(mask)
    _add_mask_options(mask)
    _add_template_options(mask)
    _add_checkpointing_option(mask)
    mask.add_argument("--out", required=True, help="output mask file (.safetensors)")
    mask.add_argument("--plot", default=None, help="also write a PNG of the density per layer and module")

    unl = sub.add_parser(
        "unlearn",
        parents=[common],
        help="unlearn a forget set from a model",
        description="Unlearn the forget "
        "set, updating only the weights a mask selects (all weights without --mask).",
    )
    _add_model_options(unl)
    _add_data_options(unl)
    unl.add_argument("--mask", default=None, help="mask file from 'wagle mask' (default: no mask, dense)")
    unl.add_argument(
        "--allow-partial-mask",
        action="store_true",
        help="accept a mask that leaves model parameters uncovered (frozen) although it was not made "
        "for this model (e.g. one without its biases, or from a tied-embedding variant)",
    )
    from wagle.objectives import OBJECTIVES

    unl.add_argument("--method", default="npo", help=f"{', '.join(OBJECTIVES)} (default npo)")
    unl.add_argument("--steps", type=int, default=100)
    unl.add_argument("--lr", type=finite_float, default=1e-5)
    unl.add_argument("--grad-accum", type=int, default=1)
    unl.add_argument("--warmup-ratio", type=finite_float, default=0.1)
    unl.add_argument("--weight-decay", type=finite_float, default=0.0)
    unl.add_argument("--max-grad-norm", type=finite_float, default=1.0)
    unl.add_argument(
        "--state-layout",
        choices=["auto", "compact", "dense"],
        default="auto",
        help="AdamW moments: compact (selected weights only), dense, or auto (per parameter, fewer bytes)",
    )
    unl.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32", help="AdamW moment dtype")
    unl.add_argument(
        "--step-in-backward",
        action="store_true",
        help="step each parameter during backward and free its gradient (clipping becomes per parameter)",
    )
    _add_checkpointing_option(unl)
    _add_template_options(unl)
    unl.add_argument(
        "--beta", type=finite_float, default=None, help="beta of the objectives that take one (NPO, SimNPO)"
    )
    unl.add_argument("--checkpoint-every", type=int, default=0)
    unl.add_argument(
        "--no-resume",
        action="store_true",
        help="start over: discard the checkpoints in --out (a rerun otherwise resumes the same run and "
        "refuses one with other settings)",
    )
    unl.add_argument("--seed", type=int, default=0)
    unl.add_argument("--out", required=True, help="output directory for the unlearned model and checkpoints")

    ev = sub.add_parser(
        "eval",
        parents=[common],
        help="TOFU-style evaluation of a model",
        description="Evaluate answer probability, "
        "ROUGE-L, truth ratio, forget quality (vs --reference-model) and model utility; with --holdout "
        "also memorisation and membership-inference metrics; with --multiple-choice WMDP-style accuracy.",
    )
    _add_model_options(ev)
    ev.add_argument("--forget", default=None, help="forget split (TOFU QA schema)")
    ev.add_argument("--retain", default=None, help="retain split (TOFU QA schema; needed with --forget)")
    ev.add_argument("--general", default=None, help="held-out general QA split (optional)")
    for flag, what in (("--real-authors", "real authors"), ("--world-facts", "world facts")):
        ev.add_argument(
            flag,
            default=None,
            help=f"TOFU's {what} set (question, answer, perturbed_answer; optional): in model utility, "
            "with probability = the answer's share among its options",
        )
    ev.add_argument("--reference-model", default=None, help="retain model directory (for forget quality)")
    ev.add_argument(
        "--holdout",
        default=None,
        help="QA set the model never saw (question, answer): adds exact memorisation, extraction strength, "
        "MIA AUCs of forget vs holdout and privleak (vs --reference-model)",
    )
    ev.add_argument(
        "--gradnorm", action="store_true", help="also the gradient-norm MIA (one backward per row)"
    )
    ev.add_argument(
        "--mia-k", type=finite_float, default=0.4, help="k of the min-k / min-k++ attacks (default 0.4)"
    )
    ev.add_argument(
        "--multiple-choice",
        action="append",
        default=None,
        metavar="FILE",
        help="multiple-choice set (question, choices, answer index; WMDP/MMLU columns): accuracy by answer "
        "log-likelihood (repeatable)",
    )
    _add_template_options(ev)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        help="greedy generation length (default 200, as OpenUnlearning)",
    )
    ev.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="max tokens per scored QA example (default 256; multiple-choice items keep up to 2048)",
    )
    ev.add_argument(
        "--plot", default=None, help="also write a PNG of the MIA ROC curves and AUCs (needs --holdout)"
    )
    ev.add_argument("--out", required=True, help="output report (.json)")

    from wagle.comparison.command import add_parser as add_compare_parser

    add_compare_parser(sub, common)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wagle")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from wagle import commands  # the heavy imports happen only after --help/usage errors

    commands.configure_libraries(progress=not args.no_progress, verbose=args.verbose)

    handlers = {
        "demo": commands.run_demo,
        "mask": commands.run_mask,
        "unlearn": commands.run_unlearn,
        "eval": commands.run_eval,
        "compare": commands.run_compare,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("wagle: interrupted", file=sys.stderr)
        return 130
    except commands.RUN_FAILURES as exc:
        return _report(exc, EXIT_FAILED, verbose=args.verbose)
    except commands.USER_ERRORS as exc:
        return _report(exc, EXIT_USAGE, verbose=args.verbose)
    except Exception:  # a bug: keep its traceback
        traceback.print_exc()
        print("wagle: internal error (the traceback above is a bug in wagle or a library)", file=sys.stderr)
        return EXIT_FAILED


def _report(exc: BaseException, code: int, *, verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc)
    print(f"wagle: error: {_one_line(exc)}", file=sys.stderr)
    return code


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        text = f"{where}: {exc.strerror}"
    else:
        text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
