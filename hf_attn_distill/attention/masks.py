"""Which attention entries a transfer loss compares, and how many: one definition for every loss path.

An entry ``(b, h, q, k)`` is *valid* when query ``q`` and key ``k`` are real tokens of example ``b``
(not padding) and, for causal attention, ``k`` is not in ``q``'s future. The reference losses
(:mod:`~hf_attn_distill.losses`), the fused kernel (:mod:`~hf_attn_distill.attention.fused`) and the
trainer's gradient-accumulation counts all use the functions here, so a term is always divided by the
count it actually sums over.
"""

from __future__ import annotations

import torch

from hf_attn_distill.config import ATTENTION_LOSSES

__all__ = ["ATTENTION_LOSSES", "attention_loss_count", "attention_valid_mask", "valid_token_count", "recorded_quantity"]


def recorded_quantity(loss: str) -> str:
    """What the teacher's attention is recorded as for ``loss``: ``"scores"`` for ``"mse_scores"``, else
    ``"log_probs"``."""
    if loss not in ATTENTION_LOSSES:
        raise ValueError(f"attention loss must be one of {ATTENTION_LOSSES}, got {loss!r}")
    return "scores" if loss == "mse_scores" else "log_probs"


def attention_valid_mask(
    batch: int,
    num_queries: int,
    num_keys: int,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """``[B, 1, Q, K]`` boolean mask of valid entries, or ``None`` when every entry is valid.

    Args:
        key_mask: ``[B, K]`` (``True``/1 = real token) or ``None`` (all keys real).
        query_mask: ``[B, Q]`` or ``None``; ``None`` with ``Q == K`` means ``key_mask`` (self-attention:
            padded tokens are padded queries too).
        causal: key ``k`` is visible to query ``q`` only if ``k <= q + K - Q``.
    """
    if query_mask is None and key_mask is not None and num_queries == num_keys:
        query_mask = key_mask
    if key_mask is None and query_mask is None and not causal:
        return None
    if device is None:
        device = (
            (key_mask if key_mask is not None else query_mask).device
            if (key_mask is not None or query_mask is not None)
            else "cpu"
        )
    valid = torch.ones(batch, 1, num_queries, num_keys, dtype=torch.bool, device=device)
    if key_mask is not None:
        valid &= key_mask.bool().reshape(batch, 1, 1, num_keys)
    if query_mask is not None:
        valid &= query_mask.bool().reshape(batch, 1, num_queries, 1)
    if causal:
        valid &= torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(num_keys - num_queries)
    return valid


def attention_loss_count(
    loss: str,
    num_heads: int,
    batch: int,
    num_queries: int,
    num_keys: int,
    key_mask: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    causal: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Float32 scalar: how many items ``loss`` averages over.

    ``"kl"`` averages over (head, query) rows that have at least one valid key; the MSE kinds over valid
    (head, query, key) entries. Masks as in :func:`attention_valid_mask`.
    """
    if query_mask is None and key_mask is not None and num_queries == num_keys:
        query_mask = key_mask
    if key_mask is None and query_mask is None and not causal:
        per_head = batch * num_queries * (1 if loss == "kl" else num_keys)
        return torch.tensor(float(per_head * num_heads), device=device)
    if device is None:
        device = next((m.device for m in (key_mask, query_mask) if m is not None), "cpu")
    # O(B (Q + K)), never a [B, Q, K] mask: valid keys per query row from a running count over keys
    keys = key_mask.bool() if key_mask is not None else torch.ones(batch, num_keys, dtype=torch.bool, device=device)
    if causal:
        seen = torch.cumsum(keys.long(), dim=-1)  # valid keys among 0..k
        last = torch.arange(num_queries, device=device) + (num_keys - num_queries)  # last key each query may see
        per_row = torch.where(last >= 0, seen[:, last.clamp(0, num_keys - 1)], 0)
    else:
        per_row = keys.long().sum(-1, keepdim=True).expand(batch, num_queries)
    if query_mask is not None:
        per_row = per_row * query_mask.bool()
    per_head = (per_row > 0).sum() if loss == "kl" else per_row.sum()
    return per_head.float() * num_heads


def valid_token_count(inputs) -> torch.Tensor:
    """Valid (non-padding) tokens of a batch: ``attention_mask.sum()``, or every ``input_ids`` entry without a
    mask. What per-token terms (hidden states, relations) average over."""
    mask = inputs.get("attention_mask")
    if torch.is_tensor(mask):
        return mask.sum()
    ids = inputs["input_ids"]
    return torch.tensor(ids.numel(), device=ids.device)
