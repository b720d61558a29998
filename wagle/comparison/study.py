"""The ``study`` preset: a benchmark and model size where masks can be told apart, with cached models.

* Data: :mod:`wagle.data.study_benchmark` (25 authors x 20 facts; the last 5 authors, 100 questions,
  are the forget set, so forget quality is a KS test on 100 truth ratios).
* Models (:class:`StudyRecipe`): a Llama with hidden size 256, 4 layers, 4 heads, MLP 688, untied
  embeddings, a 1024-token byte-level BPE tokenizer trained on the benchmark (3.69M weights, of which
  14% are embeddings and head), fine-tuned from one initialisation into the target (all authors +
  general) and the gold model (retain authors + general).
* Cache: both models, the tokenizer and a manifest (recipe, data digest, a sha256 of every weight) are
  written into one folder under ``cache_dir`` and renamed into place at once; a cached folder is used
  only when its manifest matches the recipe and data and the loaded weights hash to the recorded
  digests, otherwise the models are trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from wagle.errors import UserError
from wagle.files import atomic_write_text, replace_folder, temporary_folder
from wagle.host import host_description
from wagle.models.tiny import TinyRecipe, qa_corpus

from .results import data_digest, model_digest, tokenizer_digest

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2


@dataclass(frozen=True)
class StudyRecipe(TinyRecipe):
    """Model size, fine-tuning schedule and data of the study preset's target and gold models."""

    hidden_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 688
    epochs: int = 15
    num_authors: int = 25
    forget_authors: int = 5
    seed: int = 0

    QUICK_DATA: ClassVar[dict] = {"num_authors": 6, "forget_authors": 1}


@dataclass
class StudyModels:
    """The tokenizer, target and gold models, the benchmark, and whether they came from the cache."""

    tokenizer: object
    target: torch.nn.Module
    gold: torch.nn.Module
    benchmark: object
    manifest: dict
    from_cache: bool
    path: str


