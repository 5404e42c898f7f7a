"""Selective attention capture through the transformers ``AttentionInterface``.

``output_attentions=True`` forces the slow eager path on *every* layer and returns probabilities
*after* attention dropout. Instead we register one attention implementation, ``"hf_attn_distill"``:
layers nobody records run PyTorch's ``scaled_dot_product_attention`` exactly like ``"sdpa"``; the
few layers an :class:`AttentionRecorder` watches compute their scores explicitly and store the
pre-dropout log-probabilities (or raw scores) for the loss. The matching mask function (the one
``"sdpa"`` uses) is registered too, otherwise transformers would silently drop the padding mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .fused_transfer import TransferTarget, softmax_with_transfer_loss

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionRecorder",
    "enable_attention_capture",
    "recording_attention_forward",
]

ATTN_IMPLEMENTATION = "hf_attn_distill"
_SLOT_ATTR = "_hf_attn_distill_slot"
RECORD_KINDS = ("log_probs", "scores")


class AttentionRecorder:
    """Records attention of chosen modules during a forward pass.

    Args:
        modules: attention modules to watch, in the order their records are returned.
        kind: ``"log_probs"`` (``log_softmax`` of masked scores, for KL or MSE on probabilities) or
            ``"scores"`` (raw pre-softmax ``q k^T * scaling``, before masking, TinyBERT-style).

    Use as ``with recorder.record() as records: model(**inputs)``; afterwards ``records`` holds one
    ``[B, H, Q, K]`` float32 tensor per module (with gradient, when the forward had one).

    With ``record(targets=[...])`` (one :class:`~hf_attn_distill.fused_transfer.TransferTarget` per
    module, typically the teacher's records of the same batch) each module instead computes its
    attention-transfer loss inside its softmax (:class:`~hf_attn_distill.fused_transfer.SoftmaxWithTransferLoss`)
    and ``records`` holds one scalar loss per module: no ``[B, H, Q, K]`` tensor outlives the layer.
    """

    def __init__(self, modules: Sequence[nn.Module], kind: str = "log_probs"):
        if kind not in RECORD_KINDS:
            raise ValueError(f"kind must be one of {RECORD_KINDS}, got {kind!r}")
        self.modules = list(modules)
        self.kind = kind

    @contextlib.contextmanager
    def record(
        self, enabled: bool = True, targets: Sequence[TransferTarget] | None = None
    ) -> Iterator[list[torch.Tensor | None]]:
        records: list[torch.Tensor | None] = [None] * len(self.modules)
        if not enabled:
            yield records
            return
        if targets is not None and len(targets) != len(self.modules):
            raise ValueError(f"Got {len(targets)} transfer targets for {len(self.modules)} recorded modules.")
        for slot, module in enumerate(self.modules):
            if getattr(module, _SLOT_ATTR, None) is not None:
                raise RuntimeError("An attention module is already being recorded (nested record() on one model).")
            target = targets[slot] if targets is not None else None
            setattr(module, _SLOT_ATTR, (records, slot, self.kind, target))
        try:
            yield records
        finally:
            for module in self.modules:
                setattr(module, _SLOT_ATTR, None)
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            raise RuntimeError(
                f"Attention modules {missing} of the layer map were not called with the '{ATTN_IMPLEMENTATION}' "
                "attention implementation, so no attention was recorded. The model must dispatch attention "
                "through transformers' AttentionInterface and keep config._attn_implementation set by "
                "enable_attention_capture()."
            )


def recording_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"hf_attn_distill"``.

    Unrecorded modules: identical to transformers' ``sdpa_attention_forward``. Recorded modules:
    explicit ``softmax(q k^T * scaling + mask)`` with the recorded tensor taken *before* dropout.
    """
    slot = getattr(module, _SLOT_ATTR, None)
    if slot is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    records, index, kind, target = slot
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # Scale the (smaller) query rather than the [B, H, Q, K] scores; compute the softmax in float32.
    scores = torch.matmul(query * scaling, key.transpose(-1, -2)).float()
    blocked = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked = ~attention_mask
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        q_len, k_len = query.shape[-2], key.shape[-2]
        if causal and q_len > 1:
            blocked = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
    if target is None and not torch.is_grad_enabled():
        # Teacher side (no autograd): work in cache-sized blocks; only the record is a full-size tensor.
        out, records[index] = _blockwise_attention(query * scaling, key, value, blocked, attention_mask, kind)
        return out.transpose(1, 2).contiguous(), None
    # The plain "scores" record keeps raw scores, so mask a copy; otherwise mask in place (matmul saves no output).
    masked = scores.clone() if kind == "scores" and target is None else scores
    if blocked is not None:
        masked.masked_fill_(blocked, torch.finfo(torch.float32).min)
    elif attention_mask is not None:
        masked.add_(attention_mask.float())
    if target is not None:
        probs, records[index] = softmax_with_transfer_loss(masked, target)
        probs = probs.to(value.dtype)
    else:
        log_probs = torch.log_softmax(masked, dim=-1)
        records[index] = log_probs if kind == "log_probs" else scores
        probs = log_probs.exp().to(value.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, None


def _blockwise_attention(query, key, value, blocked, attention_mask, kind):
    """``softmax(q k^T + mask) v`` without autograd, a few (batch, head) blocks at a time.

    Returns the output ``[B, H, Q, D]`` and the full ``[B, H, Q, K]`` record (log-probabilities, or raw
    scores for ``kind="scores"``); the scores and probabilities of each block are cache-sized
    temporaries instead of three extra full-size tensors.
    """
    batch, heads, num_q, _ = query.shape
    num_k = key.shape[-2]
    record = torch.empty(batch, heads, num_q, num_k, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, heads, num_q, value.shape[-1], dtype=value.dtype, device=query.device)
    step = max(1, _BLOCK_ELEMENTS // (num_q * num_k))
    for b in range(batch):
        for h in range(0, heads, step):
            hs = slice(h, h + step)
            scores = torch.matmul(query[b, hs], key[b, hs].transpose(-1, -2)).float()
            if kind == "scores":
                record[b, hs] = scores
            if blocked is not None:
                scores.masked_fill_(_block_of(blocked, b, hs), _MIN)
            elif attention_mask is not None:
                scores.add_(_block_of(attention_mask, b, hs))
            log_probs = torch.log_softmax(scores, dim=-1)
            if kind == "log_probs":
                record[b, hs] = log_probs
            out[b, hs] = torch.matmul(log_probs.exp_().to(value.dtype), value[b, hs])
    return out, record


def _block_of(mask: torch.Tensor, b: int, hs: slice) -> torch.Tensor:
    """The part of a ``[Q, K]`` or ``[B|1, H|1, Q, K]`` mask that applies to batch ``b``, heads ``hs``."""
    if mask.dim() == 2:
        return mask
    mask = mask[b if mask.shape[0] > 1 else 0]
    return mask[hs] if mask.shape[0] > 1 else mask


_BLOCK_ELEMENTS = 1 << 20
_MIN = torch.finfo(torch.float32).min


def _register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, recording_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable_attention_capture(model: PreTrainedModel) -> None:
    """Switch ``model`` to the ``"hf_attn_distill"`` attention implementation (in place).

    Outside a recording the model computes exactly what ``"sdpa"`` computes. The setting is not
    written to ``config.json``, so saved models load with the default implementation.
    """
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, so its "
            "attention cannot be captured selectively. Use a model that does (BERT, RoBERTa, DistilBERT, ELECTRA, "
            "... in transformers >= 5), or set attention_weight=0 to distill logits only."
        )
    _register()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"{type(model).__name__} refused attention implementation {ATTN_IMPLEMENTATION!r}.")
