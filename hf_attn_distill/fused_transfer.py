"""Attention softmax and attention-transfer loss in one autograd node.

Computing the loss after the forward pass means the student's ``log_softmax`` output, its
probabilities and every temporary of the loss formula are separate ``[B, H, Q, K]`` tensors, and
backward runs the loss backward, an exp backward, a gradient sum and the log-softmax backward over
them. Because the teacher runs first, its attention of the layer is already known when the
student's layer runs, so the loss can be taken right there: :class:`SoftmaxWithTransferLoss` turns
masked scores into probabilities *and* the loss, keeps only the probabilities for backward (the
softmax needs them anyway), and adds the loss gradient inside the softmax backward:

- KL (MiniLM): ``d/dS = w * (p_s * sum_k p~_t - p~_t)``;
- MSE on probabilities: ``2w (p_s - p_t)`` added to the probability gradient before the softmax backward;
- MSE on scores (TinyBERT): ``d/dS = 2w (S - S_t)``,

where ``p~_t`` is the teacher distribution with padded keys and queries zeroed and ``w`` the
loss's incoming gradient over its count. Values and gradients equal
:func:`~hf_attn_distill.attention_kl_loss` / :func:`~hf_attn_distill.attention_mse_loss` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .losses import _attention_masks, _chunks, _flat_rows, _kl_sum, _masked_, _squared_sum, _valid_count

__all__ = ["TRANSFER_LOSSES", "TransferTarget", "SoftmaxWithTransferLoss", "softmax_with_transfer_loss"]

TRANSFER_LOSSES = ("kl", "mse_probs", "mse_scores")


@dataclass
class TransferTarget:
    """What one student attention layer is trained towards.

    Attributes:
        teacher: ``[B, H, Q, K]`` teacher log-probabilities (``"kl"``, ``"mse_probs"``) or pre-softmax
            scores (``"mse_scores"``), heads already grouped to the student's count.
        loss: one of ``TRANSFER_LOSSES``.
        key_mask: ``[B, K]`` valid keys, or ``None``.
        query_mask: ``[B, Q]`` valid queries; ``None`` means ``key_mask`` for self-attention.
    """

    teacher: torch.Tensor
    loss: str
    key_mask: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None

    def __post_init__(self):
        if self.loss not in TRANSFER_LOSSES:
            raise ValueError(f"loss must be one of {TRANSFER_LOSSES}, got {self.loss!r}")


def _score_diff(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """``S - S_t``, zero where the mask blocked the student's score (causal future keys), as TinyBERT zeroes them."""
    diff = student_scores - teacher_scores
    return diff.masked_fill_(student_scores <= _BLOCKED, 0.0)


def _prob_diff(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    return student_log_probs.exp() - teacher_log_probs.exp()


_BLOCKED = torch.finfo(torch.float32).min / 2


class SoftmaxWithTransferLoss(torch.autograd.Function):
    """``(softmax(scores), loss(scores, teacher))`` with one fused backward; see the module docstring."""

    @staticmethod
    def forward(ctx, scores, teacher, loss, k, q, count):
        log_s = torch.log_softmax(scores, dim=-1)
        flat_s, fk, fq = _flat_rows(scores, k, q)
        flat_log_s, flat_t = log_s.view(flat_s.shape), teacher.reshape(flat_s.shape)
        if loss == "kl":
            total = _kl_sum(flat_log_s, flat_t, fk, fq)
        elif loss == "mse_scores":
            total = _squared_sum(_score_diff, flat_s, flat_t, fk, fq)
        else:
            total = _squared_sum(_prob_diff, flat_log_s, flat_t, fk, fq)
        probs = log_s.exp_()
        ctx.save_for_backward(probs, scores if loss == "mse_scores" else None, count)
        # The teacher may be an inference-mode tensor, which save_for_backward refuses; it has no autograd
        # history, so holding it on ctx creates no reference cycle.
        ctx.teacher, ctx.loss, ctx.masks = teacher, loss, (k, q)
        return probs, total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs, grad_loss):
        probs, scores, count = ctx.saved_tensors
        teacher, loss, (k, q) = ctx.teacher, ctx.loss, ctx.masks
        flat_p, fk, fq = _flat_rows(probs, k, q)
        flat_t = teacher.reshape(flat_p.shape)
        w = grad_loss / count
        if loss == "mse_probs":  # gradient w.r.t. the probabilities, before the softmax backward
            grad = grad_probs.clone()
            flat_g = grad.view(flat_p.shape)
            for sl in _chunks(flat_p):
                diff = _masked_(flat_p[sl] - flat_t[sl].exp(), fk, fq, sl)
                flat_g[sl].add_(diff.mul_(2.0 * w))
            grad.mul_(probs)
        else:
            grad = grad_probs * probs
            flat_g = grad.view(flat_p.shape)
        # softmax backward, in place: g <- p * (g - sum_k p g)
        grad.addcmul_(probs, grad.sum(-1, keepdim=True), value=-1.0)
        if loss == "kl":
            for sl in _chunks(flat_p):
                p_t = _masked_(flat_t[sl].exp(), fk, fq, sl).nan_to_num_(nan=0.0)
                flat_g[sl].addcmul_(flat_p[sl], p_t.sum(-1, keepdim=True) * w).sub_(p_t.mul_(w))
        elif loss == "mse_scores":
            flat_s = scores.view(flat_p.shape)
            for sl in _chunks(flat_p):
                diff = _masked_(_score_diff(flat_s[sl], flat_t[sl]), fk, fq, sl)
                flat_g[sl].add_(diff.mul_(2.0 * w))
        return grad, None, None, None, None, None


def softmax_with_transfer_loss(scores: torch.Tensor, target: TransferTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities of masked ``scores`` ``[B, H, Q, K]`` (float32) and the transfer loss to ``target``.

    The loss is the mean over valid (head, query) rows for ``"kl"`` and over valid entries for the MSE
    kinds, exactly as the standalone loss functions define it.
    """
    teacher = target.teacher.detach().float()
    if teacher.shape != scores.shape:
        raise ValueError(
            f"Teacher attention {tuple(teacher.shape)} and student attention {tuple(scores.shape)} differ in shape; "
            "group teacher heads first (group_teacher_heads) and feed both models the same batch."
        )
    k, q = _attention_masks(scores.shape, target.key_mask, target.query_mask)
    count = _valid_count(scores.shape, k, q, per_entry=target.loss != "kl", device=scores.device)
    return SoftmaxWithTransferLoss.apply(scores, teacher, target.loss, k, q, count)
