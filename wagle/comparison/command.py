"""The ``wagle compare`` command: its options (argparse only, no heavy imports) and its run."""

from __future__ import annotations

import argparse
import os

from wagle.errors import UserError
from wagle.validation import check_range

from .grid import METHODS

DEFAULT_METHODS = ",".join(METHODS)
GRID_DEFAULTS = {
    "objectives": ("npo",),
    "methods": METHODS,
    "ratios": (0.5,),
    "lrs": (1e-5,),
    "steps": (100,),
    "seeds": (0, 1, 2),
}


def _list_of(kind, name: str):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{name}: expected a comma-separated list, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: cannot read {text!r} as a list of {kind.__name__}"
            ) from None

    return parse


def add_parser(sub, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``compare`` on the CLI's subparsers."""
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="compare masks (WAGLE, baselines, dense, LoRA) at matched forgetting over a grid",
        description="Run a grid of mask methods x ratios x learning rates x steps x seeds (plus dense and "
        "LoRA) on a target model, evaluate every run against the gold (retain) model, and compare "
        "utility at matched forgetting with seed spreads. Finished runs go to OUT/results.jsonl; rerun "
        "the same command to resume an interrupted study.",
    )
    p.add_argument(
        "--preset",
        choices=["study"],
        default=None,
        help="study: the bundled study benchmark (25 authors x 20 facts, 100 forget questions), a "
        "3.7M-weight Llama trained once and cached, and a preset grid (no --model/--forget/... then)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where --preset study keeps its trained models "
        "(default $XDG_CACHE_HOME/wagle, else ~/.cache/wagle)",
    )
    p.add_argument("--model", help="target model: local Hugging Face causal-LM directory")
    p.add_argument("--gold-model", help="gold-standard retain model (trained without the forget set)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --model folder)")
    p.add_argument("--forget", help="forget split (TOFU QA schema)")
    p.add_argument("--retain", help="retain split (TOFU QA schema)")
    p.add_argument(
        "--retain-eval",
        default=None,
        help="utility split with perturbed answers when --retain has none (e.g. TOFU's retain_perturbed)",
    )
    p.add_argument("--general", default=None, help="extra utility split (TOFU QA schema; optional)")
    p.add_argument("--out", default="wagle-compare", help="output folder (default ./wagle-compare)")
    p.add_argument(
        "--objectives", type=_list_of(str, "--objectives"), default=None, help="comma list (default npo)"
    )
    p.add_argument(
        "--methods",
        type=_list_of(str, "--methods"),
        default=None,
        help=f"comma list of {DEFAULT_METHODS} (default all)",
    )
    p.add_argument(
        "--ratios", type=_list_of(float, "--ratios"), default=None, help="mask ratios (default 0.5)"
    )
    p.add_argument("--lrs", type=_list_of(float, "--lrs"), default=None, help="learning rates (default 1e-5)")
    p.add_argument(
        "--lora-lrs", type=_list_of(float, "--lora-lrs"), default=None, help="LoRA lrs (default --lrs)"
    )
    p.add_argument("--steps", type=_list_of(int, "--steps"), default=None, help="step counts (default 100)")
    p.add_argument("--seeds", type=_list_of(int, "--seeds"), default=None, help="seeds (default 0,1,2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument(
        "--clip-mode",
        choices=["mask_then_clip", "clip_then_mask"],
        default="mask_then_clip",
        help="gradient norm over the selected entries (default) or the full gradients (reference order)",
    )
    p.add_argument("--gamma", type=float, default=1e-6, help="WAGLE's gamma (default 1e-6)")
    p.add_argument("--beta", type=float, default=None, help="beta of NPO/SimNPO")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--utility-examples",
        type=int,
        default=None,
        help="first N rows of retain/general scored (default all)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="pin torch's CPU threads (recorded; --preset study: 2)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for this call: the grid is trimmed to fit (see report)",
    )
    p.add_argument("--fq-levels", type=_list_of(float, "--fq-levels"), default=None)
    p.add_argument("--gap-levels", type=_list_of(float, "--gap-levels"), default=None)
    p.add_argument("--no-plot", action="store_true", help="skip frontier.png")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="load the models in this dtype"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Load the models and data, run the study, print both tables."""
    from wagle.commands import DTYPES, _device
    from wagle.data import load_dataset_file
    from wagle.models import load_model
    from wagle.objectives import objective_options

    from .runner import DEFAULT_FQ_LEVELS, DEFAULT_GAP_LEVELS, CompareSettings, compare

    if args.budget is not None:
        check_range("--budget", args.budget, 0, inclusive_low=False)
    if args.threads is not None:
        check_range("--threads", args.threads, 1)
    if args.preset is not None:
        return _run_preset(args)
    for option in ("model", "gold_model", "forget", "retain"):
        if getattr(args, option) is None:
            raise UserError(f"--{option.replace('_', '-')}: required (or --preset study)")
    for option, default in GRID_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, list(default))
    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    forget = load_dataset_file(args.forget, schema="qa", role="forget")
    retain = load_dataset_file(args.retain, schema="qa", role="retain")
    retain_eval = (
        load_dataset_file(args.retain_eval, schema="qa", role="retain eval") if args.retain_eval else None
    )
    general = load_dataset_file(args.general, schema="qa", role="general") if args.general else None
    target, tokenizer = load_model(args.model, dtype=dtype, device=device)
    gold, _ = load_model(args.gold_model, dtype=dtype, device=device)
    if args.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tokenizer: cannot load a tokenizer from {args.tokenizer}: {exc}") from None
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    objective_kwargs = {}
    if args.beta is not None:
        objective_kwargs = {o: {"beta": args.beta} for o in args.objectives if "beta" in objective_options(o)}
    settings = CompareSettings(
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        clip_mode=args.clip_mode,
        gamma=args.gamma,
        objective_kwargs=objective_kwargs,
        eval_batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens,
        utility_examples=args.utility_examples,
        num_threads=args.threads,
    )
    report = compare(
        target,
        gold,
        tokenizer,
        forget=forget,
        retain=retain,
        general=general,
        retain_eval=retain_eval,
        out_dir=args.out,
        objectives=args.objectives,
        methods=args.methods,
        ratios=args.ratios,
        lrs=args.lrs,
        lora_lrs=args.lora_lrs,
        steps=args.steps,
        seeds=args.seeds,
        settings=settings,
        budget_seconds=args.budget,
        fq_levels=args.fq_levels or DEFAULT_FQ_LEVELS,
        gap_levels=args.gap_levels or DEFAULT_GAP_LEVELS,
        plot=not args.no_plot,
        progress=not args.no_progress,
    )
    print_report(report, args.out)
    return 0


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/wagle``, else ``~/.cache/wagle``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "wagle")


def _run_preset(args: argparse.Namespace) -> int:
    from .study import run_study

    own = [
        "model",
        "gold_model",
        "tokenizer",
        "forget",
        "retain",
        "general",
        *GRID_DEFAULTS,
        "lora_lrs",
        "beta",
    ]
    given = [f"--{o.replace('_', '-')}" for o in own if getattr(args, o) is not None]
    if given:
        raise UserError(
            f"--preset: {args.preset} defines its own models, data and grid; drop {', '.join(given)}"
        )
    report = run_study(
        args.out,
        args.cache_dir or default_cache_dir(),
        num_threads=args.threads or 2,
        clip_mode=args.clip_mode,
        budget_seconds=args.budget,
        progress=not args.no_progress,
    )
    models = report["study_models"]
    print(f"study models: {'cached' if models['from_cache'] else 'trained'} in {models['path']}")
    print_report(report, args.out)
    return 0


def print_report(report: dict, out: str) -> None:
    """The CLI's summary of a finished (or partly finished) study."""
    print(report["table"])
    print("\nUtility at matched forgetting (best cell per method; ties: within the seed spread)")
    print(report["matched_table"])
    budget = report.get("budget")
    if budget and budget.get("dropped"):
        print(f"\nbudget {budget['seconds']:.0f}s: dropped {', '.join(budget['dropped'])}")
    runs = report["runs"]
    if runs["missing"]:
        print(f"\n{len(runs['missing'])} runs not done yet: run the same command again to resume")
    if runs["diverged"]:
        print(f"{len(runs['diverged'])} runs diverged (left out): {', '.join(runs['diverged'][:5])}")
    print(f"\nresults: {os.path.join(out, 'results.jsonl')}  report: {os.path.join(out, 'report.json')}")
