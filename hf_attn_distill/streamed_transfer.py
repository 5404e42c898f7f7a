"""Streaming attention transfer: no ``[B, H, Q, K]`` tensor outlives a block of query rows.

The teacher's mapped layers keep what recomputes their attention rows (:class:`AttentionRows`: the scaled
queries and the keys as the attention function received them, the additive bias and the mask) instead of the
rows themselves, and compute their output with ``"sdpa"`` as unrecorded layers do. A mapped student layer then
runs :class:`StreamedTransfer`: over blocks of query rows it computes its scores, softmax and output ``P V``,
recomputes the teacher's rows of the block (heads grouped to the student's), and adds the block's transfer loss;
it keeps for backward only its inputs and one log-sum-exp per row, and backward recomputes each block's
probabilities (as flash attention does), adding the loss gradient (a layer that fits in one block keeps that
block instead: at short lengths recomputing would cost more than the memory it saves):

- ``"kl"`` (MiniLM): ``dS += w (p_s sum_k p~_t - p~_t)``;
- ``"mse_probs"``: ``dP += 2w (p_s - p_t)`` before the softmax backward;
- ``"mse_scores"`` (TinyBERT): ``dS += 2w (S - S_t)``,

on valid entries only (:mod:`~hf_attn_distill.attention_masks`), ``w`` being the loss's gradient over its count.
Block rows are chosen from a memory budget (:data:`ROW_BLOCK_ELEMENTS` float32 elements per block temporary), so
the extra memory is the same at any length. Values and gradients equal the fused path
(:mod:`~hf_attn_distill.fused_transfer`) and the reference losses (tested). Attention dropout, when training, is
drawn per block from a generator seeded once per call, and drawn again identically in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .attention_masks import attention_loss_count
from .losses import group_teacher_heads

__all__ = [
    "ROW_BLOCK_ELEMENTS",
    "AttentionMask",
    "AttentionRows",
    "StreamedTransfer",
    "row_blocks",
    "streamed_transfer",
]

ROW_BLOCK_ELEMENTS = 1 << 21  # float32 elements of one [B, H, rows, K] block temporary: 8 MB
_MIN = torch.finfo(torch.float32).min


def row_blocks(batch: int, heads: int, num_q: int, num_k: int, budget: int | None = None) -> list[slice]:
    """Slices of query rows such that one ``[batch, heads, rows, num_k]`` block holds about ``budget`` elements."""
    budget = ROW_BLOCK_ELEMENTS if budget is None else budget
    rows = max(1, budget // max(1, batch * heads * num_k))
    return [slice(i, min(i + rows, num_q)) for i in range(0, num_q, rows)]


def _future(rows: slice, num_q: int, num_k: int, device) -> torch.Tensor:
    """``[r, K]``: key ``k`` is in the future of query ``q`` (queries aligned to the last keys)."""
    q = torch.arange(rows.start, rows.stop, device=device)[:, None]
    return torch.arange(num_k, device=device)[None, :] > q + (num_k - num_q)


@dataclass(eq=False)
class AttentionMask:
    """A layer's attention mask, applied one block of query rows at a time.

    Exactly one description is used: ``blocked`` (boolean, broadcastable to ``[B, H, Q, K]``, ``True`` = masked),
    ``additive`` (float, added to the scores), or ``key_valid`` (``[B, K]``) and ``causal`` — the compact form a
    padding (and causal) mask is stored in, so that no ``Q x K`` tensor needs to be kept.
    """

    blocked: torch.Tensor | None = None
    additive: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    causal: bool = False
    window: int | None = None  # keys farther than this from the query are masked (sliding-window layers)

    @classmethod
    def compact(cls, blocked: torch.Tensor | None, causal: bool) -> AttentionMask:
        """The mask of a call; a boolean padding mask, causal or not, with or without a sliding window, is replaced
        by its ``[B, K]`` key padding (and the window), so nothing of size Q x K is kept."""
        if blocked is None:
            return cls(causal=causal)
        if blocked.dim() != 4 or blocked.shape[1] != 1:
            return cls(blocked=blocked)
        num_q, num_k = blocked.shape[-2:]
        candidates = [cls(key_valid=~blocked[:, 0, -1, :], causal=c) for c in (False, True)]  # the last query sees all
        if num_q == num_k:  # sliding windows: every real key sees itself, and the widest visible distance is the window
            key_valid = ~blocked[:, 0].diagonal(dim1=-2, dim2=-1)
            distance = torch.arange(num_q, device=blocked.device)[:, None] - torch.arange(num_k, device=blocked.device)
            seen = ~blocked[:, 0] & key_valid[:, None, :] & key_valid[:, :, None]
            if bool(seen.any()):
                window = int(distance.abs().expand_as(seen)[seen].max())
                candidates += [cls(key_valid=key_valid, causal=c, window=window) for c in (False, True)]
        for candidate in candidates:
            if torch.equal(candidate.dense(num_q, num_k).expand_as(blocked), blocked):
                return candidate
        return cls(blocked=blocked)

    def dense(self, num_q: int, num_k: int) -> torch.Tensor:
        """The compact mask as a ``[B|1, 1, Q, K]`` boolean tensor (for checking the compaction)."""
        device = self.key_valid.device if self.key_valid is not None else "cpu"
        rows = slice(0, num_q)
        blocked = torch.zeros(1, 1, num_q, num_k, dtype=torch.bool, device=device)
        if self.key_valid is not None:
            blocked = blocked | ~self.key_valid[:, None, None, :]
        return blocked | self._positions(rows, num_q, num_k, device)

    def _positions(self, rows: slice, num_q: int, num_k: int, device) -> torch.Tensor:
        """``[r, K]`` entries masked by position (causality, window)."""
        masked = torch.zeros(rows.stop - rows.start, num_k, dtype=torch.bool, device=device)
        if self.causal:
            masked |= _future(rows, num_q, num_k, device)
        if self.window is not None:
            q = torch.arange(rows.start, rows.stop, device=device)[:, None] + (num_k - num_q)
            masked |= (q - torch.arange(num_k, device=device)[None, :]).abs() > self.window
        return masked

    def apply_(self, scores: torch.Tensor, rows: slice, num_q: int) -> torch.Tensor:
        """Mask the ``[B, H, r, K]`` scores of query rows ``rows`` in place."""
        if self.blocked is not None:
            scores.masked_fill_(_rows_of(self.blocked, rows), _MIN)
        elif self.additive is not None:
            scores.add_(_rows_of(self.additive, rows).float())
        else:
            if self.key_valid is not None:
                scores.masked_fill_(~self.key_valid[:, None, None, :], _MIN)
            if self.causal or self.window is not None:
                scores.masked_fill_(self._positions(rows, num_q, scores.shape[-1], scores.device), _MIN)
        return scores


def _rows_of(mask: torch.Tensor, rows: slice) -> torch.Tensor:
    return mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., rows, :]


@dataclass(eq=False)
class AttentionRows:
    """What recomputes one teacher layer's attention rows: ``softmax(query key^T + bias, mask)``.

    Attributes:
        query: ``[B, H, Q, D]``, already multiplied by the attention scaling.
        key: ``[B, H_kv, K, D]`` (grouped-query attention: ``H`` a multiple of ``H_kv``).
        bias: additive bias broadcastable to ``[B, H, Q, K]`` (T5's position bias) or ``None``.
        mask: the call's :class:`AttentionMask`.
    """

    query: torch.Tensor
    key: torch.Tensor
    bias: torch.Tensor | None
    mask: AttentionMask

    @property
    def shape(self) -> tuple[int, int, int, int]:
        batch, heads, num_q, _ = self.query.shape
        return batch, heads, num_q, self.key.shape[-2]

    def scores(self, rows: slice) -> torch.Tensor:
        """Raw float32 scores ``[B, H, r, K]`` of query rows ``rows`` (bias added, not masked)."""
        query = self.query[:, :, rows]
        batch, heads, count, dim = query.shape
        kv_heads = self.key.shape[1]
        grouped = query.reshape(batch, kv_heads, heads // kv_heads * count, dim)
        scores = torch.matmul(grouped, self.key.transpose(-1, -2)).float().reshape(batch, heads, count, -1)
        if self.bias is not None:
            scores += _rows_of(self.bias, rows).float()
        return scores

    def block(self, rows: slice, quantity: str, heads: int) -> torch.Tensor:
        """The teacher's ``quantity`` (``"log_probs"`` or raw ``"scores"``) of rows ``rows``, heads grouped to
        ``heads``."""
        scores = self.scores(rows)
        if quantity == "log_probs":
            scores = torch.log_softmax(self.mask.apply_(scores, rows, self.shape[2]), dim=-1)
        return group_teacher_heads(scores, heads, quantity)

    def materialize(self, quantity: str) -> torch.Tensor:
        """The full ``[B, H, Q, K]`` record (for inspection and plots)."""
        blocks = row_blocks(*self.shape)
        return torch.cat([self.block(rows, quantity, self.shape[1]) for rows in blocks], dim=2)


def _valid_rows(target, rows: slice, num_q: int, num_k: int, device) -> torch.Tensor | None:
    """``[B, 1, r, K]`` valid entries of rows ``rows`` for the loss, or ``None`` when all are valid."""
    key, query, causal = target.key_mask, target.query_mask, target.causal
    if query is None and key is not None and num_q == num_k:
        query = key
    if key is None and query is None and not causal:
        return None
    valid = torch.ones(1, 1, rows.stop - rows.start, num_k, dtype=torch.bool, device=device)
    if key is not None:
        valid = valid & key.bool()[:, None, None, :]
    if query is not None:
        valid = valid & query.bool()[:, None, rows, None]
    if causal:
        valid = valid & ~_future(rows, num_q, num_k, device)
    return valid


def _zero_invalid_(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return x if valid is None else x.masked_fill_(~valid, 0.0)


class _Dropout:
    """Attention dropout drawn per block from a generator seeded once per call, so backward redraws it."""

    def __init__(self, p: float, device):
        self.p = p
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        self.device = device

    def keep(self, shape, index: int) -> torch.Tensor | None:
        if self.p == 0:
            return None
        generator = torch.Generator(device=self.device).manual_seed(self.seed + index)
        return torch.rand(shape, generator=generator, device=self.device) >= self.p


def _student_block(query, key, bias, mask: AttentionMask, rows: slice, num_q: int):
    """Masked float32 scores, log-sum-exp, log-probabilities and probabilities of the student's rows ``rows``
    (fully masked rows get probability 0, as ``"sdpa"`` gives them output 0)."""
    scores = torch.matmul(query[:, :, rows], key.transpose(-1, -2)).float()
    if bias is not None:
        scores += _rows_of(bias, rows).float()
    mask.apply_(scores, rows, num_q)
    log_probs = torch.log_softmax(scores, dim=-1)  # as the reference losses compute it, for the same values
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = log_probs.exp()
    dead = scores.amax(-1, keepdim=True) <= _MIN / 2
    if bool(dead.any()):
        probs.masked_fill_(dead, 0.0)
    return scores, lse, log_probs, probs


class StreamedTransfer(torch.autograd.Function):
    """``(softmax(q k^T + bias, mask) v, transfer loss to the teacher's rows)`` block by block; see the module
    docstring. ``query`` is already scaled; ``key`` and ``value`` have the query's head count."""

    @staticmethod
    def forward(ctx, query, key, value, bias, mask, teacher, loss, target, dropout, count):
        batch, heads, num_q, _ = query.shape
        num_k = key.shape[-2]
        quantity = "scores" if loss == "mse_scores" else "log_probs"
        out = torch.empty(*query.shape[:-1], value.shape[-1], dtype=value.dtype, device=query.device)
        total = torch.zeros((), dtype=torch.float32, device=query.device)
        lses = []
        blocks = row_blocks(batch, heads, num_q, num_k)
        ctx.kept = None
        for index, rows in enumerate(blocks):
            scores, lse, log_probs, probs = _student_block(query, key, bias, mask, rows, num_q)
            lses.append(lse)
            t = teacher.block(rows, quantity, heads)
            if len(blocks) == 1:  # the whole layer fits the block budget: keep it, backward need not recompute
                ctx.kept = (scores, probs, t)
            valid = _valid_rows(target, rows, num_q, num_k, query.device)
            if loss == "kl":
                p_t = _zero_invalid_(t.exp(), valid)
                total += p_t.mul_(t - log_probs).nan_to_num_(nan=0.0).sum()
            else:
                diff = scores - t if loss == "mse_scores" else probs - t.exp()
                diff = _zero_invalid_(diff, valid).reshape(-1)
                total += torch.dot(diff, diff)
            keep = dropout.keep(probs.shape, index)
            if keep is not None:
                probs = probs * keep / (1.0 - dropout.p)
            out[:, :, rows] = torch.matmul(probs.to(value.dtype), value)
        ctx.save_for_backward(query, key, value, bias, torch.cat(lses, dim=2), count)
        ctx.mask, ctx.teacher, ctx.loss, ctx.target, ctx.dropout = mask, teacher, loss, target, dropout
        return out, total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_loss):
        query, key, value, bias, lse, count = ctx.saved_tensors
        mask, teacher, loss, target, dropout = ctx.mask, ctx.teacher, ctx.loss, ctx.target, ctx.dropout
        batch, heads, num_q, _ = query.shape
        num_k = key.shape[-2]
        quantity = "scores" if loss == "mse_scores" else "log_probs"
        w = grad_loss / count
        grad_q, grad_k, grad_v = [], None, None  # grad_q: one piece per block of rows
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[3] else None
        )
        key_f, value_f = key.float(), value.float()
        for index, rows in enumerate(row_blocks(batch, heads, num_q, num_k)):
            if ctx.kept is not None:
                scores, probs, t = ctx.kept
            else:
                scores = torch.matmul(query[:, :, rows], key.transpose(-1, -2)).float()
                if bias is not None:
                    scores += _rows_of(bias, rows).float()
                mask.apply_(scores, rows, num_q)
                probs = (scores - lse[:, :, rows]).exp_()
                dead = scores.amax(-1, keepdim=True) <= _MIN / 2
                if bool(dead.any()):
                    probs.masked_fill_(dead, 0.0)
                t = teacher.block(rows, quantity, heads)
            grad_o = grad_out[:, :, rows].float()
            keep = dropout.keep(probs.shape, index)
            dropped = probs if keep is None else probs * keep / (1.0 - dropout.p)
            block_v = torch.matmul(dropped.transpose(-1, -2), grad_o)
            grad_v = block_v if grad_v is None else grad_v.add_(block_v)
            grad_p = torch.matmul(grad_o, value_f.transpose(-1, -2))
            if keep is not None:
                grad_p = grad_p * keep / (1.0 - dropout.p)
            valid = _valid_rows(target, rows, num_q, num_k, query.device)
            if loss == "mse_probs":
                grad_p += _zero_invalid_(probs - t.exp(), valid).mul_(2.0 * w)
            # softmax backward, in place: g <- p * (g - sum_k p g)
            grad_s = grad_p.sub_((probs * grad_p).sum(-1, keepdim=True)).mul_(probs)
            if loss == "kl":
                p_t = _zero_invalid_(t.exp(), valid)
                grad_s.addcmul_(probs, p_t.sum(-1, keepdim=True) * w).sub_(p_t.mul_(w))
            elif loss == "mse_scores":
                grad_s += _zero_invalid_(scores - t, valid).mul_(2.0 * w)
            grad_q.append(torch.matmul(grad_s, key_f))
            block_k = torch.matmul(grad_s.transpose(-1, -2), query[:, :, rows].float())
            grad_k = block_k if grad_k is None else grad_k.add_(block_k)
            if grad_bias is not None:
                grad_bias[..., rows, :] += _sum_to(grad_s, grad_bias[..., rows, :].shape)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        grad_q = torch.cat(grad_q, dim=2) if len(grad_q) > 1 else grad_q[0]
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), grad_bias, *([None] * 6)


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


