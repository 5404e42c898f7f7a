"""Streaming attention transfer: no ``[B, H, Q, K]`` tensor outlives a block of query rows.

The teacher's mapped layers keep what recomputes their attention rows (:class:`AttentionRows`: the scaled
queries and the keys as the attention function received them, the additive bias and the mask) instead of the
rows themselves, and compute their output with ``"sdpa"`` as unrecorded layers do. A mapped student layer then
runs :class:`StreamedTransfer`: over blocks of query rows it computes its scores, softmax and output ``P V``,
recomputes the teacher's rows of the block (heads grouped to the student's), and adds the block's transfer loss;
it keeps for backward only its inputs and one log-sum-exp per row, and backward recomputes each block's
probabilities (as flash attention does). The transfer loss's own gradient on the inputs is taken in forward, block
by block, while the teacher's rows are at hand (its gradient on the scores, times the keys and the queries, per unit
of the loss's gradient: two float32 ``[B, H, T, D]`` tensors), so backward neither keeps nor recomputes a teacher row
(except for the loss's share of a trainable bias that differs by query, T5's position bias, whose gradient would
otherwise be a ``Q x K`` tensor held until backward: that share is taken in backward from the rows recomputed). A
layer whose ``[B, H, Q, K]`` attention fits the target's ``keep_elements`` (:func:`keeps_attention`;
``DistillConfig.attention_keep_mb``) keeps each block's probabilities and dropout mask for backward instead, which
then recomputes nothing: at the lengths most runs use, recomputing costs more time than the memory it saves is worth
(the blocks stay block-sized, so the allocator reuses them rather than mapping fresh pages for one layer-sized
tensor). A recomputing layer whose one-byte dropout masks fit that budget (:func:`keeps_dropout_masks`) keeps them
rather than drawing them again in backward. The loss's gradient on the student's scores:

- ``"kl"`` (MiniLM): ``dS = w (p_s sum_k p~_t - p~_t)``;
- ``"mse_probs"``: ``dP = 2w (p_s - p_t)`` through the softmax backward;
- ``"mse_scores"`` (TinyBERT): ``dS = 2w (S - S_t)``,

on valid entries only (:mod:`~hf_attn_distill.attention.masks`), ``w`` being the loss's gradient over its count.
Streamed layers choose block rows from a memory budget (:data:`ROW_BLOCK_ELEMENTS` float32 elements per block
temporary), so they hold nothing of size ``Q x K`` beyond one block at any length. Values and gradients equal the fused path
(:mod:`~hf_attn_distill.attention.fused`) and the reference losses (tested). Attention dropout, when training, is
drawn per block from a generator seeded once per call, and drawn again identically in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from hf_attn_distill.attention.masks import attention_loss_count
from hf_attn_distill.losses import group_teacher_heads, lift_neg_inf_

__all__ = [
    "ROW_BLOCK_ELEMENTS",
    "AttentionMask",
    "AttentionRows",
    "StreamedTransfer",
    "keeps_attention",
    "keeps_dropout_masks",
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


def keeps_attention(batch: int, heads: int, num_q: int, num_k: int, keep_elements: int | None = None) -> bool:
    """Whether a layer with this ``[batch, heads, num_q, num_k]`` attention keeps its blocks for backward (no
    recompute) rather than recomputing them there: it does when the attention has at most ``keep_elements``
    elements (``None``: one row block's worth, :data:`ROW_BLOCK_ELEMENTS`)."""
    limit = ROW_BLOCK_ELEMENTS if keep_elements is None else keep_elements
    return batch * heads * num_q * num_k <= limit


def keeps_dropout_masks(batch: int, heads: int, num_q: int, num_k: int, keep_elements: int | None = None) -> bool:
    """Whether a layer that recomputes its blocks in backward (:func:`keeps_attention` false) keeps their one-byte
    attention-dropout masks for backward rather than drawing them again there (the draw is the larger part of the
    recompute on a CPU): it does when the masks, a quarter of the float32 attention, take at most half of
    ``keep_elements``'s bytes (512 tokens at batch 8 and 12 heads under the default; 2,048 tokens at batch 1 redraw
    theirs, which would otherwise hold 50 MB a layer where the streamed layer holds nothing else of that size)."""
    limit = ROW_BLOCK_ELEMENTS if keep_elements is None else keep_elements
    return batch * heads * num_q * num_k <= 2 * limit


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
    _dead: tuple | None = field(default=None, init=False, repr=False)  # (rows, any) once known from the mask alone

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

    def dead_rows(self, scores: torch.Tensor, rows: slice) -> torch.Tensor | None:
        """Query rows of the masked block ``scores`` with every key masked (broadcastable to ``[B, H, r, 1]``), or
        ``None`` when there are none; read once from the mask itself when it tells (boolean or plain padding),
        else from the block."""
        if self._dead is None:
            if self.blocked is not None:
                dead = self.blocked.all(-1, keepdim=True)
            elif self.additive is None and self.key_valid is None:
                dead = None  # causality and windows alone leave every query its own key (queries end-aligned)
            elif self.additive is None and not self.causal and self.window is None:
                dead = ~self.key_valid.any(-1)[:, None, None, None]
            else:  # causality or a window combined with padding or an additive mask: look at the scores
                dead = scores.amax(-1, keepdim=True) <= _MIN / 2
                return dead if bool(dead.any()) else None
            self._dead = (dead, dead is not None and bool(dead.any()))
        dead, any_dead = self._dead
        return _rows_of(dead, rows) if any_dead else None


def _matmul_operand(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``[B, H, m, n]``, the second operand of every block's ``matmul``) as ``matmul`` lays it out: where its
    batch dimensions do not fold into one, ``matmul`` copies it to contiguous memory at every call; this copies it
    once a layer instead of once a block, to the same layout, so the products are the same to the last bit."""
    batch, heads = x.shape[:2]
    if batch == 1 or heads == 1 or x.stride(0) == heads * x.stride(1):
        return x
    return x.contiguous()


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

    def __post_init__(self):
        # held transposed as every block's matmul reads it: one copy a layer, not one a block
        self.key = _matmul_operand(self.key.transpose(-1, -2)).transpose(-1, -2)

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


@dataclass(eq=False)
class _ValidEntries:
    """The (query, key) entries a layer's loss compares, one block of query rows at a time: ``key``/``query``
    ``[B, K]``/``[B, Q]`` booleans, ``None`` when every one is valid."""

    key: torch.Tensor | None
    query: torch.Tensor | None
    causal: bool

    @classmethod
    def of(cls, target, num_q: int, num_k: int) -> _ValidEntries:
        key, query = target.key_mask, target.query_mask
        if query is None and key is not None and num_q == num_k:
            query = key
        key, query = (None if m is None or bool(m.all()) else m.bool() for m in (key, query))
        return cls(key, query, target.causal)

    def rows(self, rows: slice, num_q: int, num_k: int, device) -> torch.Tensor | None:
        """``[B|1, 1, r, K]`` valid entries of rows ``rows``, or ``None`` when all are valid."""
        if self.key is None and self.query is None and not self.causal:
            return None
        valid = torch.ones(1, 1, rows.stop - rows.start, num_k, dtype=torch.bool, device=device)
        if self.key is not None:
            valid = valid & self.key[:, None, None, :]
        if self.query is not None:
            valid = valid & self.query[:, None, rows, None]
        if self.causal:
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
        """Block ``index``'s kept entries (boolean), ``None`` without dropout."""
        if self.p == 0:
            return None
        generator = torch.Generator(device=self.device).manual_seed(self.seed + index)
        return torch.rand(shape, generator=generator, device=self.device) >= self.p

    def apply(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``x`` with the dropped entries zeroed and the kept ones scaled by ``1 / (1 - p)`` (a new tensor)."""
        # where, not mul: multiplying by a boolean mask first casts it to a float tensor of the block's size
        return x if keep is None else torch.where(keep, x, 0.0).div_(1.0 - self.p)


def _student_block(query, key_t, bias, mask: AttentionMask, rows: slice, lse: torch.Tensor | None = None):
    """Masked float32 scores and probabilities of the student's rows ``rows`` (``key_t``: the keys transposed,
    ``[B, H, D, K]``), and their log-probabilities (or, given their log-sum-exps ``lse``, in backward, ``None``);
    fully masked rows get probability 0, as ``"sdpa"`` gives them output 0."""
    scores = torch.matmul(query[:, :, rows], key_t).float()
    if bias is not None:
        scores += _rows_of(bias, rows).float()
    mask.apply_(scores, rows, query.shape[2])
    if lse is None:
        log_probs = torch.log_softmax(scores, dim=-1)  # as the reference losses compute it, for the same values
        probs = log_probs.exp()
    else:
        log_probs, probs = None, (scores - lse[:, :, rows]).exp_()
    dead = mask.dead_rows(scores, rows)
    if dead is not None:
        probs.masked_fill_(dead, 0.0)
    return scores, log_probs, probs


def _transfer_term(loss: str, scores, probs, t, valid) -> torch.Tensor:
    """What the block's loss is built from and its gradient needs: the teacher's probabilities (``"kl"``) or the
    difference to the teacher (MSE kinds), zero on invalid entries."""
    if loss == "kl":
        return _zero_invalid_(t.exp(), valid)
    return _zero_invalid_(scores - t if loss == "mse_scores" else probs - t.exp(), valid)


class StreamedTransfer(torch.autograd.Function):
    """``(softmax(q k^T + bias, mask) v, transfer loss to the teacher's rows)`` block by block; see the module
    docstring. ``query`` is already scaled; ``key`` and ``value`` have the query's head count."""

    @staticmethod
    def forward(ctx, query, key, value, bias, mask, teacher, loss, valid, dropout, count, keep_elements, trains):
        batch, heads, num_q, _ = query.shape
        num_k = key.shape[-2]
        quantity = "scores" if loss == "mse_scores" else "log_probs"
        kept = keeps_attention(batch, heads, num_q, num_k, keep_elements)  # kept: backward recomputes nothing
        masks_kept = not kept and dropout.p > 0 and keeps_dropout_masks(batch, heads, num_q, num_k, keep_elements)
        blocks = row_blocks(batch, heads, num_q, num_k)
        out = (
            None
            if len(blocks) == 1
            else torch.empty(*query.shape[:-1], value.shape[-1], dtype=value.dtype, device=query.device)
        )
        total = torch.zeros((), dtype=torch.float32, device=query.device)
        lses, held = [], []  # held: each kept block's (probs, dropout mask), or only its dropout mask
        key_t, value_m = _matmul_operand(key.transpose(-1, -2)), _matmul_operand(value)
        # the loss's gradient on the inputs, per unit of the loss's gradient (backward scales and adds it): the
        # teacher's rows are then needed in forward only, neither kept nor recomputed for backward; not taken
        # where nothing will be differentiated (evaluation, the no-grad pass of reentrant checkpointing)
        # a trainable bias that differs by query (T5's position bias) would need a Q x K gradient held from here to
        # backward: its share is taken in backward instead, from the teacher's rows recomputed there
        bias_in_backward = trains and bias is not None and ctx.needs_input_grad[3] and bias.shape[-2] > 1
        bias_now = trains and bias is not None and ctx.needs_input_grad[3] and not bias_in_backward
        loss_grads = _LossGrads(query, key, bias if bias_now else None) if trains else None
        for index, rows in enumerate(blocks):
            scores, log_probs, probs = _student_block(query, key_t, bias, mask, rows)
            t = teacher.block(rows, quantity, heads)
            term = _transfer_term(loss, scores, probs, t, valid.rows(rows, num_q, num_k, query.device))
            if loss == "kl":
                # 0 * log(0) = 0 where the teacher gives a key no mass (-inf lifted to the lowest float: exact for
                # every finite value), while a NaN or inf of the student stays in the loss, never hidden
                total += lift_neg_inf_(t - log_probs).mul_(term).sum()
            else:
                total += torch.dot(term.reshape(-1), term.reshape(-1))
            del t, log_probs
            if loss_grads is not None:
                loss_grads.add_block(_loss_grad_scores_(loss, probs, term), query, rows)
            del term
            keep = dropout.keep(probs.shape, index)
            block_out = torch.matmul(dropout.apply(probs, keep).to(value.dtype), value_m)
            if out is None:
                out = block_out
            else:
                out[:, :, rows] = block_out
            if kept:  # the dropped probabilities are redrawn from probs and keep in backward: one tensor less
                held += [probs, keep]
            else:
                lses.append(torch.logsumexp(scores, dim=-1, keepdim=True))
                if masks_kept:
                    held.append(keep)
        lse = torch.cat(lses, dim=2) if lses else None
        grads = (loss_grads.query, loss_grads.key, loss_grads.bias) if loss_grads is not None else (None,) * 3
        # saved, not attributes: checkpointing's and offloading's saved-tensor hooks then see the kept blocks too
        ctx.save_for_backward(query, key, value, bias, lse, count, *grads, *held)
        ctx.kept, ctx.masks_kept, ctx.bias_in_backward = kept, masks_kept, bias_in_backward
        ctx.mask, ctx.dropout, ctx.blocks = mask, dropout, blocks
        if bias_in_backward:
            ctx.teacher, ctx.loss, ctx.valid = teacher, loss, valid
        return out, total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_loss):
        query, key, value, bias, lse, count, loss_q, loss_k, loss_bias, *held = ctx.saved_tensors
        mask, dropout = ctx.mask, ctx.dropout
        w = grad_loss / count
        grad_q, grad_k, grad_v = [], None, None  # grad_q: one piece per block of rows
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[3] else None
        )
        key_f = _matmul_operand(key.float())
        value_t = _matmul_operand(value.float().transpose(-1, -2))
        key_t = None if ctx.kept and not ctx.bias_in_backward else _matmul_operand(key.transpose(-1, -2))
        for index, rows in enumerate(ctx.blocks):
            if ctx.kept:
                probs, keep = held[2 * index : 2 * index + 2]
            else:
                scores, _, probs = _student_block(query, key_t, bias, mask, rows, lse)
                keep = held[index] if ctx.masks_kept else dropout.keep(probs.shape, index)
            if ctx.bias_in_backward:  # the loss's share of a query-dependent bias's gradient (see forward)
                if ctx.kept:
                    scores, _, _ = _student_block(query, key_t, bias, mask, rows)
                _add_bias_grad_(grad_bias, _block_loss_grad(ctx, query, scores, probs, rows).mul_(w), rows)
            dropped = dropout.apply(probs, keep)
            grad_o = grad_out[:, :, rows].float()
            block_v = torch.matmul(dropped.transpose(-1, -2), grad_o)
            del dropped
            grad_v = block_v if grad_v is None else grad_v.add_(block_v)
            grad_p = torch.matmul(grad_o, value_t)
            if keep is not None:
                grad_p.mul_(keep).div_(1.0 - dropout.p)
            # softmax backward, in place: g <- p * (g - sum_k p g)
            grad_s = grad_p.sub_((probs * grad_p).sum(-1, keepdim=True)).mul_(probs)
            grad_q.append(torch.matmul(grad_s, key_f))
            block_k = torch.matmul(grad_s.transpose(-1, -2), query[:, :, rows].float())
            grad_k = block_k if grad_k is None else grad_k.add_(block_k)
            if grad_bias is not None:
                _add_bias_grad_(grad_bias, grad_s, rows)
        grad_q = torch.cat(grad_q, dim=2) if len(grad_q) > 1 else grad_q[0]
        if loss_q is not None:  # the transfer loss's own gradient, taken in forward (None: no input of it trains)
            grad_q.addcmul_(loss_q, w)
            grad_k.addcmul_(loss_k, w)
        if loss_bias is not None:
            grad_bias.addcmul_(loss_bias, w)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), grad_bias, *([None] * 8)


