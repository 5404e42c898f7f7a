"""Token-level divergences between a teacher's and a student's next-token distributions, for language models.

Pure functions with explicit masks, each the per-token value of one divergence between the temperature-softened
distributions ``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)`` (all sums over the vocabulary):

- ``forward_kl``: ``KL(p_t ‖ p_s) = Σ p_t (log p_t - log p_s)`` (Hinton et al.; mode-covering);
- ``reverse_kl``: ``KL(p_s ‖ p_t)`` (mode-seeking, as in MiniLLM);
- ``jsd``: TRL's generalized Jensen-Shannon divergence with ``beta``: ``m = beta p_t + (1 - beta) p_s``,
  ``beta KL(p_t ‖ m) + (1 - beta) KL(p_s ‖ m)``; ``beta = 0`` is ``forward_kl`` and ``beta = 1`` ``reverse_kl``
  (TRL's convention, taken exactly at the ends);
- ``skew_kl``: DistiLLM's skew KL with ``alpha``: ``KL(p_t ‖ alpha p_t + (1 - alpha) p_s)``;
- ``skew_reverse_kl``: ``KL(p_s ‖ alpha p_s + (1 - alpha) p_t)``.

:func:`chunked_lm_divergence` computes the mean of one of them over the masked tokens from the two models' last
hidden states through their output heads, a chunk of tokens at a time, in the forward and the backward pass, so
neither model's ``[tokens, vocab]`` logits ever exist in full. The mean is multiplied by ``T²`` (Hinton's
convention: gradients keep their scale as ``T`` changes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "chunked_lm_divergence", "token_divergence"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` per row, from log-probabilities ``[N, V]``; ``0 log 0 = 0``."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a · a + (1 - weight_a) · b)`` from log-probabilities, stably."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-token divergence ``[N]`` (float32) of ``kind`` (:data:`DIVERGENCES`) between the rows of
    ``student_logits`` and ``teacher_logits`` ``[N, V]`` softened by ``temperature``; no ``T²`` factor here."""
    if kind not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {kind!r}; choose from {DIVERGENCES}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ."
        )
    if not 0.0 <= beta <= 1.0 or not 0.0 <= alpha < 1.0:
        raise ValueError(f"beta must be in [0, 1] and alpha in [0, 1), got beta={beta}, alpha={alpha}.")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_s, log_t)
    if kind == "jsd":
        log_m = _mixture(log_t, log_s, beta)
        return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    if kind == "skew_kl":
        return _kl(log_t, log_s if alpha == 0.0 else _mixture(log_t, log_s, alpha))
    return _kl(log_s, log_t if alpha == 0.0 else _mixture(log_s, log_t, alpha))


class _ChunkedLMDivergence(torch.autograd.Function):
    """Forward: the summed divergence over the rows, a chunk at a time, and its gradients with respect to the
    student's hidden states and head (computed there, chunk by chunk, so no chunk's logits outlive it); backward:
    those gradients times the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, options):
        kind, temperature, beta, alpha, chunk = options
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            with torch.no_grad():
                t_logits = F.linear(t_hidden[rows], t_weight, t_bias)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(True)
                w = weight.detach().requires_grad_(True)
                b = bias.detach().requires_grad_(True) if bias is not None else None
                value = token_divergence(F.linear(h, w, b), t_logits, kind, temperature, beta, alpha).sum()
                grads = torch.autograd.grad(value, (h, w) if b is None else (h, w, b))
            total += value.detach()
            grad_hidden[rows] = grads[0]
            grad_weight += grads[1]
            if grad_bias is not None:
                grad_bias += grads[2]
        ctx.save_for_backward(grad_hidden, grad_weight, *([grad_bias] if grad_bias is not None else []))
        ctx.has_bias = bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, *rest = ctx.saved_tensors
        grad_bias = rest[0] * grad_output if ctx.has_bias else None
        return grad_hidden * grad_output, grad_weight * grad_output, grad_bias, None, None, None, None


def chunked_lm_divergence(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    mask: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_tokens: int = 1024,
    vocab_rows: int | None = None,
) -> torch.Tensor:
    """``T² ·`` the mean over the tokens of ``mask`` of :func:`token_divergence` between the two models' next-token
    distributions, computed from their last hidden states ``[..., H]`` through their output heads (``weight
    [V, H]``, optional ``bias``; a tied head is the embedding matrix, and its gradient reaches it), ``chunk_tokens``
    rows at a time, forward and backward: no ``[tokens, V]`` tensor is ever held in full.

    ``mask`` (``[...]``, bool) selects the tokens that count (labels ``!= -100``); ``vocab_rows`` compares only the
    first rows of both heads (a padded vocabulary). Equal, values and gradients, to the divergence of the full
    logits (tested)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    s_h = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s_h, t_h = s_h[keep], t_h[keep]
    rows = slice(None, vocab_rows)
    s_w, t_w = student_head.weight[rows], teacher_head.weight[rows].detach()
    s_b = student_head.bias[rows] if student_head.bias is not None else None
    t_b = teacher_head.bias[rows].detach() if teacher_head.bias is not None else None
    count = s_h.shape[0]
    total = _ChunkedLMDivergence.apply(s_h, s_w, s_b, t_h, t_w, t_b, (kind, temperature, beta, alpha, chunk_tokens))
    return total * (temperature**2) / max(count, 1)