def cache_key(recipe: StudyRecipe, benchmark) -> str:
    """sha256 of the recipe and the benchmark's rows: names the cache folder."""
    rows = {name: data_digest(benchmark[name].to_list()) for name in benchmark}
    text = json.dumps({"format": CACHE_FORMAT, "recipe": asdict(recipe), "data": rows}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


TRAIN_THREADS = 1  # torch intra-op threads per model: the cached weights do not depend on the machine


def _train_one(recipe: StudyRecipe, name: str, tokenizer_dir: str, out_dir: str, progress: bool) -> dict:
    """Fine-tune one study model (``target``: all authors + general, ``gold``: retain authors + general)
    on :data:`TRAIN_THREADS` threads and save it to ``out_dir``; returns the fine-tuning statistics
    and the process CPU seconds. Runs in the caller's process or in a worker process: the same weights."""
    import datasets
    from transformers import PreTrainedTokenizerFast

    from wagle.data.study_benchmark import generate_study_benchmark
    from wagle.models.finetune import _torch_threads

    with _torch_threads(TRAIN_THREADS):
        cpu = time.process_time()
        benchmark = generate_study_benchmark(recipe.num_authors, recipe.forget_authors, recipe.seed)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        model = recipe.model(tokenizer, recipe.seed)
        split = {"target": "full", "gold": "retain"}[name]
        data = datasets.concatenate_datasets([benchmark[split], benchmark["general"]])
        stats = recipe.finetune(
            model, tokenizer, data, seed=recipe.seed, progress=progress, desc=f"fine-tune {name}"
        )
        model.eval().save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        stats["cpu_seconds"] = time.process_time() - cpu
        stats["threads"] = torch.get_num_threads()
        return stats


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _train(recipe: StudyRecipe, benchmark, folder: str, *, workers: int, progress: bool) -> dict:
    """Train the tokenizer, then the target and gold models into ``folder/target`` and ``folder/gold``;
    with ``workers=2`` the two models train at once in two ``python -m wagle.comparison.study``
    processes (one thread each, so the weights are those of ``workers=1``)."""
    from wagle.models import train_tokenizer

    tokenizer = train_tokenizer(qa_corpus(benchmark), vocab_size=recipe.vocab_size)
    tokenizer_dir = os.path.join(folder, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    jobs = {name: (name, tokenizer_dir, os.path.join(folder, name)) for name in ("target", "gold")}
    try:
        if workers == 1:
            return {name: _train_one(recipe, *job, progress) for name, job in jobs.items()}
        return _train_in_workers(recipe, jobs)
    finally:
        shutil.rmtree(tokenizer_dir, ignore_errors=True)


def _train_in_workers(recipe: StudyRecipe, jobs: dict[str, tuple]) -> dict:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    procs = {}
    try:
        for name, job in jobs.items():
            command = [sys.executable, "-m", __name__, json.dumps(asdict(recipe)), *job]
            procs[name] = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        stats = {}
        for name, proc in procs.items():
            out, err = proc.communicate()
            if proc.returncode != 0:
                tail = err.strip().splitlines()[-1] if err.strip() else f"exit status {proc.returncode}"
                raise RuntimeError(f"training the study's {name} model failed: {tail}")
            stats[name] = json.loads(out.strip().splitlines()[-1])
        return stats
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _load_cached(path: str, key: str):
    from wagle.models import load_model

    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.isfile(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("key") != key:
            logger.warning("%s: cache manifest is for another recipe or data; training again", path)
            return None
        target, tokenizer = load_model(os.path.join(path, "target"))
        gold, _ = load_model(os.path.join(path, "gold"))
    except (OSError, ValueError) as exc:
        logger.warning("%s: unreadable cache (%s); training again", path, exc)
        return None
    digests = {
        "target": model_digest(target),
        "gold": model_digest(gold),
        "tokenizer": tokenizer_digest(tokenizer),
    }
    if digests != manifest.get("digests"):
        logger.warning("%s: cached models do not match their manifest's digests; training again", path)
        return None
    return tokenizer, target, gold, manifest


def build_study_models(
    cache_dir: str | os.PathLike,
    *,
    recipe: StudyRecipe | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> StudyModels:
    """The study's tokenizer, target and gold models: from ``cache_dir`` when a verified copy is there,
    else trained (each model on :data:`TRAIN_THREADS` torch thread; ``workers`` processes at once,
    default 2 when the machine has 2 or more CPUs, 1 otherwise; the weights do not depend on it) and
    cached atomically."""
    from wagle.data.study_benchmark import generate_study_benchmark

    if workers is None:
        workers = 2 if (os.cpu_count() or 1) >= 2 else 1
    if workers not in (1, 2):
        raise UserError(f"workers: must be 1 or 2 (one process per model), got {workers!r}")
    recipe = recipe or StudyRecipe()
    benchmark = generate_study_benchmark(recipe.num_authors, recipe.forget_authors, recipe.seed)
    key = cache_key(recipe, benchmark)
    cache_dir = os.path.abspath(os.fspath(cache_dir))
    path = os.path.join(cache_dir, f"study-{key[:16]}")
    cached = _load_cached(path, key) if os.path.isdir(path) else None
    if cached is not None:
        tokenizer, target, gold, manifest = cached
        return StudyModels(tokenizer, target, gold, benchmark, manifest, True, path)

    os.makedirs(cache_dir, exist_ok=True)
    tmp = temporary_folder(cache_dir, f".tmp-study-{key[:16]}-")
    try:
        started, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
        stats = _train(recipe, benchmark, tmp, workers=workers, progress=progress)
        seconds = time.perf_counter() - started
        from wagle.models import load_model

        target, tokenizer = load_model(os.path.join(tmp, "target"))
        gold, _ = load_model(os.path.join(tmp, "gold"))
        manifest = {
            "format": CACHE_FORMAT,
            "key": key,
            "recipe": asdict(recipe),
            "digests": {
                "target": model_digest(target),
                "gold": model_digest(gold),
                "tokenizer": tokenizer_digest(tokenizer),
            },
            "train_stats": stats,
            "train_seconds": seconds,
            # CPU seconds of this process and of the worker processes (imports included)
            "train_cpu_seconds": time.process_time() - cpu + _children_cpu() - children,
            "workers": workers,
            "torch": torch.__version__,
            "num_threads": TRAIN_THREADS,
            "host": host_description("cpu"),
        }
        atomic_write_text(
            os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=2, sort_keys=True) + "\n"
        )
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the models the study uses are the cached ones, loaded back (so a later, cached run is identical)
    cached = _load_cached(path, key)
    if cached is None:
        raise RuntimeError(f"{path}: the study models just written do not verify")
    tokenizer, target, gold, manifest = cached
    return StudyModels(tokenizer, target, gold, benchmark, manifest, False, path)


# The preset grid: every mask method at two ratios, two learning rates per method (a short trade-off
# curve per mask), two seeds (a spread), dense and LoRA; 56 runs of 15 NPO steps. The learning rates
# were placed from single-seed sweeps (15 steps, ratio 0.5) so that the lower one forgets mildly
# (forget ROUGE-L about 0.65-0.8) and the higher one reaches about the gold model's 0.59 without
# collapsing: gradient-based masks move faster per lr than random / magnitude / Wanda masks, dense
# faster still, LoRA needs an order of magnitude more.
STUDY_GRID = {
    "objectives": ("npo",),
    "methods": ("wagle", "random", "magnitude", "gradient", "snip", "wanda", "dense", "lora"),
    "ratios": (0.2, 0.5),
    "lrs": (5e-4, 8e-4),
    "method_lrs": {
        "random": (1e-3, 1.6e-3),
        "magnitude": (1e-3, 1.6e-3),
        "wanda": (1e-3, 1.6e-3),
        "dense": (3e-4, 5e-4),
        "lora": (5e-3, 6e-3),
    },
    "steps": (15,),
    "seeds": (0, 1),
}


def study_settings(num_threads: int | None = 2, clip_mode: str = "mask_then_clip"):
    """The preset's run and evaluation settings (NPO beta 0.1, batch 8, answers up to 24 tokens, the
    first 100 retain questions and all 60 general questions for utility, the whole forget split;
    gradients clipped under ``clip_mode``)."""
    from .runner import CompareSettings

    return CompareSettings(
        batch_size=8,
        objective_kwargs={"npo": {"beta": 0.1}},
        eval_batch_size=64,
        max_new_tokens=24,
        utility_examples=100,
        num_threads=num_threads,
        clip_mode=clip_mode,
    )


def run_study(
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    recipe: StudyRecipe | None = None,
    grid: dict | None = None,
    num_threads: int | None = 2,
    workers: int | None = None,
    clip_mode: str = "mask_then_clip",
    budget_seconds: float | None = None,
    progress: bool = True,
) -> dict:
    """Build (or load) the study models and run the preset grid with :func:`wagle.compare`; the report
    gains ``"study_models"`` (cache path, whether it was a cache hit, the recipe and training stats)."""
    from .runner import compare

    started = time.perf_counter()
    models = build_study_models(cache_dir, recipe=recipe, workers=workers, progress=progress)
    model_seconds = time.perf_counter() - started
    bm = models.benchmark
    report = compare(
        models.target,
        models.gold,
        models.tokenizer,
        forget=bm["forget"],
        retain=bm["retain"],
        general=bm["general"],
        out_dir=out_dir,
        settings=study_settings(num_threads, clip_mode),
        budget_seconds=None if budget_seconds is None else max(1.0, budget_seconds - model_seconds),
        progress=progress,
        extra={
            "study_models": {
                "path": models.path,
                "from_cache": models.from_cache,
                "seconds": model_seconds,
                "manifest": models.manifest,
            }
        },
        **(grid or STUDY_GRID),
    )
    return report


if __name__ == "__main__":  # one model of _train_in_workers: RECIPE_JSON NAME TOKENIZER_DIR OUT_DIR
    import sys

    _recipe, _name, _tokenizer_dir, _out_dir = sys.argv[1:5]
    _stats = _train_one(StudyRecipe(**json.loads(_recipe)), _name, _tokenizer_dir, _out_dir, False)
    print(json.dumps(_stats))