def streamed_transfer(query, key, value, bias, mask: AttentionMask, target, dropout: float = 0.0):
    """Output ``[B, H, Q, D]`` of one student attention layer and its transfer loss to ``target`` (a
    :class:`~hf_attn_distill.fused_transfer.TransferTarget` whose ``teacher`` is :class:`AttentionRows`).

    ``query`` is scaled already; ``key``/``value`` have the query's head count. The loss is the mean over valid
    (head, query) rows for ``"kl"`` and over valid entries for the MSE kinds, as the reference losses define it."""
    batch, heads, num_q, _ = query.shape
    num_k = key.shape[-2]
    t_batch, _, t_q, t_k = target.teacher.shape
    if (t_batch, t_q, t_k) != (batch, num_q, num_k):
        raise ValueError(
            f"Teacher attention rows {target.teacher.shape} and student attention {(batch, heads, num_q, num_k)} "
            "differ in batch or length: feed both models the same batch."
        )
    args = (batch, num_q, num_k, target.key_mask, target.query_mask, target.causal, query.device)
    count = attention_loss_count(target.loss, heads, *args).clamp_min(1.0)
    return StreamedTransfer.apply(
        query, key, value, bias, mask, target.teacher, target.loss, target, _Dropout(dropout, query.device), count
    )
