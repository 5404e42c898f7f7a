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

:func:`lm_head_losses` computes, from the two models' last hidden states through their output heads, the student's
cross-entropy on its targets and the summed divergence, a chunk of tokens at a time in the forward and the backward
pass, so neither model's ``[tokens, vocab]`` logits ever exist in full; :func:`chunked_lm_divergence` is its
divergence alone, as a mean over masked tokens. Divergences are multiplied by ``T²`` (Hinton's convention:
gradients keep their scale as ``T`` changes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from hf_attn_distill.config import DIVERGENCES, TOP_K_TAILS

__all__ = [
    "DIVERGENCES",
    "LM_CHUNK_ELEMENTS",
    "LM_MIN_CHUNK_ROWS",
    "LMHeadSettings",
    "TOP_K_TAILS",
    "chunked_lm_divergence",
    "lm_chunk_rows",
    "lm_head_losses",
    "top_k_forward_kl",
    "token_divergence",
]

LM_CHUNK_ELEMENTS = 1 << 23
"""Logits per chunk when ``chunk_tokens`` is 0: 8M, 32 MB of float32 per temporary (but at least
:data:`LM_MIN_CHUNK_ROWS` rows)."""

LM_MIN_CHUNK_ROWS = 512
"""Fewest rows of a chunk chosen from the vocabulary: each chunk reads both heads' whole weights and adds into the
student head's whole gradient, so fewer rows make a large vocabulary's step bandwidth-bound (152k words, 4 x 1,024
tokens, forward KL, 2 CPU cores: 53 s a step at 128 rows, 42 s at 512, 40 s at 1,024, for 0.8 / 1.4 / 2.3 GB peak;
``benchmarks/results/lm_memory.md`` has the default's)."""


def lm_chunk_rows(vocab: int, chunk_tokens: int = 0) -> int:
    """Rows per chunk of the chunked LM loss: ``chunk_tokens``, or (``0``) :data:`LM_CHUNK_ELEMENTS` logits' worth,
    between :data:`LM_MIN_CHUNK_ROWS` and 4,096."""
    return chunk_tokens or max(LM_MIN_CHUNK_ROWS, min(4096, LM_CHUNK_ELEMENTS // max(vocab, 1)))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q)`` per row, from log-probabilities ``[N, V]``; ``0 log 0 = 0``."""
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a · a + (1 - weight_a) · b)`` from log-probabilities, stably."""
    return torch.logsumexp(torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)]), dim=0)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Per-token ``divergence`` ``[N]`` (float32, one of :data:`DIVERGENCES`) between the rows of
    ``student_logits`` and ``teacher_logits`` ``[N, V]`` softened by ``temperature``; no ``T²`` factor here."""
    kind, beta, alpha = divergence, jsd_beta, skew_alpha
    if kind not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {kind!r}; choose from {DIVERGENCES}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ."
        )
    if not 0.0 <= beta <= 1.0 or not 0.0 <= alpha < 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1] and skew_alpha in [0, 1), got {beta} and {alpha}.")
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


def top_k_forward_kl(
    student_logits: torch.Tensor,
    indices: torch.Tensor,
    log_probs: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "renormalize",
) -> torch.Tensor:
    """Per-row ``KL(q ‖ softmax(student / T))`` ``[N]`` (float32; no ``T²`` here) against a teacher known by its
    top ``k`` tokens: ``indices`` ``[N, k]`` and their log-probabilities at temperature ``T`` ``log_probs``
    ``[N, k]`` (rows of ``-inf`` padding allowed). ``tail="renormalize"``: ``q`` is the top-k probabilities scaled
    to sum to 1 (DistillKit's choice); ``"uniform"``: ``q`` keeps them as they are and spreads the missing mass
    ``1 - Σ p_top-k`` evenly over the other ``V - k`` tokens of ``student_logits``' vocabulary."""
    if tail not in TOP_K_TAILS:
        raise ValueError(f"Unknown tail {tail!r}; choose from {TOP_K_TAILS}.")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = log_s.gather(-1, indices.long())
    log_q = log_probs.float()
    if tail == "renormalize":
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
        return _kl_rows(log_q, picked)
    head = _kl_rows(log_q, picked)
    vocab, k = student_logits.shape[-1], indices.shape[-1]
    rest = (1.0 - log_q.exp().sum(-1)).clamp_min(0.0)  # [N]
    others = max(vocab - k, 1)
    u = rest / others
    rest_log_s = log_s.sum(-1) - picked.sum(-1)  # Σ over the other tokens of log p_s
    tail_kl = torch.where(rest > 0, rest * torch.log(u.clamp_min(1e-30)) - u * rest_log_s, 0.0)
    return head + tail_kl


