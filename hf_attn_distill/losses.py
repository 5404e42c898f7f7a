"""Distillation losses as pure functions.

Shapes use ``B`` batch, ``H`` heads, ``Q`` query positions, ``K`` key positions, ``C`` classes.
Masks are boolean or 0/1 tensors where ``True``/1 marks a *valid* position.
Every function returns the mean over valid items, so the caller can rescale it by item counts
(see :class:`~hf_attn_distill.DistillTrainer` for exact gradient-accumulation scaling).
All math runs in float32, whatever the input dtype, so fp16/bf16 inputs give no inf/NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "logit_kd_loss",
    "attention_kl_loss",
    "attention_mse_loss",
    "group_teacher_heads",
]


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


def _attention_masks(
    shape: torch.Size, key_mask: torch.Tensor | None, query_mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return ``(key_mask [B,1,1,K], query_mask [B,1,Q,1])`` as booleans, or ``None`` for no masking."""
    batch, _, num_q, num_k = shape
    if query_mask is None and key_mask is not None and num_q == num_k:
        query_mask = key_mask  # self-attention: padded tokens are padded queries too
    k = None if key_mask is None else key_mask.bool().reshape(batch, 1, 1, num_k)
    q = None if query_mask is None else query_mask.bool().reshape(batch, 1, num_q, 1)
    return k, q


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"Attention tensors must both be [batch, heads, query, key] of the same shape; got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}. Group teacher heads first "
            "(group_teacher_heads) if the head counts differ."
        )


def _valid_count(
    shape: torch.Size, k: torch.Tensor | None, q: torch.Tensor | None, per_entry: bool, device
) -> torch.Tensor:
    """Denominator of the attention losses, at least 1: valid (head, query) rows, or with ``per_entry``
    valid (head, query, key) entries. ``k``/``q`` are the broadcastable masks of ``_attention_masks``."""
    batch, heads, num_q, num_k = shape
    rows = q.float() if q is not None else torch.ones(batch, 1, num_q, 1, device=device)
    if per_entry:
        keys = k.float().sum(-1, keepdim=True) if k is not None else torch.full((batch, 1, 1, 1), float(num_k), device=device)
        rows = rows * keys
    return (rows.sum() * heads).clamp_min(1.0)


# Elements per chunk of the fused losses: 4 MB of float32, small enough to stay in cache and in the
# allocator's free lists instead of mapping fresh pages for every [B, H, Q, K] temporary.
_CHUNK_ELEMENTS = 1 << 20


def _flat_rows(x: torch.Tensor, k: torch.Tensor | None, q: torch.Tensor | None):
    """View ``x [B, H, Q, K]`` as ``[B*H, Q, K]`` with matching ``[B*H, 1, K]`` / ``[B*H, Q, 1]`` masks."""
    batch, heads, num_q, num_k = x.shape
    flat = x.reshape(batch * heads, num_q, num_k)
    k = None if k is None else k.expand(batch, heads, 1, num_k).reshape(batch * heads, 1, num_k)
    q = None if q is None else q.expand(batch, heads, num_q, 1).reshape(batch * heads, num_q, 1)
    return flat, k, q


def _chunks(flat: torch.Tensor):
    """Slices of the first dimension of ``flat`` holding about ``_CHUNK_ELEMENTS`` elements each."""
    step = max(1, _CHUNK_ELEMENTS // max(1, flat[0].numel()))
    return [slice(i, i + step) for i in range(0, flat.shape[0], step)]


def _masked_(x: torch.Tensor, k: torch.Tensor | None, q: torch.Tensor | None, sl: slice) -> torch.Tensor:
    if k is not None:
        x.masked_fill_(~k[sl], 0.0)
    if q is not None:
        x.masked_fill_(~q[sl], 0.0)
    return x


def _kl_sum(flat_log_s: torch.Tensor, flat_log_t: torch.Tensor, fk, fq) -> torch.Tensor:
    """``sum p~_t (log p_t - log p_s)`` over valid entries of ``[N, Q, K]`` log-probabilities, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=flat_log_s.device)
    for sl in _chunks(flat_log_t):
        p_t = _masked_(flat_log_t[sl].exp(), fk, fq, sl)
        ratio = torch.sub(flat_log_t[sl], flat_log_s[sl]).mul_(p_t)
        total += ratio.nan_to_num_(nan=0.0).sum()  # 0 * log(0) = 0 where the teacher gives a key no mass
    return total


def _squared_sum(diff_of, flat_a: torch.Tensor, flat_b: torch.Tensor, fk, fq) -> torch.Tensor:
    """``sum diff_of(a, b)**2`` over valid entries of ``[N, Q, K]`` tensors, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float32, device=flat_a.device)
    for sl in _chunks(flat_a):
        diff = _masked_(diff_of(flat_a[sl], flat_b[sl]), fk, fq, sl).reshape(-1)
        total += torch.dot(diff, diff)
    return total


