"""The core (masks, attribution from gradients, masked optimizers) needs only torch, triton, safetensors
and transformers: ``datasets``, ``rouge_score`` and ``scipy`` are imported where they are used, so
``import wagle`` stays fast and works on machines that lack them (e.g. a GPU box without a registry)."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("datasets", "rouge_score", "scipy", "nltk")

SCRIPT = textwrap.dedent(
    f"""
    import sys
    for name in {OPTIONAL!r}:
        sys.modules[name] = None  # any import of these now raises ImportError

    import torch
    import wagle

    torch.manual_seed(0)
    params = {{"a": torch.randn(37, 5), "b": torch.randn(11)}}
    gf = {{n: torch.randn_like(p) for n, p in params.items()}}
    gr = {{n: torch.randn_like(p) for n, p in params.items()}}
    mask = wagle.mask_from_gradients(params, gf, gr, ratio=0.3, backend="torch")
    assert mask.num_selected == int(0.3 * 196), mask.num_selected

    model = torch.nn.Linear(5, 37)
    named = dict(model.named_parameters())
    mask = wagle.mask_from_gradients(named, {{n: torch.randn_like(p) for n, p in named.items()}},
                                     None, ratio=0.5, method="gradient", backend="torch")
    opt = wagle.MaskedAdamW(model.named_parameters(), mask, lr=0.1, fused=False)
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    loaded = [m for m in {OPTIONAL!r} if m in sys.modules and sys.modules[m] is not None]
    assert not loaded, loaded
    print("ok")
    """
)


def test_core_works_without_optional_libraries():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_import_does_not_load_optional_libraries():
    code = f"import sys, wagle; print([m for m in {OPTIONAL!r} if m in sys.modules])"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
