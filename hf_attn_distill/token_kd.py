"""Token-level logit KD over large vocabularies without full-size float32 copies.

For a translation model the decoder logits are ``[B, T, V]`` with ``V`` in the tens of thousands. The
reference formula (:func:`~hf_attn_distill.logit_kd_loss`) makes float32 copies of both logits and keeps
several ``[B, T, V]`` temporaries for backward. :func:`token_kd_loss` computes the same value a few
hundred tokens at a time, keeps nothing for backward but references to the two logit tensors it was
given, and writes the gradient ``T * (softmax(s/T) - softmax(t/T))`` chunk by chunk into the one
``[B, T, V]`` gradient it must return (in the logits' dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["TOKEN_CHUNK_ELEMENTS", "token_kd_loss"]

# Float32 elements per chunk (rows of V logits): 4M elements = 16 MB per temporary.
TOKEN_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, TOKEN_CHUNK_ELEMENTS // max(1, vocab))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


class _TokenKD(torch.autograd.Function):
    """Sum over valid rows of ``T^2 * KL(softmax(t/T) || softmax(s/T))``, chunk by chunk."""

    @staticmethod
    def forward(ctx, student, teacher, valid, temperature):
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for sl in _row_chunks(student.shape[0], student.shape[1]):
            rows = valid[sl]
            if not bool(rows.any()):
                continue
            log_s = F.log_softmax(student[sl][rows].float() / temperature, dim=-1)
            log_t = F.log_softmax(teacher[sl][rows].float() / temperature, dim=-1)
            total += (log_t.exp() * (log_t - log_s)).sum()
        ctx.save_for_backward(student, valid)
        # The teacher may be an inference-mode tensor (save_for_backward refuses those); it has no history.
        ctx.teacher, ctx.temperature = teacher, temperature
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        student, valid = ctx.saved_tensors
        teacher, temperature = ctx.teacher, ctx.temperature
        grad = torch.zeros_like(student)
        scale = grad_output * temperature  # d(T^2 KL)/ds = T (p_s - p_t)
        for sl in _row_chunks(student.shape[0], student.shape[1]):
            rows = valid[sl]
            if not bool(rows.any()):
                continue
            p_s = F.softmax(student[sl][rows].float() / temperature, dim=-1)
            p_t = F.softmax(teacher[sl][rows].float() / temperature, dim=-1)
            grad[sl][rows] = ((p_s - p_t) * scale).to(grad.dtype)
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
