"""The score-method registry is the one place a method is defined: a throwaway method registered with
a kernel branch gives the same masks on both backends; ids without a kernel branch fail loudly."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HAS_CUDA

from wagle.attribution import mask_from_gradients
from wagle.attribution.from_model import attribution_methods
from wagle_kernels import select
from wagle_kernels.scores import (
    SCORE_METHODS,
    ScoreMethod,
    get_method,
    method_names,
    register_method,
    scores_torch,
    unregister_method,
)

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="patches the kernel's score branch under the interpreter")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

_original_score_block = select.score_block


@triton.jit
def _score_block_with_throwaway(
    w_ptr, gf_ptr, gr_ptr, offs, valid, start, inv_gamma, seed, METHOD: tl.constexpr
):
    """The library's score branches plus one for kernel id 90: |g_f - w * g_r|."""
    if METHOD == 90:
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        gf = tl.load(gf_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        gr = tl.load(gr_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        s = tl.abs(gf - w * gr)
    else:
        s = _original_score_block(w_ptr, gf_ptr, gr_ptr, offs, valid, start, inv_gamma, seed, METHOD)
    return s


def _throwaway_torch(w, gf, gr, ctx):
    return (gf.float() - w.float() * gr.float()).abs()


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (37, 13), "b": (4099,), "c": (1,), "d": (0,), "e": (300,)}
    params = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    gf = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    gr = {n: torch.randn(s, generator=g).to(torch.float16) for n, s in shapes.items()}
    gf["e"][:200] = 0.0  # a tie block
    return params, gf, gr


@pytest.fixture
def throwaway(monkeypatch):
    monkeypatch.setattr(select, "score_block", _score_block_with_throwaway)
    register_method(ScoreMethod("throwaway", 90, (True, True, True), _throwaway_torch, doc="|g_f - w*g_r|"))
    yield
    unregister_method("throwaway")


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.95])
def test_registered_method_identical_on_both_backends(throwaway, ratio):
    assert "throwaway" in method_names() and "throwaway" in attribution_methods()
    params, gf, gr = _inputs(3)
    got = {
        b: mask_from_gradients(params, gf, gr, ratio=ratio, method="throwaway", backend=b)
        for b in ("torch", "triton")
    }
    # an independent reference: concatenated scores, stable descending sort
    flat = torch.cat([_throwaway_torch(params[n], gf[n], gr[n], None).reshape(-1) for n in params])
    order = torch.sort(flat, descending=True, stable=True).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[: math.floor(ratio * flat.numel())]] = True
    offset = 0
    for name, w in params.items():
        expected = chosen[offset : offset + w.numel()].view(w.shape)
        offset += w.numel()
        assert torch.equal(got["torch"][name], expected), name
        assert torch.equal(got["triton"][name], expected), name
        assert torch.equal(got["torch"].packed(name), got["triton"].packed(name)), name


def test_unregistered_method_is_gone():
    assert "throwaway" not in SCORE_METHODS
    params, gf, gr = _inputs(1)
    with pytest.raises(ValueError, match="method: unknown method 'throwaway'"):
        mask_from_gradients(params, gf, gr, ratio=0.5, method="throwaway", backend="triton")
    with pytest.raises(ValueError, match="unknown scoring method"):
        scores_torch("throwaway", None, None, None, numel=3)


def test_kernel_id_without_branch_fails_loudly():
    """A registry entry whose kernel id has no branch in score_block raises; it never silently scores
    like another method."""
    register_method(ScoreMethod("no_branch", 91, (True, True, False), _throwaway_torch))
    try:
        params, gf, gr = _inputs(2)
        with pytest.raises(Exception, match="no kernel branch for this METHOD id"):
            mask_from_gradients(params, gf, gr, ratio=0.5, method="no_branch", backend="triton")
    finally:
        unregister_method("no_branch")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_method(ScoreMethod("wagle", 77, (True, True, True), _throwaway_torch))
    with pytest.raises(ValueError, match="kernel_id: 0 is already used by 'wagle'"):
        register_method(ScoreMethod("other", 0, (True, True, True), _throwaway_torch))
    with pytest.raises(ValueError, match="no score method named"):
        unregister_method("not-there")
    assert get_method("wagle").needs_gamma and get_method("random").needs_seed
    assert not get_method("random").can_be_nonfinite