def _kl_rows(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return torch.where(log_q > -math.inf, log_q.exp() * (log_q - log_p), 0.0).sum(-1)


class LMHeadSettings(NamedTuple):
    """What :func:`lm_head_losses` computes: the divergence and its parameters, the chunk size, the compared
    vocabulary rows, and the weights the caller will give the two sums (their gradient is prepared in forward)."""

    divergence: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_tokens: int = 0
    vocab_rows: int | None = None
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    top_k_tail: str = "renormalize"


def _chunk_losses(logits, t_h, t_w, t_b, targets, settings: LMHeadSettings):
    """``(cross-entropy sum, T² · divergence sum)`` of one chunk of student ``logits`` ``[n, V]`` (``None`` for what
    is not asked)."""
    ce = F.cross_entropy(logits.float(), targets, reduction="sum") if targets is not None else None
    kd = None
    if isinstance(t_h, tuple):  # a top-k teacher: (indices, log-probabilities) of these rows
        rows = slice(None, settings.vocab_rows)
        values = top_k_forward_kl(logits[:, rows], t_h[0], t_h[1], settings.temperature, settings.top_k_tail)
        kd = values.sum() * (settings.temperature**2)
    elif t_h is not None:
        with torch.no_grad():
            t_logits = F.linear(t_h.to(t_w.dtype), t_w, t_b)
        rows = slice(None, settings.vocab_rows)
        kd = token_divergence(
            logits[:, rows],
            t_logits[:, rows],
            settings.divergence,
            settings.temperature,
            settings.jsd_beta,
            settings.skew_alpha,
        ).sum() * (settings.temperature**2)
    return ce, kd


def _combined(ce, kd, ce_weight, kd_weight):
    total = 0.0
    if ce is not None and ce_weight != 0:
        total = total + ce * ce_weight
    if kd is not None and kd_weight != 0:
        total = total + kd * kd_weight
    return total


def _rows_of(teacher, rows: slice):
    """The teacher's rows of a chunk: hidden states, or a top-k ``(indices, log_probs)`` pair."""
    if teacher is None:
        return None
    if isinstance(teacher, tuple):
        return tuple(t[rows] for t in teacher)
    return teacher[rows]


def _exp_shifted(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, s, lse)`` of rows ``x`` ``[n, V]``: ``e = exp(scale · (x - max))`` in new memory, its row sums ``s``
    ``[n]`` and ``lse = logsumexp(scale · x)`` ``[n]``; ``e / s`` is ``softmax(scale · x)``."""
    m = x.amax(-1, keepdim=True)
    e = torch.sub(x, m)
    if scale != 1.0:
        e.mul_(scale)
    e.exp_()
    s = e.sum(-1)
    return e, s, m[:, 0] * scale + s.log()


def _forward_kl_ce_grad(logits, t_logits, targets, settings: LMHeadSettings, weights):
    """``(ce, kd, g)`` of one chunk: the sums of :func:`_chunk_losses` for the forward KL (``None`` for what is not
    asked) and ``g``, the gradient of ``weights[0] · ce + weights[1] · kd`` with respect to ``logits`` ``[n, V]``
    (float32), from its closed form: ``softmax(z) - onehot(y)`` for the cross-entropy (rows of target ``-100`` add
    nothing), ``T (softmax(z / T) - softmax(t / T))`` on the first ``vocab_rows`` columns for ``T² · KL``.

    No autograd graph, and few passes and allocations over the chunk (on a CPU each fresh chunk-sized tensor is
    page-faulted in): ``logits`` and ``t_logits`` are consumed (overwritten), each softmax is made once and left
    unnormalised until the gradient's single scaling pass, at ``T = 1`` the student's serves both terms, and a row's
    KL is ``Σ p_t (t - z) / T - logsumexp(t / T) + logsumexp(z / T)``, summed in ``z``'s memory. Teacher
    logits are finite (a linear layer's output; the trainer's ``nonfinite_check`` stops at a non-finite one)."""
    w_ce, w_kd = weights
    z = logits.float()
    width = z.shape[-1]
    cols = slice(None, settings.vocab_rows)
    temperature = settings.temperature
    inv = 1.0 / temperature
    ce = kd = e = e_q = valid = None
    if targets is not None:
        valid = targets != -100
        y = torch.where(valid, targets, 0)
        e, s, lse = _exp_shifted(z, 1.0)
        ce = torch.where(valid, lse - z.gather(-1, y[:, None])[:, 0], 0.0).sum()
    if t_logits is not None:
        zc = z[:, cols]
        shared = e is not None and temperature == 1.0 and zc.shape[-1] == width
        e_q, s_q, lse_q = (e, s, lse) if shared else _exp_shifted(zc, inv)
        t = t_logits[:, cols].float()
        zc.sub_(t)  # z - t: z is not read again
        m_t = t.amax(-1, keepdim=True)
        e_t = t.sub_(m_t)
        if inv != 1.0:
            e_t.mul_(inv)
        e_t.exp_()
        s_t = e_t.sum(-1)
        lse_t = m_t[:, 0] * inv + s_t.log()
        rows = zc.mul_(e_t).sum(-1) * (-inv) / s_t + (lse_q - lse_t)  # a cascade sum: bmm's dot loses digits
        kd = rows.sum() * temperature**2
    # the gradient, in the softmaxes' memory: one scaling pass each, the teacher's subtracted in the same pass
    g = None
    ce_scale = None
    if e is not None and w_ce != 0:
        ce_scale = valid.to(e.dtype) * w_ce / s
    if e_q is not None and w_kd != 0:
        c = w_kd * temperature
        scale = c / s_q if ce_scale is None or e_q is not e else ce_scale + c / s_q
        e_q.mul_(scale[:, None]).addcmul_(e_t, (-c / s_t)[:, None])
        if e_q is e:
            g = e
        elif ce_scale is not None:
            g = e.mul_(ce_scale[:, None])
            g[:, cols] += e_q
        elif e_q.shape[-1] == width:
            g = e_q
        else:
            g = torch.zeros_like(z)
            g[:, cols] = e_q
    elif ce_scale is not None:
        g = e.mul_(ce_scale[:, None])
    if g is None:
        return ce, kd, torch.zeros_like(z)
    if ce_scale is not None:
        g.scatter_add_(-1, y[:, None], (valid.to(g.dtype) * -w_ce)[:, None])
    return ce, kd, g


def _chunk_step(hidden, weight, bias, rows, t_h, t_w, t_b, targets, settings, weights, grads):
    """The losses of one chunk of rows; with ``grads`` (``[d hidden, d weight, d bias]``), also adds into them the
    gradient of ``weights[0] · ce + weights[1] · kd``. Only the chunk's logits go through autograd: the head's
    gradient is accumulated in place (``addmm_``), so a chunk allocates no ``[V, H]`` tensor (a fresh one per
    chunk, page-faulted in each time, made a 152k-vocabulary step several times slower)."""
    h = hidden[rows].detach().to(weight.dtype)  # bfloat16 hidden states under autocast: logits in the head's dtype
    with torch.no_grad():
        logits = F.linear(h, weight.detach(), None if bias is None else bias.detach())
    if grads is None:
        return _chunk_losses(logits, t_h, t_w, t_b, targets, settings)
    if settings.divergence == "forward_kl" and not isinstance(t_h, tuple):
        t_logits = None
        if t_h is not None:
            with torch.no_grad():
                t_logits = F.linear(t_h.to(t_w.dtype), t_w, t_b)
        ce, kd, g = _forward_kl_ce_grad(logits, t_logits, targets, settings, weights)
    else:
        with torch.enable_grad():
            logits.requires_grad_(True)
            ce, kd = _chunk_losses(logits, t_h, t_w, t_b, targets, settings)
            total = _combined(ce, kd, *weights)
            if isinstance(total, torch.Tensor):
                (g,) = torch.autograd.grad(total, logits)
            else:  # no term of this chunk counts; its rows are still written
                g = torch.zeros_like(logits)
    g = g.to(weight.dtype)
    grads[0][rows] = g @ weight.detach()
    grads[1].addmm_(g.t(), h, beta=0.0 if rows.start == 0 else 1.0)  # the first chunk writes it: no zero fill
    if grads[2] is not None:
        grads[2] += g.sum(0)
    return ce, kd


class _LMHeadLosses(torch.autograd.Function):
    """Forward: both sums, a chunk of rows at a time; when a backward will follow, also the gradient (student hidden
    states, head weight and bias) of ``ce_weight · ce + kd_weight · kd``, chunk by chunk, so no chunk's logits outlive
    it. Backward: that gradient scaled, when the incoming gradients stand in the ratio of the weights (what the
    trainer's weighted sum gives); otherwise computed anew, chunk by chunk, for the gradients given."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, targets, settings, want_grad):
        rows_total = hidden.shape[0]
        vocab = weight.shape[0]
        step = lm_chunk_rows(vocab, settings.chunk_tokens)
        chunks = [slice(i, min(i + step, rows_total)) for i in range(0, rows_total, step)]
        ce_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        weights = (
            settings.ce_weight if targets is not None else 0.0,
            settings.kd_weight if t_hidden is not None else 0.0,
        )
        prepare = want_grad and any(weights)
        grads = None
        if prepare:
            fresh = torch.empty_like if chunks else torch.zeros_like  # the chunks write every row and the head
            grads = [fresh(hidden), fresh(weight), None if bias is None else torch.zeros_like(bias)]
        for rows in chunks:
            t_h = _rows_of(t_hidden, rows)
            tgt = None if targets is None else targets[rows]
            ce, kd = _chunk_step(
                hidden, weight, bias, rows, t_h, t_weight, t_bias, tgt, settings, weights, grads if prepare else None
            )
            if ce is not None:
                ce_total += ce.detach()
            if kd is not None:
                kd_total += kd.detach()
        if want_grad:  # what a backward needs: references, no copies (the teacher's may be inference tensors)
            ctx.inputs = (hidden, weight, bias, t_hidden, t_weight, t_bias, targets)
            ctx.chunks, ctx.settings, ctx.weights, ctx.grads = chunks, settings, weights, grads
        return ce_total, kd_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce, grad_kd):
        hidden, weight, bias, t_hidden, t_weight, t_bias, targets = ctx.inputs
        g_ce = 0.0 if grad_ce is None or targets is None else float(grad_ce)
        g_kd = 0.0 if grad_kd is None or t_hidden is None else float(grad_kd)
        w_ce, w_kd = ctx.weights
        grads = ctx.grads
        ctx.inputs = ctx.grads = None
        if grads is not None and math.isclose(g_ce * w_kd, g_kd * w_ce, rel_tol=1e-6, abs_tol=0.0):
            factor = g_kd / w_kd if w_kd != 0 else g_ce / w_ce
            out = [None if g is None else g.mul_(factor) for g in grads]
        else:  # gradients not in the prepared ratio: compute them anew for (g_ce, g_kd)
            out = [torch.zeros_like(hidden), torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)]
            if g_ce != 0 or g_kd != 0:
                for rows in ctx.chunks:
                    tgt = None if targets is None else targets[rows]
                    _chunk_step(
                        hidden, weight, bias, rows, _rows_of(t_hidden, rows), t_weight, t_bias, tgt, ctx.settings,
                        (g_ce, g_kd), out,
                    )  # fmt: skip
        return out[0], out[1], out[2], None, None, None, None, None, None


