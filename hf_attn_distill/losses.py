"""Distillation losses as pure functions.

Shapes use ``B`` batch, ``H`` heads, ``Q`` query positions, ``K`` key positions, ``C`` classes.
Masks are boolean or 0/1 tensors where ``True``/1 marks a *valid* position.
Every function returns the mean over valid items, so the caller can rescale it by item counts
(see :class:`~hf_attn_distill.DistillTrainer` for exact gradient-accumulation scaling).
All math runs in float32, whatever the input dtype, so fp16/bf16 inputs give no inf/NaN.

The attention losses here are the plain reference formulas: readable, autograd-differentiated, and
the oracles the fused kernel the trainer uses (:mod:`~hf_attn_distill.attention.fused`) is tested
against. Use them in custom training loops on recorded attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hf_attn_distill.attention.masks import attention_loss_count, attention_valid_mask

__all__ = [
    "attention_kl_loss",
    "attention_mse_loss",
    "group_teacher_heads",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "lift_neg_inf_",
    "logit_kd_loss",
    "relation_kl_loss",
    "self_relation_log_probs",
]


def lift_neg_inf_(values: torch.Tensor) -> torch.Tensor:
    """``values`` with -inf raised, in place, to the lowest finite value of their dtype, so that a ``0 * log 0``
    term of a KL (a key the teacher gives no mass) is 0 while a NaN or +inf stays in the loss (``nan_to_num``
    would hide a student's NaN). Every finite value is unchanged."""
    return values.clamp_min_(torch.finfo(values.dtype).min)


def _valid_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (mask broadcasts to values)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton knowledge-distillation loss on logits (scores, not probabilities).

    ``KL(softmax(t / T) || softmax(s / T)) * T**2``, summed over classes and averaged over items.
    With a single output unit (regression heads) it is the mean squared error of the outputs instead.

    Args:
        student_logits: ``[..., C]`` student scores (pre-softmax).
        teacher_logits: ``[..., C]`` teacher scores, same shape.
        temperature: softening temperature ``T > 0``; the ``T**2`` factor keeps gradient scale
            independent of ``T``.
        mask: ``[...]`` (the logits shape without ``C``); items where it is false are excluded
            (padding tokens, ``-100`` labels). ``None`` averages over all items.
        class_mask: ``[..., C]``; classes where it is false are removed from *both* softmaxes (e.g. the
            question and padding positions of extractive-QA start/end logits). Items with no valid class
            are excluded.

    Returns:
        Scalar float32 tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape: student and teacher need the same label set (num_labels) and inputs."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = student_logits.float()
    t = teacher_logits.detach().float()
    if s.shape[-1] == 1:  # regression head: match the outputs directly
        return _valid_mean((s - t).squeeze(-1).pow(2), mask)
    if class_mask is not None:
        class_mask = class_mask.bool().expand_as(s)
        lowest = torch.finfo(torch.float32).min
        s, t = s.masked_fill(~class_mask, lowest), t.masked_fill(~class_mask, lowest)
        has_class = class_mask.any(-1)
        mask = has_class if mask is None else mask.bool() & has_class
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return _valid_mean(kl, mask) * temperature**2


def group_teacher_heads(teacher: torch.Tensor, num_student_heads: int, kind: str) -> torch.Tensor:
    """Average teacher heads in consecutive groups so they line up with ``num_student_heads``.

    Teacher head ``h`` goes to group ``h // (H_t // H_s)``. Averaging is done on what the attention
    loss compares: for ``kind="log_probs"`` the group's *probabilities* are averaged (the result is
    again a log-distribution, ``logsumexp - log g``); for ``kind="scores"`` or ``"probs"`` the values
    are averaged directly.

    Args:
        teacher: ``[B, H_t, Q, K]``.
        num_student_heads: ``H_s``; ``H_t`` must be a multiple of it.
        kind: ``"log_probs"``, ``"probs"`` or ``"scores"``.

    Returns:
        ``[B, H_s, Q, K]``.
    """
    num_teacher_heads = teacher.shape[1]
    if num_teacher_heads == num_student_heads:
        return teacher
    if num_teacher_heads % num_student_heads != 0:
        raise ValueError(
            f"Teacher has {num_teacher_heads} heads and student {num_student_heads}: teacher heads must be a "
            "multiple of student heads to be averaged in groups."
        )
    g = num_teacher_heads // num_student_heads
    grouped = teacher.unflatten(1, (num_student_heads, g))
    if kind == "log_probs":
        return torch.logsumexp(grouped, dim=2) - math.log(g)
    if kind in ("probs", "scores"):
        return grouped.mean(dim=2)
    raise ValueError(f"kind must be 'log_probs', 'probs' or 'scores', got {kind!r}")


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"Attention tensors must both be [batch, heads, query, key] of the same shape; got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}. Group teacher heads first "
            "(group_teacher_heads) if the head counts differ."
        )