def _masked_chunks(like: torch.Tensor, k, q, scale: torch.Tensor, fill) -> torch.Tensor:
    """A new tensor shaped like ``like`` ``[B, H, Q, K]``, written chunk by chunk: ``fill(slice, out)``
    writes the values of the ``[N, Q, K]`` rows in ``slice`` into ``out``; invalid entries become 0 and
    everything is multiplied by ``scale``."""
    flat, fk, fq = _flat_rows(like, k, q)
    out = torch.empty_like(flat)
    for sl in _chunks(flat):
        _masked_(fill(sl, out[sl]), fk, fq, sl).mul_(scale)
    return out.view_as(like)


class _AttentionKL(torch.autograd.Function):
    """Row-wise KL(teacher || student) summed over valid entries and divided by ``count``.

    The plain formula's autograd graph allocates about ten ``[B, H, Q, K]`` temporaries; at sequence
    512 those memory passes cost more than the attention itself. Here the forward runs in small
    chunks that reuse cache-sized buffers, and the backward writes ``d loss / d log_s = -p_t / count``
    (zero on invalid entries) straight into the one gradient tensor it must return. Nothing but the
    recorded teacher log-probabilities is kept for backward.
    """

    @staticmethod
    def forward(ctx, log_s, log_t, k, q, count):
        flat_s, fk, fq = _flat_rows(log_s, k, q)
        total = _kl_sum(flat_s, log_t.reshape(flat_s.shape), fk, fq)
        ctx.save_for_backward(count)
        # The teacher tensor may come from inference mode, which save_for_backward refuses; it has no
        # autograd history, so holding it on ctx creates no reference cycle.
        ctx.teacher, ctx.masks = log_t, (k, q)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (count,), log_t, (k, q) = ctx.saved_tensors, ctx.teacher, ctx.masks
        flat_t = _flat_rows(log_t, None, None)[0]
        grad = _masked_chunks(log_t, k, q, -grad_output / count, lambda sl, out: torch.exp(flat_t[sl], out=out))
        return grad, None, None, None, None


class _MaskedMSE(torch.autograd.Function):
    """Sum of squared differences over valid entries, divided by ``count``, in cache-sized chunks."""

    @staticmethod
    def forward(ctx, student, teacher, k, q, count):
        flat_s, fk, fq = _flat_rows(student, k, q)
        total = _squared_sum(torch.sub, flat_s, teacher.reshape(flat_s.shape), fk, fq)
        ctx.save_for_backward(student, count)
        ctx.teacher, ctx.masks = teacher, (k, q)
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (student, count), teacher, (k, q) = ctx.saved_tensors, ctx.teacher, ctx.masks
        flat_s = _flat_rows(student, None, None)[0]
        flat_t = teacher.reshape(flat_s.shape)
        grad = _masked_chunks(
            student, k, q, 2.0 * grad_output / count, lambda sl, out: torch.sub(flat_s[sl], flat_t[sl], out=out)
        )
        return grad, None, None, None, None


def attention_kl_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLM attention-transfer loss: row-wise ``KL(teacher || student)`` over keys, per head.

    Takes **log-probabilities** (``log_softmax`` of the attention scores, as recorded by
    :class:`~hf_attn_distill.AttentionRecorder`), never probabilities, so there is no ``log(0)``.
    Padded keys are excluded from each row's sum, and padded query rows from the average: the
    result is the mean over heads and valid query positions. Fully padded rows contribute nothing
    and produce no NaN. Keys the teacher gives exactly zero probability (``log p = -inf``)
    contribute ``0``.

    Args:
        student_log_probs: ``[B, H, Q, K]``.
        teacher_log_probs: ``[B, H, Q, K]`` (no gradient flows into it).
        key_mask: ``[B, K]`` valid keys (the attention mask). ``None``: all keys valid.
        query_mask: ``[B, Q]`` valid queries; defaults to ``key_mask`` when ``Q == K``.

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student_log_probs, teacher_log_probs)
    log_s = student_log_probs.float()
    log_t = teacher_log_probs.detach().float()
    k, q = _attention_masks(log_s.shape, key_mask, query_mask)
    count = _valid_count(log_s.shape, k, q, per_entry=False, device=log_s.device)
    return _AttentionKL.apply(log_s, log_t, k, q, count)


def attention_mse_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TinyBERT attention-transfer loss: mean squared error per head over valid (query, key) pairs.

    Works on whatever both tensors hold: pre-softmax **scores** (TinyBERT) or **probabilities**.
    Entries with a padded key or a padded query are excluded; the result is the mean over heads,
    valid query rows and valid keys.

    Args:
        student: ``[B, H, Q, K]``.
        teacher: ``[B, H, Q, K]`` (no gradient flows into it).
        key_mask: ``[B, K]`` valid keys. ``None``: all keys valid.
        query_mask: ``[B, Q]`` valid queries; defaults to ``key_mask`` when ``Q == K``.

    Returns:
        Scalar float32 tensor.
    """
    _check_pair(student, teacher)
    s, t = student.float(), teacher.detach().float()
    k, q = _attention_masks(s.shape, key_mask, query_mask)
    count = _valid_count(s.shape, k, q, per_entry=True, device=s.device)
    return _MaskedMSE.apply(s, t, k, q, count)