def lm_head_losses(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.nn.Module | None = None,
    targets: torch.Tensor | None = None,
    settings: LMHeadSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ CE(student, targets), T² · Σ divergence(student, teacher))`` over the rows of ``student_hidden``
    ``[N, H]`` (float32 scalars), through the output heads (``weight [V, H]``, optional ``bias``; a tied head is the
    embedding matrix and its gradient reaches it), ``settings.chunk_tokens`` rows at a time in forward and backward.

    ``teacher_hidden`` ``[N, H_t]`` (no gradient) and ``teacher_head``: the divergence (``0`` without them); or
    ``teacher_hidden`` a top-k teacher ``(indices [N, k], log_probs [N, k])`` and ``teacher_head`` ``None``: forward
    KL against it (:func:`top_k_forward_kl` with ``settings.top_k_tail``);
    ``targets`` ``[N]``: the cross-entropy over the student's whole vocabulary, as its own loss (``0`` without them).
    The divergence compares the first ``settings.vocab_rows`` rows of both heads (a padded vocabulary). The gradient
    of ``settings.ce_weight · CE + settings.kd_weight · KD`` is prepared in forward (one pass over the head);
    any other combination is computed anew in backward, so the result is exact either way."""
    settings = LMHeadSettings() if settings is None else settings
    t_weight = t_bias = None
    if isinstance(teacher_hidden, tuple):
        if settings.divergence != "forward_kl":
            raise ValueError(
                f"A top-k teacher supports divergence='forward_kl' only, got {settings.divergence!r}: the other "
                "divergences need the teacher's whole distribution (drop teacher_logits_top_k)."
            )
    elif teacher_hidden is not None:
        t_weight, t_bias = teacher_head.weight.detach(), getattr(teacher_head, "bias", None)
        t_bias = None if t_bias is None else t_bias.detach()
        teacher_hidden = teacher_hidden.detach()
    if targets is not None:
        targets = targets.reshape(-1)
    bias = getattr(student_head, "bias", None)
    want_grad = torch.is_grad_enabled() and (
        student_hidden.requires_grad or student_head.weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _LMHeadLosses.apply(
        student_hidden, student_head.weight, bias, teacher_hidden, t_weight, t_bias, targets, settings, want_grad
    )


def chunked_lm_divergence(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.nn.Linear,
    mask: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    chunk_tokens: int = 0,
    vocab_rows: int | None = None,
) -> torch.Tensor:
    """``T² ·`` the mean over the tokens of ``mask`` of :func:`token_divergence` between the two models' next-token
    distributions, computed from their last hidden states ``[..., H]`` through their output heads,
    ``chunk_tokens`` rows at a time (``0``: :func:`lm_chunk_rows`), forward and backward:
    no ``[tokens, V]`` tensor is ever held in full (:func:`lm_head_losses`).

    ``mask`` (``[...]``, bool) selects the tokens that count (labels ``!= -100``); ``vocab_rows`` compares only the
    first rows of both heads (a padded vocabulary). Equal, values and gradients, to the divergence of the full
    logits (tested)."""
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: chosen from the vocabulary), got {chunk_tokens}.")
    token_divergence(torch.zeros(1, 1), torch.zeros(1, 1), divergence, 1.0, jsd_beta, skew_alpha)  # checks the names
    s_h = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_h = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s_h, t_h = s_h[keep], t_h[keep]
    settings = LMHeadSettings(divergence, temperature, jsd_beta, skew_alpha, chunk_tokens, vocab_rows, 0.0, 1.0)
    _, total = lm_head_losses(s_h, student_head, t_h, teacher_head, None, settings)
    return total / max(s_h.shape[0], 1)
