"""The fused softmax + transfer loss gives the standalone losses' values and gradients."""

import pytest
import torch

import hf_attn_distill.attention.fused as fused_transfer
from hf_attn_distill import TransferTarget, attention_kl_loss, attention_mse_loss, softmax_with_transfer_loss

MIN = torch.finfo(torch.float32).min


def _masks(mode):
    """(key_mask [B, K], query_mask [B, Q] or None, causal, Q) for a batch of 3 with 7 keys."""
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    if mode == "padding":
        return key_mask, None, False, 7
    if mode == "causal":
        return key_mask, None, True, 7
    query_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])  # cross-attention, Q != K
    return key_mask, query_mask, False, 5


def _masked(scores, key_mask, causal):
    blocked = ~key_mask.bool()[:, None, None, :]
    if causal:
        blocked = blocked | torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    return scores.masked_fill(blocked, MIN)


def _reference(scores, teacher, loss, key_mask, query_mask, causal):
    log_s = torch.log_softmax(_masked(scores, key_mask, causal), -1)
    if loss == "kl":
        value = attention_kl_loss(log_s, teacher, key_mask, query_mask, causal)
    elif loss == "mse_probs":
        value = attention_mse_loss(log_s.exp(), teacher.exp(), key_mask, query_mask, causal)
    else:
        value = attention_mse_loss(scores, teacher, key_mask, query_mask, causal)
    return log_s.exp(), value


@pytest.mark.parametrize("block", [1 << 20, 49 * 2, 49], ids=["one-block", "head-blocks", "single-heads"])
@pytest.mark.parametrize("mode", ["padding", "causal", "cross"])
@pytest.mark.parametrize("loss", ["kl", "mse_probs", "mse_scores"])
def test_fused_equals_reference_values_and_gradients(loss, mode, block, monkeypatch):
    monkeypatch.setattr(fused_transfer, "BLOCK_ELEMENTS", block)
    torch.manual_seed(0)
    key_mask, query_mask, causal, num_q = _masks(mode)
    base = torch.randn(3, 4, num_q, 7) * 3
    t_scores = torch.randn(3, 4, num_q, 7) * 3
    teacher = t_scores if loss == "mse_scores" else torch.log_softmax(_masked(t_scores, key_mask, causal), -1)
    mix = torch.randn(3, 4, num_q, 7)  # a downstream use of the probabilities, so both gradient paths matter

    a = base.clone().requires_grad_(True)
    target = TransferTarget(teacher, loss, key_mask, query_mask, causal)
    probs, value = softmax_with_transfer_loss(_masked(a, key_mask, causal), target)
    (value * 0.7 + (probs * mix).sum()).backward()

    b = base.clone().requires_grad_(True)
    ref_probs, ref_value = _reference(b, teacher, loss, key_mask, query_mask, causal)
    (ref_value * 0.7 + (ref_probs * mix).sum()).backward()

    torch.testing.assert_close(probs, ref_probs)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(a.grad).all() and a.grad[:2].abs().sum() > 0


def test_fused_rejects_mismatched_shapes_and_kinds():
    with pytest.raises(ValueError, match="group_teacher_heads"):
        softmax_with_transfer_loss(torch.zeros(1, 2, 3, 3), TransferTarget(torch.zeros(1, 4, 3, 3), "kl"))
    with pytest.raises(ValueError, match="loss must be one of"):
        TransferTarget(torch.zeros(1), "cosine")
