"""Token-level logit KD over large vocabularies without full-size float32 copies.

For a translation model the decoder logits are ``[B, T, V]`` with ``V`` in the tens of thousands. The
reference formula (:func:`~hf_attn_distill.logit_kd_loss`) makes float32 copies of both logits and keeps
several ``[B, T, V]`` temporaries for backward. :func:`token_kd_loss` computes the same value a few
hundred tokens at a time, keeps for backward only references to the two logit tensors it was given and
one log-sum-exp per token of each, and writes the gradient ``T * (softmax(s/T) - softmax(t/T))`` chunk by chunk into the one
``[B, T, V]`` gradient it must return (in the logits' dtype).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = ["TOKEN_CHUNK_ELEMENTS", "token_kd_loss"]

# Float32 elements per chunk (rows of V logits): 4M elements = 16 MB per temporary.
TOKEN_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, TOKEN_CHUNK_ELEMENTS // max(1, vocab))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _scaled(x: torch.Tensor, inv_temperature: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x / T`` in float32: into ``out``, else a new tensor (``x`` itself when nothing changes: not for writing)."""
    if out is not None:
        return torch.mul(x, inv_temperature, out=out)
    return x if inv_temperature == 1.0 and x.dtype == torch.float32 else x.float() * inv_temperature


class _TokenKD(torch.autograd.Function):
    """Sum over valid rows of ``T^2 * KL(softmax(t/T) || softmax(s/T))``, chunk by chunk.

    Forward keeps one log-sum-exp per row of each model; backward rebuilds both softmaxes from them and writes
    ``T (p_s - p_t)`` straight into the gradient. Chunks are computed whole and their invalid rows dropped (zero
    gradient), so no row is gathered or scattered."""

    @staticmethod
    def forward(ctx, student, teacher, valid, temperature):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        inv = 1.0 / temperature
        rows_count = student.shape[0]
        lse_s = torch.zeros(rows_count, 1, dtype=torch.float32, device=student.device)
        lse_t = torch.zeros_like(lse_s)
        chunks = []
        for sl in _row_chunks(rows_count, student.shape[1]):
            rows = valid[sl]
            every = bool(rows.all())
            if not every and not bool(rows.any()):
                chunks.append((sl, False))
                continue
            scaled_s = _scaled(student[sl], inv)
            log_s = torch.log_softmax(scaled_s, dim=-1)
            lse_s[sl] = scaled_s[:, :1] - log_s[:, :1]
            del scaled_s
            scaled_t = _scaled(teacher[sl], inv)
            log_t = torch.log_softmax(scaled_t, dim=-1)
            lse_t[sl] = scaled_t[:, :1] - log_t[:, :1]
            del scaled_t
            kl = log_t.exp().mul_(log_t.sub_(log_s)).sum(-1)  # per row
            total += kl.sum() if every else torch.where(rows, kl, 0.0).sum()
            chunks.append((sl, True if every else rows))
        ctx.save_for_backward(student, lse_s, lse_t)
        # The teacher may be an inference-mode tensor (save_for_backward refuses those); it has no history.
        ctx.teacher, ctx.temperature, ctx.chunks = teacher, temperature, chunks
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        student, lse_s, lse_t = ctx.saved_tensors
        teacher, temperature = ctx.teacher, ctx.temperature
        inv = 1.0 / temperature
        grad = torch.empty_like(student)
        scale = grad_output * temperature  # d(T^2 KL)/ds = T (p_s - p_t)
        in_place = grad.dtype == torch.float32
        for sl, rows in ctx.chunks:  # rows: True (all valid), False (none) or the chunk's valid rows
            if rows is False:
                grad[sl].zero_()
                continue
            p_s = _scaled(student[sl], inv, out=grad[sl] if in_place else None)
            if not in_place and p_s is student[sl]:
                p_s = p_s.clone()
            p_s.sub_(lse_s[sl]).exp_()
            p_t = _scaled(teacher[sl], inv).sub_(lse_t[sl]).exp_()
            p_s.sub_(p_t).mul_(scale)
            if rows is not True:
                p_s.masked_fill_(~rows[:, None], 0.0)
            if not in_place:
                grad[sl] = p_s.to(grad.dtype)
        return grad, None, None, None


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T)) * T**2`` per token, mean over valid tokens (float32 scalar).

    Same value and gradient as :func:`~hf_attn_distill.logit_kd_loss` on ``[..., V]`` scores, computed in
    chunks of tokens so no float32 copy of the full logits exists.

    Args:
        student_logits: ``[..., V]`` student scores, any float dtype.
        teacher_logits: ``[..., V]`` teacher scores (no gradient flows into it).
        temperature: ``T > 0``.
        mask: ``[...]`` valid tokens (e.g. ``labels != -100``); ``None``: all.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: student and teacher need the same vocabulary and the same decoder inputs."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    valid = (
        torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
        if mask is None
        else mask.reshape(-1).bool()
    )
    total = _TokenKD.apply(student, teacher, valid, float(temperature))
    return total / valid.sum().clamp_min(1).float()
