"""``wagle.compare``: frontier / matching / tie logic by hand, grid trimming, the resumable results file,
the LoRA baseline, and tiny end-to-end studies (API and CLI) on the quick demo models."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

import wagle
from wagle.comparison import (
    Cell,
    CompareSettings,
    Grid,
    ResultsFile,
    RunSpec,
    Stat,
    aggregate,
    best_at_level,
    compare,
    compare_at_level,
    compare_stats,
    forget_retain_gradients,
    method_frontiers,
    pareto_front,
    summarize,
    trim_grid,
)
from wagle.comparison.lora import add_lora
from wagle.comparison.results import model_digest
from wagle.host import host_description

# ------------------------------------------------------------------------------ pure logic, by hand


def test_summarize_mean_sample_std_and_n():
    s = summarize([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3)
    # sample variance: ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = (16/9 + 1/9 + 25/9) / 2 = 7/3
    assert s.std == pytest.approx(math.sqrt(7 / 3))
    one = summarize([0.5, float("nan"), None])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.std)
    assert summarize([]).n == 0


def test_pareto_front_by_hand():
    # (forgetting, utility); higher forgetting is better
    pts = [(0.1, 0.9), (0.5, 0.8), (0.4, 0.7), (0.9, 0.3), (0.5, 0.8), (float("nan"), 1.0), (0.9, 0.2)]
    # (0.4, 0.7) is dominated by (0.5, 0.8); the second (0.5, 0.8) is a duplicate; (0.9, 0.2) by (0.9, 0.3)
    assert pareto_front(pts, higher_x_is_better=True) == [3, 1, 0]
    # lower forgetting is better (a gap): (0.1, 0.9) dominates everything
    assert pareto_front(pts, higher_x_is_better=False) == [0]
    gaps = [(0.3, 0.9), (0.1, 0.5), (0.2, 0.6), (0.2, 0.4)]
    assert pareto_front(gaps, higher_x_is_better=False) == [1, 2, 0]


def _cell(method, ratio, utility, forgetting, measure="forget_quality", objective="npo", lr=1e-3):
    return Cell(objective, method, ratio, lr, 10, stats={"model_utility": utility, measure: forgetting})


def test_best_at_level_and_ties_by_hand():
    cells = [
        _cell("wagle", 0.3, Stat(0.60, 0.01, 3), Stat(0.20, 0.05, 3)),
        _cell("wagle", 0.5, Stat(0.55, 0.01, 3), Stat(0.60, 0.05, 3)),
        _cell("random", 0.3, Stat(0.62, 0.01, 3), Stat(0.08, 0.05, 3)),
        _cell("random", 0.5, Stat(0.585, 0.02, 3), Stat(0.15, 0.05, 3)),
        _cell("dense", None, Stat(0.50, 0.01, 1), Stat(0.90, 0.0, 1)),
    ]
    # forget quality >= 0.1: wagle's best is 0.60 (ratio 0.3), random's 0.585 (ratio 0.5), dense 0.50
    comp = compare_at_level(cells, "npo", "forget_quality", 0.1)
    assert comp.best["wagle"].ratio == 0.3 and comp.best["random"].ratio == 0.5
    assert comp.leader == "wagle"
    # 0.60 - 0.585 = 0.015 <= sqrt(0.01^2 + 0.02^2) = 0.0224: a tie; dense has n = 1: untested
    assert comp.verdicts == {"random": "tie", "dense": "untested"}
    assert comp.winners == ["wagle", "random", "dense"]
    # forget quality >= 0.5: only wagle@0.5 (0.55) and dense (0.50) reach it
    comp = compare_at_level(cells, "npo", "forget_quality", 0.5)
    assert comp.leader == "wagle" and comp.best["random"] is None and comp.verdicts["random"] == "-"
    assert best_at_level(cells, "forget_quality", 0.95) is None
    # a clear win: 0.62 vs 0.55 with spreads 0.01 -> 0.07 > 0.0141
    assert compare_stats(Stat(0.62, 0.01, 3), Stat(0.55, 0.01, 3)) == "better"
    assert compare_stats(Stat(0.55, 0.01, 3), Stat(0.62, 0.01, 3)) == "worse"
    assert compare_stats(Stat(0.62, 0.05, 3), Stat(0.55, 0.05, 3)) == "tie"  # 0.07 <= 0.0707
    assert compare_stats(Stat(0.62, 0.01, 3), Stat(0.55, math.nan, 1)) == "untested"


def test_gap_measures_are_minimised():
    cells = [
        _cell("wagle", 0.3, Stat(0.6, 0.01, 2), Stat(0.05, 0.01, 2), measure="rouge_gap"),
        _cell("wagle", 0.5, Stat(0.7, 0.01, 2), Stat(0.40, 0.01, 2), measure="rouge_gap"),
        _cell("snip", 0.5, Stat(0.5, 0.01, 2), Stat(0.02, 0.01, 2), measure="rouge_gap"),
    ]
    comp = compare_at_level(cells, "npo", "rouge_gap", 0.1)
    assert comp.leader == "wagle" and comp.best["wagle"].ratio == 0.3 and comp.verdicts == {"snip": "better"}
    fronts = method_frontiers(cells, "npo", "rouge_gap")
    assert [c.ratio for c in fronts["wagle"]] == [0.3, 0.5] and [c.ratio for c in fronts["snip"]] == [0.5]


def test_aggregate_groups_seeds():
    records = [
        {"objective": "npo", "method": "wagle", "ratio": 0.5, "lr": 1e-3, "steps": 5, "seed": s, "metrics": m}
        for s, m in [(0, {"model_utility": 0.4}), (1, {"model_utility": 0.6}), (2, {"model_utility": None})]
    ]
    records.append({**records[0], "method": "dense", "ratio": None, "seed": 0})
    cells = aggregate(records)
    assert [c.method for c in cells] == ["wagle", "dense"]
    assert cells[0].seeds == [0, 1, 2]
    stat = cells[0].stats["model_utility"]
    assert (stat.mean, stat.n) == (0.5, 2) and stat.std == pytest.approx(math.sqrt(0.02))


def test_grid_runs_and_trimming_by_hand():
    grid = Grid.make(
        objectives=["npo"],
        methods=["wagle", "random", "dense"],
        ratios=[0.1, 0.3, 0.5, 0.9],
        lrs=[1e-4, 1e-3],
        steps=[10],
        seeds=[0, 1, 2],
    )
    runs = grid.runs()
    # per seed: 2 mask methods x 4 ratios x 2 lrs + dense x 2 lrs = 18
    assert len(runs) == 54 and runs[0] == RunSpec("npo", "wagle", 0.1, 1e-4, 10, 0) and runs[18].seed == 1
    assert len({r.key for r in runs}) == 54
    g, dropped = trim_grid(grid, lambda g: len(g.runs()) <= 20)
    # seed 2 goes first (36 runs), then the densest interior ratio 0.3 (gap 0.5-0.1=0.4 < 0.9-0.3=0.6):
    # 2 x (2 x 3 x 2 + 2) = 28, then 0.5: 2 x (2 x 2 x 2 + 2) = 20
    assert dropped == ["seed 2", "ratio 0.3", "ratio 0.5"]
    assert g.seeds == (0, 1) and g.ratios == (0.1, 0.9) and len(g.runs()) == 20
    g, dropped = trim_grid(grid, lambda g: len(g.runs()) <= 5)
    assert g.seeds == (0,) and dropped[-1].startswith("(even") is False
    assert len(g.runs()) <= 5
    g, dropped = trim_grid(grid, lambda g: False)
    assert dropped[-1].startswith("(even the smallest grid")
    with pytest.raises(ValueError, match="methods"):
        Grid.make(objectives=["npo"], methods=["wagle", "bogus"], lrs=[1e-3], steps=[1])
    with pytest.raises(ValueError, match="ratios"):
        Grid.make(objectives=["npo"], methods=["wagle"], ratios=[0.0], lrs=[1e-3], steps=[1])


def test_method_learning_rates():
    base = {"objectives": ["npo"], "ratios": [0.5], "steps": [5], "seeds": [0]}
    plain = Grid.make(methods=["wagle", "lora"], lrs=[1e-3], lora_lrs=[1e-2], **base)
    assert "method_lrs" not in plain.to_dict()  # a study without them keeps its fingerprint
    grid = Grid.make(
        methods=["wagle", "random", "lora"],
        lrs=[1e-4, 2e-4, 4e-4],
        lora_lrs=[1e-2],
        method_lrs={"random": [3e-4, 6e-4, 1.2e-3], "lora": [5e-3, 2e-2], "dense": [1.0]},
        **base,
    )
    assert grid.lrs_of("wagle") == (1e-4, 2e-4, 4e-4) and grid.lrs_of("random") == (3e-4, 6e-4, 1.2e-3)
    assert grid.lrs_of("lora") == (5e-3, 2e-2)  # method_lrs before lora_lrs
    assert grid.to_dict()["method_lrs"] == {"random": [3e-4, 6e-4, 1.2e-3], "lora": [5e-3, 2e-2]}
    assert [(r.method, r.lr) for r in grid.runs() if r.method != "wagle"] == [
        ("random", 3e-4),
        ("random", 6e-4),
        ("random", 1.2e-3),
        ("lora", 5e-3),
        ("lora", 2e-2),
    ]
    g, dropped = trim_grid(grid, lambda g: len(g.runs()) <= 6)
    # the shared lrs lose their densest interior value, every longer method_lrs list one of its own
    assert g.lrs == (1e-4, 4e-4) and g.lrs_of("random") == (3e-4, 1.2e-3) and g.lrs_of("lora") == (5e-3, 2e-2)
    assert dropped == ["random lr 0.0006", "lr 0.0002"]
    with pytest.raises(ValueError, match="method_lrs"):
        Grid.make(methods=["wagle"], lrs=[1e-3], method_lrs={"bogus": [1e-3]}, **base)
    with pytest.raises(ValueError, match=r"method_lrs\[wagle\]"):
        Grid.make(methods=["wagle"], lrs=[1e-3], method_lrs={"wagle": []}, **base)


# ------------------------------------------------------------------------------ the results file


def test_results_file_truncates_partial_line_and_refuses_other_studies(tmp_path):
    path = tmp_path / "results.jsonl"
    study = {"grid": {"lrs": [1e-3]}, "target_model": "abc"}
    rf = ResultsFile(path, study)
    rf.append({"kind": "run", "key": "a", "seconds": 1.0})
    rf.append({"kind": "run", "key": "b", "seconds": 1.0})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])  # the process died while writing run b
    again = ResultsFile(path, study)
    assert again.truncated and list(again.runs()) == ["a"]
    assert path.read_bytes().endswith(b"\n")
    with pytest.raises(ValueError, match="another study.*grid"):
        ResultsFile(path, {**study, "grid": {"lrs": [1e-4]}})
    (tmp_path / "other.jsonl").write_text('{"some": "thing"}\n')
    with pytest.raises(ValueError, match="not a wagle comparison results file"):
        ResultsFile(tmp_path / "other.jsonl", study)


# ------------------------------------------------------------------------------ end to end, tiny


@pytest.fixture(scope="module")
def demo():
    from wagle.models import build_demo_models

    return build_demo_models(forget_split="forget10", quick=True, progress=False, num_threads=1)


SETTINGS = {
    "batch_size": 4,
    "max_new_tokens": 2,
    "eval_batch_size": 64,
    "utility_examples": 8,
    "num_threads": 1,
}
GRID = {
    "objectives": ["npo"],
    "methods": ["wagle", "wanda", "dense", "lora"],
    "ratios": [0.5],
    "lrs": [1e-3],
    "steps": [1],
    "seeds": [0, 1],
}


def _study(demo, out, **kw):
    bm = demo.benchmark
    return compare(
        demo.target,
        demo.retain,
        demo.tokenizer,
        forget=bm["forget10"],
        retain=bm["retain90"],
        general=bm["general"],
        out_dir=out,
        settings=CompareSettings(**{**SETTINGS, **kw.pop("settings", {})}),
        progress=False,
        **{**GRID, **kw},
    )


def test_compare_end_to_end_and_resume(demo, tmp_path, monkeypatch):
    import wagle.unlearning

    out = tmp_path / "study"
    before = model_digest(demo.target)
    calls = []
    real = wagle.unlearning.unlearn

    def interrupted_after_three(model, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(kwargs["seed"])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(wagle.unlearning, "unlearn", interrupted_after_three)
    with pytest.raises(KeyboardInterrupt):
        _study(demo, out)
    monkeypatch.setattr(wagle.unlearning, "unlearn", real)
    path = out / "results.jsonl"
    assert len([json.loads(x) for x in path.read_text().splitlines()]) == 1 + 2 + 3  # header, refs, 3 runs

    # the 4th run was being written when the process died: a partial line
    with open(path, "a") as handle:
        handle.write('{"kind": "run", "key": "npo|dense|-|0.001|1|0", "sta')
    complete = path.read_bytes()[: path.read_bytes().rfind(b"\n") + 1]
    counted = []
    monkeypatch.setattr(
        wagle.unlearning, "unlearn", lambda model, *a, **k: counted.append(k["seed"]) or real(model, *a, **k)
    )
    report = _study(demo, out)
    assert len(counted) == 8 - 3  # the three finished runs are not redone, the partial one is
    assert path.read_bytes().startswith(complete)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    runs = [r for r in lines if r["kind"] == "run"]
    assert len(runs) == 8 and len({r["key"] for r in runs}) == 8
    assert model_digest(demo.target) == before  # every run works on a copy

    assert report["runs"]["finished"] == 8 and not report["runs"]["missing"]
    assert {c["method"] for c in report["cells"]} == set(GRID["methods"])
    wagle_cell = next(c for c in report["cells"] if c["method"] == "wagle")
    assert wagle_cell["stats"]["model_utility"]["n"] == 2 and wagle_cell["seeds"] == [0, 1]
    for r in runs:
        m = r["metrics"]
        gold = lines[1]["forget"]
        assert m["rouge_gap"] == pytest.approx(abs(m["forget_rouge_l"] - gold["rouge_l"]))
        assert m["prob_gap"] == pytest.approx(abs(m["forget_probability"] - gold["probability"]))
    lora = next(r for r in runs if r["method"] == "lora")
    assert 0 < lora["updated_fraction"] < 0.2
    for name in ("report.json", "table.txt", "frontier.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["fingerprint"] == lines[0]["fingerprint"] and "npo" in saved["frontiers"]
    assert "wagle" in saved["table"] and saved["matched"]

    # a second call finds everything done and runs nothing
    counted.clear()
    _study(demo, out)
    assert counted == []
    # another grid on the same folder is refused
    with pytest.raises(ValueError, match="another study"):
        _study(demo, out, lrs=[2e-3])
    # so are other clipping semantics (clip_mode is part of the fingerprint)
    assert lines[0]["study"]["settings"]["clip_mode"] == "mask_then_clip"
    with pytest.raises(ValueError, match="another study.*settings"):
        _study(demo, out, settings={"clip_mode": "clip_then_mask"})
    with pytest.raises(ValueError, match="clip_mode"):
        _study(demo, tmp_path / "other", settings={"clip_mode": "clip_first"})
    # and a machine whose CPU dispatches to another instruction set (other low bits in every sum)
    assert lines[0]["study"]["host"] == host_description("cpu") == saved["study"]["host"]
    import wagle.comparison.runner as runner

    monkeypatch.setattr(runner, "host_description", lambda device: {"device": "cpu", "capability": "AVX2"})
    with pytest.raises(ValueError, match="another study.*host"):
        _study(demo, out)


def test_budget_trims_the_grid(demo, tmp_path):
    report = _study(
        demo, tmp_path / "b", methods=["wagle", "dense"], seeds=[0, 1, 2], budget_seconds=0.01, probe_runs=1
    )
    budget = report["budget"]
    assert budget["estimated_from_runs"] == 1 and budget["seconds_per_run_estimate"] > 0
    assert budget["dropped"][:2] == ["seed 2", "seed 1"] and budget["dropped"][-1].startswith("(even")
    assert report["runs"]["finished"] == 1 and len(report["runs"]["missing"]) == 5


def test_masks_from_shared_gradients_equal_attribute(demo):
    from wagle.data import make_dataloader

    bm, tok = demo.benchmark, demo.tokenizer
    forget = make_dataloader(bm["forget10"], tok, batch_size=4)
    retain = make_dataloader(bm["retain90"], tok, batch_size=4)
    g_f, g_r = forget_retain_gradients(demo.target, forget, retain)
    params = dict(demo.target.named_parameters())
    for method in ("wagle", "snip", "gradient"):
        shared = wagle.mask_from_gradients(
            params, g_f, g_r if method == "wagle" else None, ratio=0.3, method=method
        )
        direct = wagle.attribute(demo.target, forget, retain, ratio=0.3, method=method, progress=False)
        assert all(torch.equal(shared.packed(n), direct.packed(n)) for n in shared), method
    assert all(p.grad is None for p in demo.target.parameters())


def test_lora_baseline_trains_only_adapters(demo):
    bm = demo.benchmark
    base = copy.deepcopy(demo.target)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = add_lora(base, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(("q_proj" in n or "v_proj" in n) for n in trainable)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    wagle.unlearn(
        model,
        bm["forget10"],
        bm["retain90"],
        tokenizer=demo.tokenizer,
        method="npo",
        steps=2,
        lr=1e-2,
        progress=False,
    )
    unchanged = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(param, original[plain]), name
        unchanged += 1
    assert unchanged == len(original)
    assert any(not torch.equal(adapters[n], p) for n, p in model.named_parameters() if n in adapters)


# ------------------------------------------------------------------------------ CLI


def test_cli_help_and_errors(capsys):
    from wagle.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    assert "matched forgetting" in capsys.readouterr().out
    assert main(["compare", "--no-progress"]) == 2
    assert "--model: required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--ratios", "a,b"])
    assert exc.value.code == 2


def test_cli_end_to_end(demo, tmp_path, capsys):
    from wagle.cli import main
    from wagle.data import write_benchmark
    from wagle.models import save_model

    paths = write_benchmark(tmp_path / "data", num_authors=20)
    save_model(demo.target, demo.tokenizer, tmp_path / "target")
    save_model(demo.retain, demo.tokenizer, tmp_path / "gold")
    args = ["compare", "--model", tmp_path / "target", "--gold-model", tmp_path / "gold"]
    # a retain set for unlearning without perturbed answers, and a utility split with them (as in TOFU)
    plain = tmp_path / "retain_plain.jsonl"
    with open(paths["retain90"]) as src, open(plain, "w") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")
    args += ["--forget", paths["forget10"], "--retain", plain, "--retain-eval", paths["retain90"]]
    args += ["--out", tmp_path / "out"]
    args += ["--methods", "wagle,dense", "--ratios", "0.5", "--lrs", "1e-3", "--steps", "1", "--seeds", "0,1"]
    args += [
        "--max-new-tokens",
        "2",
        "--utility-examples",
        "8",
        "--threads",
        "1",
        "--no-progress",
        "--no-plot",
    ]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "Utility at matched forgetting" in out and "wagle" in out and "dense" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["runs"]["finished"] == 4 and report["study"]["settings"]["num_threads"] == 1
    assert report["study"]["data_sizes"] == {"forget": 10, "retain": 90, "retain_eval": 90}
    assert not os.path.exists(tmp_path / "out" / "frontier.png")


# ------------------------------------------------------------------------------ the study preset


def test_study_benchmark_is_deterministic_with_twenty_facts_per_author():
    from collections import Counter

    from wagle.data.study_benchmark import FACTS_PER_AUTHOR, generate_study_rows

    rows = generate_study_rows()
    assert rows == generate_study_rows()
    assert {k: len(v) for k, v in rows.items()} == {"full": 500, "forget": 100, "retain": 400, "general": 60}
    assert set(Counter(r["author"] for r in rows["full"]).values()) == {FACTS_PER_AUTHOR}
    assert not {r["author"] for r in rows["forget"]} & {r["author"] for r in rows["retain"]}
    books = [r["answer"].rsplit(" is ", 1)[1] for r in rows["full"] if "book by" in r["answer"]]
    assert len(books) == 75 and len(set(books)) == 75  # three own titles per author, never shared
    for r in rows["full"]:
        assert len(r["perturbed_answer"]) == 3 and r["paraphrased_answer"] not in r["perturbed_answer"]
        assert len(set(r["perturbed_answer"])) == 3
    with pytest.raises(ValueError, match="forget_authors"):
        generate_study_rows(num_authors=5, forget_authors=5)


def test_study_models_are_cached_and_verified(tmp_path, caplog):
    from wagle.comparison.study import StudyRecipe, build_study_models

    recipe = StudyRecipe.quick()
    # the two models in two worker processes, later again in this one: the same weights
    first = build_study_models(tmp_path, recipe=recipe, workers=2, progress=False)
    assert not first.from_cache and first.manifest["num_threads"] == 1 and first.manifest["workers"] == 2
    assert first.manifest["train_cpu_seconds"] > 0
    again = build_study_models(tmp_path, recipe=recipe, workers=1, progress=False)
    assert again.from_cache and model_digest(again.target) == model_digest(first.target)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
    # a cached weight file that no longer matches its manifest is not used
    from safetensors.torch import load_file, save_file

    weights = os.path.join(first.path, "gold", "model.safetensors")
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    rebuilt = build_study_models(tmp_path, recipe=recipe, workers=1, progress=False)
    assert not rebuilt.from_cache and "do not match" in caplog.text
    assert rebuilt.manifest["digests"] == first.manifest["digests"]  # deterministic, in any process
    with pytest.raises(ValueError, match="workers"):
        build_study_models(tmp_path, recipe=recipe, workers=3, progress=False)


def test_preset_refuses_its_own_options(capsys):
    from wagle.cli import main

    assert main(["compare", "--preset", "study", "--lrs", "1e-3", "--no-progress"]) == 2
    assert "drop --lrs" in capsys.readouterr().err


def test_cli_preset_end_to_end_with_a_small_recipe(tmp_path, monkeypatch, capsys):
    """The preset's path (cached models, preset settings, report) with the quick recipe and a tiny grid."""
    from wagle.cli import main
    from wagle.comparison import study

    monkeypatch.setattr(study, "StudyRecipe", study.StudyRecipe.quick)
    tiny = {
        **study.STUDY_GRID,
        "methods": ("wagle", "dense"),
        "ratios": (0.5,),
        "lrs": (1e-3,),
        "steps": (1,),
    }
    tiny.pop("method_lrs")
    monkeypatch.setattr(study, "STUDY_GRID", tiny)
    preset_settings = study.study_settings

    def quick_settings(num_threads, clip_mode):
        settings = preset_settings(num_threads, clip_mode)
        settings.max_new_tokens, settings.utility_examples = 2, 8
        return settings

    monkeypatch.setattr(study, "study_settings", quick_settings)
    args = ["compare", "--preset", "study", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out"]
    args += ["--threads", "1", "--no-progress", "--no-plot"]
    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert "study models: trained" in out and "Utility at matched forgetting" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["runs"]["finished"] == 4 and report["study"]["data_sizes"]["forget"] == 20
    assert report["study_models"]["manifest"]["recipe"]["hidden_size"] == 32
    assert report["study"]["settings"]["num_threads"] == 1 and report["torch_threads"] == 1
    assert report["study"]["settings"]["clip_mode"] == "mask_then_clip"
    assert main([str(a) for a in args]) == 0  # again: cached models, every run already done
    assert "study models: cached" in capsys.readouterr().out
