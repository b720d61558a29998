"""Next-token log-probabilities of label tokens: the one place logits and labels are aligned.

Logit row t predicts token t + 1, so for every position t >= 1 with ``labels_t != -100`` (prompt and
padding tokens are labelled -100) ``log p(y_t | y_<t) = log_softmax(logits_{t-1})[y_t]``. Only the
label positions are upcast to the compute dtype (``(n_label_tokens, vocab)`` instead of the whole
batch). The objectives (float32, with gradients), the evaluation metrics (float32) and the privacy
statistics (float64) all go through these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wagle.data.format import IGNORE_INDEX


def shifted_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, valid)``: ``labels[..., 1:]`` on the logits' device (aligned with
    ``logits[..., :-1, :]``) and ``valid = targets != -100``."""
    targets = labels[..., 1:].to(logits.device)
    return targets, targets != IGNORE_INDEX


def label_log_softmax(
    logits: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log_softmax, targets, valid)`` at the label positions: ``log_softmax(logits_{t-1})`` in
    ``dtype`` as rows of an ``(n, vocab)`` tensor (row-major over ``valid``), the ``n`` target token
    ids, and the ``valid`` mask of shape ``labels[..., 1:]``.

    ``logits``: ``(..., T, vocab)``; ``labels``: ``(..., T)``."""
    targets, valid = shifted_targets(logits, labels)
    return F.log_softmax(logits[..., :-1, :][valid].to(dtype), dim=-1), targets[valid], valid


def label_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, valid)``: ``log p(y_t | y_<t)`` of the ``n`` label tokens in ``dtype`` (row-major
    over ``valid``) and the ``valid`` mask of shape ``labels[..., 1:]`` (see :func:`label_log_softmax`)."""
    logp, targets, valid = label_log_softmax(logits, labels, dtype=dtype)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), valid


def row_sums(values: torch.Tensor, valid: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    """Per example: ``sum_t values_t`` over its label tokens, accumulated in ``dtype`` in token order
    (``values``: one entry per ``True`` of the ``(batch, T - 1)`` mask ``valid``, row-major)."""
    row_of = torch.arange(valid.shape[0], device=valid.device).unsqueeze(1).expand_as(valid)[valid]
    sums = torch.zeros(valid.shape[0], dtype=dtype, device=values.device)
    return sums.index_add_(0, row_of, values.to(dtype))