def _block_loss_grad(ctx, query, scores, probs, rows: slice) -> torch.Tensor:
    """The block loss's gradient on the student's scores per unit of ``w``, from the teacher's rows recomputed."""
    batch, heads, num_q, _ = query.shape
    quantity = "scores" if ctx.loss == "mse_scores" else "log_probs"
    t = ctx.teacher.block(rows, quantity, heads)
    valid = ctx.valid.rows(rows, num_q, scores.shape[-1], query.device)
    return _loss_grad_scores_(ctx.loss, probs, _transfer_term(ctx.loss, scores, probs, t, valid))


def _loss_grad_scores_(loss: str, probs: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """The block loss's gradient on the student's scores per unit of ``w`` (the loss's gradient over its count),
    written over ``term`` (:func:`_transfer_term`):

    - ``"kl"`` (MiniLM): ``p_s sum_k p~_t - p~_t``;
    - ``"mse_probs"``: ``2 (p_s - p_t)`` through the softmax backward, ``p_s (g - sum_k p_s g)``;
    - ``"mse_scores"`` (TinyBERT): ``2 (S - S_t)``;

    zero on invalid entries (``term`` is)."""
    if loss == "kl":
        return term.neg_().addcmul_(probs, term.sum(-1, keepdim=True).neg_())
    if loss == "mse_probs":
        return term.sub_((probs * term).sum(-1, keepdim=True)).mul_(probs).mul_(2.0)
    return term.mul_(2.0)


class _LossGrads:
    """The transfer loss's gradient on ``query``, ``key`` (float32, their shapes) and ``bias`` (a trainable bias
    broadcast over the queries, or ``None``), per unit of ``w``, accumulated block by block in forward from
    :func:`_loss_grad_scores_`: ``dQ = dS K``, ``dK = dS^T Q``, ``dBias = dS`` (summed to the bias's shape); in
    float32 under autocast too, as backward takes the rest of the gradient."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None):
        self.query = torch.empty(query.shape, dtype=torch.float32, device=query.device)
        self.key = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        self.bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None else None
        self._key_f = _matmul_operand(key.float())

    def add_block(self, grad_s: torch.Tensor, query: torch.Tensor, rows: slice) -> None:
        with torch.autocast(grad_s.device.type, enabled=False):
            torch.matmul(grad_s, self._key_f, out=self.query[:, :, rows])
            self.key.add_(torch.matmul(grad_s.transpose(-1, -2), query[:, :, rows].float()))
        if self.bias is not None:
            _add_bias_grad_(self.bias, grad_s, rows)


def _add_bias_grad_(grad_bias: torch.Tensor, grad_s: torch.Tensor, rows: slice) -> None:
    if grad_bias.shape[-2] == 1:  # a bias broadcast over the queries: every block adds to it
        grad_bias += _sum_to(grad_s, grad_bias.shape)
    else:
        grad_bias[..., rows, :] += _sum_to(grad_s, grad_bias[..., rows, :].shape)


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True) if dims else x


def streamed_transfer(query, key, value, bias, mask: AttentionMask, target, dropout: float = 0.0):
    """Output ``[B, H, Q, D]`` of one student attention layer and its transfer loss to ``target`` (a
    :class:`~hf_attn_distill.attention.fused.TransferTarget` whose ``teacher`` is :class:`AttentionRows`).

    ``query`` is scaled already; ``key``/``value`` have the query's head count. The loss is the mean over valid
    (head, query) rows for ``"kl"`` and over valid entries for the MSE kinds, as the reference losses define it.
    A layer whose attention has at most ``target.keep_elements`` elements keeps it for backward
    (:func:`keeps_attention`)."""
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
        query,
        key,
        value,
        bias,
        mask,
        target.teacher,
        target.loss,
        _ValidEntries.of(target, num_q, num_k),
        _Dropout(dropout, query.device),
        count,
        target.keep_elements,
        torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (query, key, bias)),
    )