def attention_kl_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """MiniLM attention-transfer loss: row-wise ``KL(teacher || student)`` over keys, per head.

    ``sum_k p_t (log p_t - log p_s)`` over valid keys, averaged over heads and valid query rows
    (:func:`~hf_attn_distill.attention.masks.attention_loss_count`). Takes **log-probabilities**
    (``log_softmax`` of the masked attention scores, as :class:`~hf_attn_distill.AttentionRecorder`
    records them), never probabilities, so there is no ``log(0)``. Keys the teacher gives zero
    probability contribute ``0``; fully padded rows contribute nothing and give no NaN.

    Args:
        student_log_probs: ``[B, H, Q, K]``.
        teacher_log_probs: ``[B, H, Q, K]`` (no gradient flows into it).
        key_mask: ``[B, K]`` valid keys (the attention mask). ``None``: all keys valid.
        query_mask: ``[B, Q]`` valid queries; defaults to ``key_mask`` when ``Q == K``.
        causal: exclude future keys (decoder self-attention).

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student_log_probs, teacher_log_probs)
    log_s, log_t = student_log_probs.float(), teacher_log_probs.detach().float()
    batch, heads, num_q, num_k = log_s.shape
    valid = attention_valid_mask(batch, num_q, num_k, key_mask, query_mask, causal, log_s.device)
    p_t = log_t.exp()
    if valid is not None:
        p_t = p_t * valid
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0)
    count = attention_loss_count("kl", heads, batch, num_q, num_k, key_mask, query_mask, causal, log_s.device)
    return kl.sum() / count.clamp_min(1.0)


def attention_mse_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """TinyBERT attention-transfer loss: mean squared error per head over valid (query, key) entries.

    Works on whatever both tensors hold: pre-softmax **scores** (``"mse_scores"``, TinyBERT) or
    **probabilities** (``"mse_probs"``). Entries with a padded key, a padded query or (``causal``) a future
    key are excluded from the sum *and* the count: the result is the mean over heads and valid entries.

    Args:
        student: ``[B, H, Q, K]``.
        teacher: ``[B, H, Q, K]`` (no gradient flows into it).
        key_mask: ``[B, K]`` valid keys. ``None``: all keys valid.
        query_mask: ``[B, Q]`` valid queries; defaults to ``key_mask`` when ``Q == K``.
        causal: exclude future keys (decoder self-attention).

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student, teacher)
    s, t = student.float(), teacher.detach().float()
    batch, heads, num_q, num_k = s.shape
    valid = attention_valid_mask(batch, num_q, num_k, key_mask, query_mask, causal, s.device)
    if valid is not None:  # before subtracting: masked student scores are -3.4e38
        s, t = torch.where(valid, s, 0.0), torch.where(valid, t, 0.0)
    sq = (s - t).pow(2)
    count = attention_loss_count("mse_scores", heads, batch, num_q, num_k, key_mask, query_mask, causal, s.device)
    return sq.sum() / count.clamp_min(1.0)


def _check_hidden(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"Hidden states must have the same shape [B, T, D] after projection: student {tuple(student.shape)} vs "
            f"teacher {tuple(teacher.shape)}."
        )


def hidden_mse_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT hidden-state loss: mean squared error over valid tokens and hidden units.

    Args:
        student: ``[B, T, D]`` student hidden states, already projected to the teacher's width ``D``.
        teacher: ``[B, T, D]`` teacher hidden states (no gradient needed).
        mask: ``[B, T]``, true at valid (non-padding) tokens; ``None`` = all valid.

    Returns ``sum_{valid t, d} (s - t)^2 / (valid tokens * D)``.
    """
    _check_hidden(student, teacher)
    squared = (student.float() - teacher.float()).pow(2).mean(-1)  # [B, T]
    return _valid_mean(squared, mask)


def hidden_cosine_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistilBERT hidden-state loss: mean over valid tokens of ``1 - cos(student_t, teacher_t)``.

    Shapes as :func:`hidden_mse_loss`; the cosine ignores scale, so no projection is needed when widths match.
    """
    _check_hidden(student, teacher)
    cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)  # [B, T]
    return _valid_mean(1.0 - cosine, mask)


def self_relation_log_probs(states: torch.Tensor, num_heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM(v2) self-attention relation: ``log_softmax(x_r x_r^T / sqrt(d_r))`` per relation head.

    Args:
        states: ``[B, T, D]`` queries, keys or values of one layer with all attention heads concatenated.
        num_heads: relation heads ``R``; ``D`` is split into ``R`` chunks of ``d_r = D / R``.
        key_mask: ``[B, T]`` valid tokens; padded keys get zero probability.

    Returns ``[B, R, T, T]`` float32 log-probabilities.
    """
    batch, length, width = states.shape
    if width % num_heads:
        raise ValueError(f"A width of {width} cannot be split into {num_heads} relation heads.")
    x = states.float().view(batch, length, num_heads, width // num_heads).transpose(1, 2)  # [B, R, T, d_r]
    scores = torch.matmul(x, x.transpose(-1, -2)) * (width // num_heads) ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(torch.float32).min)
    return torch.log_softmax(scores, dim=-1)


def relation_kl_loss(
    student: torch.Tensor, teacher: torch.Tensor, num_heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MiniLMv2 relation-transfer loss: ``KL(teacher relation || student relation)`` per relation head and row.

    ``student`` ``[B, T, D_s]`` and ``teacher`` ``[B, T, D_t]`` are the same kind of states (queries, keys or
    values, heads concatenated) of one layer each; widths and head counts may differ, only ``D_s`` and ``D_t``
    must both divide into ``num_heads`` relation heads. Mean over relation heads and valid query rows, as
    :func:`attention_kl_loss` (padded keys and rows excluded).
    """
    log_s = self_relation_log_probs(student, num_heads, mask)
    with torch.no_grad():
        log_t = self_relation_log_probs(teacher.detach(), num_heads, mask)
    return attention_kl_loss(log_s, log_t, key_mask=mask)
