"""``wagle.compare``: run a grid of masks x ratios x learning rates x seeds (plus dense and LoRA) and
compare their utility at matched forgetting.

The forget and retain gradients g_f, g_r of the target model (plain NLL, summed over one pass of each
loader, as in :func:`wagle.attribute`) are computed once; every gradient-based mask is built from
them with :func:`wagle.mask_from_gradients` (a mask per method and ratio; the random mask also per
seed). Wanda masks need input activations: one forward pass over the forget set per ratio
(:func:`wagle.attribution.wanda_mask`). Each run unlearns a fresh copy of the target with
:func:`wagle.unlearn`, evaluates it against the gold (retain) model with :func:`wagle.evaluate`, and
is appended to the results file before the next starts.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from wagle.errors import UserError
from wagle.host import host_description
from wagle.mask import WeightMask
from wagle.validation import check_gamma, check_number

from .grid import MASK_METHODS, Grid, RunSpec, trim_grid
from .results import ResultsFile, data_digest, model_digest, tokenizer_digest

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
DEFAULT_FQ_LEVELS = (0.01, 0.05, 0.1, 0.5)
DEFAULT_GAP_LEVELS = (0.05, 0.1, 0.2, 0.3)


@dataclass
class CompareSettings:
    """Everything but the grid that a run's outcome depends on (all of it enters the fingerprint).

    Unlearning: ``batch_size`` forget (and retain) examples per micro-batch, ``grad_accum`` micro-batches
    per step, AdamW with linear warm-up over ``warmup_ratio`` of the steps then linear decay, gradients
    clipped to ``max_grad_norm`` under ``clip_mode`` (:mod:`wagle.optim.clipping`: the norm over the
    selected entries, ``mask_then_clip``, or over the full gradients, ``clip_then_mask``). Masks:
    WAGLE's ``gamma``; gradients summed over batches of ``batch_size``. Evaluation: the whole forget
    split (forget quality needs every truth ratio), the first ``utility_examples`` rows of the retain
    and general splits (all when None). LoRA: ``lora_r``, ``lora_alpha`` on ``lora_targets``.
    ``num_threads`` pins torch's intra-op threads for the study (None: torch's current setting, which
    is recorded)."""

    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    clip_mode: str = "mask_then_clip"
    gamma: float = 1e-6
    objective_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_batch_size: int = 16
    max_new_tokens: int = 48
    utility_examples: int | None = None
    lora_r: int = 8
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    num_threads: int | None = None

    def check(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens", "lora_r"):
            check_number(name, getattr(self, name), low=1, integer=True)
        for name in ("utility_examples", "num_threads"):
            check_number(name, getattr(self, name), low=1, integer=True, optional=True)
        from wagle.optim.clipping import check_clip_mode

        check_clip_mode(self.clip_mode)
        check_gamma(self.gamma)


def _rows(data, role: str, columns: Sequence[str] | None = None) -> list[dict]:
    """Rows of a split; with ``columns=None`` the TOFU QA columns evaluation needs."""
    from wagle.evaluation.metrics import TOFU_COLUMNS, rows_of

    if data is None:
        raise UserError(f"{role}: no data set given")
    return rows_of(data, role, TOFU_COLUMNS if columns is None else columns)


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def run_metrics(result, gold_forget: Mapping[str, float]) -> dict[str, float | None]:
    """The numbers a run is compared by (non-finite values become None).

    ``rouge_gap = |forget ROUGE-L - gold forget ROUGE-L|``, ``prob_gap = |forget prob - gold forget
    prob|``; plus forget quality, model utility and ROUGE-L / probability / truth-ratio statistic of
    every split."""
    forget = result.splits[result.forget_split]
    metrics: dict[str, float | None] = {
        "forget_quality": _finite(result.forget_quality),
        "model_utility": _finite(result.model_utility),
        "rouge_gap": _finite(abs(forget.rouge_l - gold_forget["rouge_l"])),
        "prob_gap": _finite(abs(forget.probability - gold_forget["probability"])),
    }
    for name, split in result.splits.items():
        metrics[f"{name}_rouge_l"] = _finite(split.rouge_l)
        metrics[f"{name}_probability"] = _finite(split.probability)
        metrics[f"{name}_truth_ratio_stat"] = _finite(split.truth_ratio_stat)
    return metrics


def forget_retain_gradients(
    model: torch.nn.Module, forget_batches, retain_batches, *, progress: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """g_f and g_r of every parameter: d(NLL)/d(theta) summed over one pass of each loader, in eval
    mode (the gradients :func:`wagle.attribute` uses). ``.grad``, ``requires_grad`` and the train
    mode of the model are restored."""
    from wagle.attribution import accumulate_gradients
    from wagle.attribution.from_model import gradient_scope

    params = dict(model.named_parameters())
    was_training = model.training
    grads = []
    try:
        model.eval()
        with gradient_scope(model, params):
            for batches, desc in ((forget_batches, "forget gradients"), (retain_batches, "retain gradients")):
                accumulate_gradients(model, batches, params, progress=progress, desc=desc)
                taken = {}
                for name, p in params.items():
                    taken[name] = p.grad if p.grad is not None else torch.zeros_like(p)
                    p.grad = None
                grads.append(taken)
    finally:
        model.train(was_training)
    return grads[0], grads[1]


class _Masks:
    """Masks built on demand and kept (bit-packed, small) for the rest of the study."""

    def __init__(self, target, forget_loader, retain_loader, settings: CompareSettings, progress: bool):
        self.target, self.forget_loader, self.retain_loader = target, forget_loader, retain_loader
        self.settings, self.progress = settings, progress
        self.grads: tuple[dict, dict] | None = None
        self.cache: dict[tuple, WeightMask] = {}
        self.seconds: dict[str, float] = {}

    def get(self, spec: RunSpec) -> WeightMask:
        from wagle.attribution import mask_from_gradients, wanda_mask

        key = (spec.method, spec.ratio, spec.seed if spec.method == "random" else None)
        if key in self.cache:
            return self.cache[key]
        started = time.perf_counter()
        params = dict(self.target.named_parameters())
        if spec.method == "wanda":
            was_training = self.target.training
            self.target.eval()
            try:
                mask = wanda_mask(self.target, self.forget_loader, params, ratio=spec.ratio, progress=False)
            finally:
                self.target.train(was_training)
        elif spec.method in ("magnitude", "random"):
            mask = mask_from_gradients(
                params, None, None, ratio=spec.ratio, method=spec.method, seed=spec.seed
            )
        else:
            if self.grads is None:
                t = time.perf_counter()
                self.grads = forget_retain_gradients(
                    self.target, self.forget_loader, self.retain_loader, progress=self.progress
                )
                self.seconds["gradients"] = time.perf_counter() - t
            g_f, g_r = self.grads
            mask = mask_from_gradients(
                params,
                g_f,
                g_r if spec.method == "wagle" else None,
                ratio=spec.ratio,
                method=spec.method,
                gamma=self.settings.gamma,
            )
        self.cache[key] = mask
        self.seconds["masks"] = self.seconds.get("masks", 0.0) + time.perf_counter() - started
        return mask


def _study_description(target, gold, tokenizer, data: Mapping[str, list[dict]], grid: Grid, settings) -> dict:
    return {
        "target_model": model_digest(target),
        "gold_model": model_digest(gold),
        "tokenizer": tokenizer_digest(tokenizer),
        "data": {name: data_digest(rows) for name, rows in data.items()},
        "data_sizes": {name: len(rows) for name, rows in data.items()},
        "grid": grid.to_dict(),
        "settings": {**asdict(settings), "lora_targets": list(settings.lora_targets)},
    }


def compare(
    target: torch.nn.Module,
    gold: torch.nn.Module,
    tokenizer,
    *,
    forget,
    retain,
    general=None,
    retain_eval=None,
    out_dir: str | os.PathLike,
    objectives: Sequence[str] = ("npo",),
    methods: Sequence[str] = ("wagle", "random", "magnitude", "gradient", "snip", "wanda", "dense", "lora"),
    ratios: Sequence[float] = (0.5,),
    lrs: Sequence[float] = (1e-5,),
    steps: Sequence[int] = (100,),
    seeds: Sequence[int] = (0, 1, 2),
    lora_lrs: Sequence[float] | None = None,
    method_lrs: Mapping[str, Sequence[float]] | None = None,
    settings: CompareSettings | None = None,
    budget_seconds: float | None = None,
    probe_runs: int = 2,
    fq_levels: Sequence[float] = DEFAULT_FQ_LEVELS,
    gap_levels: Sequence[float] = DEFAULT_GAP_LEVELS,
    plot: bool = True,
    extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a mask comparison study and write ``results.jsonl``, ``report.json``,
    ``table.txt`` and ``frontier.png`` into ``out_dir``; returns the report dict.

    ``target`` is the model to unlearn (it is never modified: every run works on a copy), ``gold`` the
    model trained without the forget set. ``forget``/``retain``/``general`` are TOFU-schema QA data
    (question, answer, paraphrased_answer, perturbed_answer); unlearning uses ``forget`` and ``retain``,
    model utility is measured on ``retain_eval`` (default: ``retain``; e.g. TOFU's retain_perturbed,
    when the retain set itself has no perturbed answers) and ``general``. The grid: ``objectives`` x
    ``methods`` x ``ratios`` (mask methods only) x ``lrs`` (``lora_lrs`` for LoRA, ``method_lrs[m]`` for a
    method given there) x ``steps`` x ``seeds``.

    Resuming: runs already in ``out_dir/results.jsonl`` are not redone; a results file of another study
    (another model, data, grid or settings) raises ``UserError``. ``budget_seconds`` bounds this call:
    after ``probe_runs`` runs (or from the timings already in the file) the seconds per run are
    estimated and the grid is trimmed by :func:`wagle.comparison.grid.trim_grid` to fit; what was
    dropped is in the report (``budget``). Runs that diverge are recorded and left out of the statistics.
    ``extra`` is copied into the report as it is (e.g. how the models were made).
    """
    from wagle.data import make_dataloader
    from wagle.evaluation import evaluate
    from wagle.unlearning import UnlearningDiverged, unlearn

    from .lora import add_lora, require_peft
    from .report import build_report, write_outputs

    settings = settings or CompareSettings()
    settings.check()
    grid = Grid.make(
        objectives=objectives,
        methods=methods,
        ratios=ratios,
        lrs=lrs,
        steps=steps,
        seeds=seeds,
        lora_lrs=lora_lrs,
        method_lrs=method_lrs,
    )
    if "lora" in grid.methods:
        require_peft()
    if budget_seconds is not None and not (isinstance(budget_seconds, (int, float)) and budget_seconds > 0):
        raise UserError(f"budget_seconds: must be a number > 0, got {budget_seconds!r}")
    check_number("probe_runs", probe_runs, low=1, integer=True)
    from wagle.objectives import make_objective

    for objective in grid.objectives:  # unknown objective options fail now, not after hours
        make_objective(objective, **settings.objective_kwargs.get(objective, {}))

    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    try:
        threads = torch.get_num_threads()
        forget_rows = _rows(forget, "forget")
        # a retain set used only for unlearning needs no paraphrased / perturbed answers
        retain_rows = _rows(retain, "retain", ("question", "answer") if retain_eval is not None else None)
        data = {"forget": forget_rows, "retain": retain_rows}
        if general is not None:
            data["general"] = _rows(general, "general")
        if retain_eval is not None:
            data["retain_eval"] = _rows(retain_eval, "retain_eval")
        limit = settings.utility_examples
        eval_splits = {"forget": forget_rows, "retain": data.get("retain_eval", retain_rows)[:limit]}
        if general is not None:
            eval_splits["general"] = data["general"][:limit]
        study = _study_description(target, gold, tokenizer, data, grid, settings)
        study["settings"]["num_threads"] = threads
        # the instruction set orders CPU sums as the thread count does: a study resumes on the same kind
        study["host"] = host_description(next(target.parameters()).device)
        os.makedirs(out_dir, exist_ok=True)
        results = ResultsFile(os.path.join(out_dir, RESULTS_NAME), study)
        eval_kw = {
            "batch_size": settings.eval_batch_size,
            "max_new_tokens": settings.max_new_tokens,
            "max_length": settings.max_length,
            "utility_splits": tuple(name for name in eval_splits if name != "forget"),
            "progress": False,
        }
        timings: dict[str, float] = {}

        # the gold and target models, evaluated once per study
        references = results.references()
        if "gold" not in references:
            t = time.perf_counter()
            gold_result = evaluate(gold, tokenizer, eval_splits, reference=None, **eval_kw)
            record = {
                "kind": "reference",
                "label": "gold",
                "forget_truth_ratios": [_finite(v) for v in gold_result.forget_truth_ratios()],
                "forget": {
                    "rouge_l": gold_result.splits["forget"].rouge_l,
                    "probability": gold_result.splits["forget"].probability,
                },
            }
            record["metrics"] = run_metrics(gold_result, record["forget"])
            record["seconds"] = time.perf_counter() - t
            results.append(record)
            references = results.references()
        gold_ref = references["gold"]
        if any(v is None for v in gold_ref["forget_truth_ratios"]):
            raise UserError("gold: the gold model's forget truth ratios are not finite")
        gold_ratios = gold_ref["forget_truth_ratios"]
        if "target" not in references:
            t = time.perf_counter()
            target_result = evaluate(target, tokenizer, eval_splits, reference=gold_ratios, **eval_kw)
            results.append(
                {
                    "kind": "reference",
                    "label": "target",
                    "metrics": run_metrics(target_result, gold_ref["forget"]),
                    "seconds": time.perf_counter() - t,
                }
            )
        timings["setup (digests, reference evaluations)"] = time.perf_counter() - started

        loader_kw = {"batch_size": settings.batch_size, "max_length": settings.max_length}
        masks = _Masks(
            target,
            make_dataloader(forget_rows, tokenizer, **loader_kw),
            make_dataloader(retain_rows, tokenizer, **loader_kw),
            settings,
            progress,
        )

        def execute(spec: RunSpec) -> dict:
            t = time.perf_counter()
            mask = masks.get(spec) if spec.method in MASK_METHODS else None
            model = copy.deepcopy(target)
            if spec.method == "lora":
                model = add_lora(
                    model,
                    r=settings.lora_r,
                    alpha=settings.lora_alpha,
                    targets=settings.lora_targets,
                    seed=spec.seed,
                )
            record = {"kind": "run", "key": spec.key, **spec.to_dict()}
            try:
                outcome = unlearn(
                    model,
                    forget_rows,
                    retain_rows,
                    tokenizer=tokenizer,
                    method=spec.objective,
                    mask=mask,
                    steps=spec.steps,
                    lr=spec.lr,
                    batch_size=settings.batch_size,
                    grad_accum=settings.grad_accum,
                    warmup_ratio=settings.warmup_ratio,
                    weight_decay=settings.weight_decay,
                    max_grad_norm=settings.max_grad_norm,
                    clip_mode=settings.clip_mode,
                    max_length=settings.max_length,
                    objective_kwargs=settings.objective_kwargs.get(spec.objective),
                    seed=spec.seed,
                    progress=False,
                )
            except UnlearningDiverged as exc:
                record.update(status="diverged", error=str(exc), metrics={})
            else:
                result = evaluate(model, tokenizer, eval_splits, reference=gold_ratios, **eval_kw)
                last = outcome.history[-1] if outcome.history else {}
                record.update(status="ok", metrics=run_metrics(result, gold_ref["forget"]))
                record["final_loss"] = _finite(last.get("loss"))
            record["updated_fraction"] = _updated_fraction(spec, mask, model, target)
            record["seconds"] = time.perf_counter() - t
            del model
            return record

        full_runs = grid.runs()
        done = set(results.runs())
        todo = [r for r in full_runs if r.key not in done]
        budget_info: dict[str, Any] | None = None
        planned = grid
        bar = tqdm(total=len(todo), desc="compare", unit="run", disable=not progress)
        try:

            def step(spec: RunSpec) -> None:
                bar.set_postfix_str(
                    f"{spec.objective} {spec.method} r={spec.ratio} lr={spec.lr:g} s={spec.seed}"
                )
                results.append(execute(spec))
                done.add(spec.key)
                bar.update(1)

            if budget_seconds is not None:
                timed = [r["seconds"] for r in results.runs().values()]
                while len(timed) < probe_runs and todo:
                    step(todo.pop(0))
                    timed.append(results.records[-1]["seconds"])
                per_run = sum(timed) / len(timed) if timed else 0.0
                left = budget_seconds - (time.perf_counter() - started)

                def fits(g: Grid) -> bool:
                    return sum(r.key not in done for r in g.runs()) * per_run <= left

                planned, dropped = trim_grid(grid, fits)
                keys = {r.key for r in planned.runs()}
                todo = [r for r in todo if r.key in keys]
                bar.total = bar.n + len(todo)
                bar.refresh()
                budget_info = {
                    "seconds": budget_seconds,
                    "seconds_per_run_estimate": per_run,
                    "estimated_from_runs": len(timed),
                    "seconds_left_at_planning": left,
                    "dropped": dropped,
                    "grid": planned.to_dict(),
                }
                if dropped:
                    logger.warning("budget %.0fs: dropped %s", budget_seconds, ", ".join(dropped))
            stopped_early = []
            for index, spec in enumerate(todo):
                if budget_seconds is not None and time.perf_counter() - started > budget_seconds:
                    stopped_early = [r.key for r in todo[index:]]
                    logger.warning("budget exhausted: %d runs left (run again to resume)", len(stopped_early))
                    break
                step(spec)
            if budget_info is not None:
                budget_info["not_run_budget_exhausted"] = stopped_early
        finally:
            bar.close()
        timings.update(masks.seconds)
        timings["total"] = time.perf_counter() - started
        keys = {r.key for r in full_runs}
        records = [r for r in results.runs().values() if r["key"] in keys]
        report = build_report(
            results.study,
            results.fingerprint,
            results.references(),
            records,
            grid=grid,
            missing=[r.key for r in full_runs if r.key not in done],
            budget=budget_info,
            fq_levels=fq_levels,
            gap_levels=gap_levels,
            timings=timings,
            results_path=results.path,
        )
        report["torch_threads"] = threads
        report.update(extra or {})
        write_outputs(report, out_dir, plot=plot)
        return report
    finally:
        torch.set_num_threads(previous_threads)


def _updated_fraction(spec: RunSpec, mask: WeightMask | None, model, target: torch.nn.Module) -> float:
    """Weights a run may change as a fraction of the target's weights (LoRA: its adapter weights)."""
    total = sum(p.numel() for p in target.parameters())
    if mask is not None:  # a Wanda mask covers Linear weights only: the rest is frozen
        return mask.num_selected / total
    if spec.method == "lora":
        return sum(p.numel() for p in model.parameters() if p.requires_grad) / total
    return 1.0
