"""Attention softmax and attention-transfer loss in one autograd node.

Computing the loss after the forward pass means the student's ``log_softmax`` output, its
probabilities and every temporary of the loss formula are separate ``[B, H, Q, K]`` tensors, and
backward runs the loss backward, an exp backward, a gradient sum and the log-softmax backward over
them. Because the teacher runs first, its attention of the layer is already known when the
student's layer runs, so the loss can be taken right there: :class:`SoftmaxWithTransferLoss` turns
masked scores into probabilities *and* the loss, keeps only the probabilities for backward (the
softmax needs them anyway), and adds the loss gradient inside the softmax backward:

- ``"kl"`` (MiniLM): ``d/dS = w * (p_s * sum_k p~_t - p~_t)``;
- ``"mse_probs"``: ``2w (p_s - p_t)`` added to the probability gradient before the softmax backward;
- ``"mse_scores"`` (TinyBERT): ``d/dS = 2w (S - S_t)``,

on valid entries only (:mod:`~hf_attn_distill.attention.masks`), where ``p~_t`` is the teacher
distribution with invalid entries zeroed and ``w`` the loss's incoming gradient over its count.
The loss passes run over cache-sized blocks of (batch, heads). Values and gradients equal the
reference formulas :func:`~hf_attn_distill.attention_kl_loss` / :func:`~hf_attn_distill.attention_mse_loss`
(tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from hf_attn_distill.attention.masks import ATTENTION_LOSSES, attention_loss_count, attention_valid_mask
from hf_attn_distill.losses import lift_neg_inf_

__all__ = ["SoftmaxWithTransferLoss", "TransferTarget", "softmax_with_transfer_loss"]

# Elements per block of the loss passes: 4 MB of float32, small enough to stay in cache and in the
# allocator's free lists instead of mapping fresh pages for every [B, H, Q, K] temporary.
BLOCK_ELEMENTS = 1 << 20


@dataclass
class TransferTarget:
    """What one student attention layer is trained towards.

    Attributes:
        teacher: ``[B, H, Q, K]`` teacher log-probabilities (``"kl"``, ``"mse_probs"``) or pre-softmax
            scores (``"mse_scores"``), heads already grouped to the student's count; or the
            :class:`~hf_attn_distill.attention.streamed.AttentionRows` that recompute them block by block (heads
            grouped there).
        loss: one of ``ATTENTION_LOSSES``.
        key_mask: ``[B, K]`` valid keys, or ``None``.
        query_mask: ``[B, Q]`` valid queries; ``None`` means ``key_mask`` for self-attention.
        causal: the attention is causal (future keys are not compared).
        keep_elements: streamed layers (``teacher`` is ``AttentionRows``) whose ``[B, H, Q, K]`` attention has at
            most this many elements keep it for backward instead of recomputing it; ``None``: one row block's worth
            (:func:`~hf_attn_distill.attention.streamed.keeps_attention`).
    """

    teacher: torch.Tensor
    loss: str
    key_mask: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None
    causal: bool = False
    keep_elements: int | None = None

    def __post_init__(self):
        if self.loss not in ATTENTION_LOSSES:
            raise ValueError(f"loss must be one of {ATTENTION_LOSSES}, got {self.loss!r}")


def attention_blocks(batch: int, heads: int, entries_per_head: int) -> list[tuple[slice, slice]]:
    """``(batch slice, head slice)`` blocks of a ``[B, H, Q, K]`` tensor, about ``BLOCK_ELEMENTS`` each."""
    step = max(1, BLOCK_ELEMENTS // max(1, entries_per_head))
    if step >= heads:
        rows = step // heads
        return [(slice(b, b + rows), slice(None)) for b in range(0, batch, rows)]
    return [(slice(b, b + 1), slice(h, h + step)) for b in range(batch) for h in range(0, heads, step)]


def _blocks_of(x: torch.Tensor) -> list[tuple[slice, slice]]:
    return attention_blocks(x.shape[0], x.shape[1], x.shape[-2] * x.shape[-1])


def _invalid_to_zero_(x: torch.Tensor, valid: torch.Tensor | None, bs: slice) -> torch.Tensor:
    return x if valid is None else x.masked_fill_(~valid[bs], 0.0)


class SoftmaxWithTransferLoss(torch.autograd.Function):
    """``(softmax(scores), loss(scores, teacher))`` with one fused backward; see the module docstring.

    Inputs: masked scores ``[B, H, Q, K]`` float32, the teacher tensor, the loss name, the ``[B, 1, Q, K]``
    valid mask (or ``None``) and the count the loss is divided by.
    """

    @staticmethod
    def forward(ctx, scores, teacher, loss, valid, count):
        log_s = torch.log_softmax(scores, dim=-1)
        total = torch.zeros((), dtype=torch.float32, device=scores.device)
        for bs, hs in _blocks_of(scores):
            t = teacher[bs, hs]
            if loss == "kl":
                p_t = _invalid_to_zero_(t.exp(), valid, bs)
                # 0 * log(0) = 0 where the teacher gives a key no mass (-inf lifted to the lowest float: exact for
                # every finite value), while a NaN or inf of the student stays in the loss, never hidden
                total += p_t.mul_(lift_neg_inf_(t - log_s[bs, hs])).sum()
            else:
                diff = scores[bs, hs] - t if loss == "mse_scores" else log_s[bs, hs].exp() - t.exp()
                diff = _invalid_to_zero_(diff, valid, bs).reshape(-1)
                total += torch.dot(diff, diff)
        probs = log_s.exp_()
        ctx.save_for_backward(probs, scores if loss == "mse_scores" else None, count)
        # The teacher may be an inference-mode tensor, which save_for_backward refuses; it has no autograd
        # history, so holding it on ctx creates no reference cycle.
        ctx.teacher, ctx.loss, ctx.valid = teacher, loss, valid
        return probs, total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs, grad_loss):
        probs, scores, count = ctx.saved_tensors
        teacher, loss, valid = ctx.teacher, ctx.loss, ctx.valid
        w = grad_loss / count
        blocks = _blocks_of(probs)
        if loss == "mse_probs":  # gradient w.r.t. the probabilities, before the softmax backward
            grad = grad_probs.clone()
            for bs, hs in blocks:
                diff = _invalid_to_zero_(probs[bs, hs] - teacher[bs, hs].exp(), valid, bs)
                grad[bs, hs].add_(diff.mul_(2.0 * w))
            grad.mul_(probs)
        else:
            grad = grad_probs * probs
        # softmax backward, in place: g <- p * (g - sum_k p g)
        grad.addcmul_(probs, grad.sum(-1, keepdim=True), value=-1.0)
        if loss == "kl":
            for bs, hs in blocks:
                p_t = _invalid_to_zero_(teacher[bs, hs].exp(), valid, bs)
                grad[bs, hs].addcmul_(probs[bs, hs], p_t.sum(-1, keepdim=True) * w).sub_(p_t.mul_(w))
        elif loss == "mse_scores":
            for bs, hs in blocks:
                diff = _invalid_to_zero_(scores[bs, hs] - teacher[bs, hs], valid, bs)
                grad[bs, hs].add_(diff.mul_(2.0 * w))
        return grad, None, None, None, None


def softmax_with_transfer_loss(scores: torch.Tensor, target: TransferTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities of masked ``scores`` ``[B, H, Q, K]`` (float32) and the transfer loss to ``target``.

    The loss is the mean over valid (head, query) rows for ``"kl"`` and over valid entries for the MSE
    kinds, exactly as the reference loss functions define it.
    """
    teacher = target.teacher.detach().float()
    if teacher.shape != scores.shape:
        raise ValueError(
            f"Teacher attention {tuple(teacher.shape)} and student attention {tuple(scores.shape)} differ in shape; "
            "group teacher heads first (group_teacher_heads) and feed both models the same batch."
        )
    batch, heads, num_q, num_k = scores.shape
    args = (batch, num_q, num_k, target.key_mask, target.query_mask, target.causal, scores.device)
    valid = attention_valid_mask(*args)
    count = attention_loss_count(target.loss, heads, *args).clamp_min(1.0)
    return SoftmaxWithTransferLoss.apply(scores, teacher, target.loss, valid, count)
