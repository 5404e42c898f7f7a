"""The fused softmax + transfer loss gives the standalone losses' values and gradients."""

import pytest
import torch

from hf_attn_distill import TransferTarget, attention_kl_loss, attention_mse_loss, softmax_with_transfer_loss

MIN = torch.finfo(torch.float32).min


def _masked(scores, key_mask):
    return scores.masked_fill(~key_mask.bool()[:, None, None, :], MIN)


def _reference(scores, teacher, loss, key_mask):
    masked = _masked(scores, key_mask)
    log_s = torch.log_softmax(masked, -1)
    if loss == "kl":
        value = attention_kl_loss(log_s, teacher, key_mask)
    elif loss == "mse_probs":
        value = attention_mse_loss(log_s.exp(), teacher.exp(), key_mask)
    else:
        value = attention_mse_loss(scores, teacher, key_mask)
    return log_s.exp(), value


@pytest.mark.parametrize("loss", ["kl", "mse_probs", "mse_scores"])
def test_fused_equals_standalone_values_and_gradients(loss):
    torch.manual_seed(0)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]])
    base = torch.randn(3, 4, 7, 7) * 3
    t_scores = torch.randn(3, 4, 7, 7) * 3
    teacher = t_scores if loss == "mse_scores" else torch.log_softmax(_masked(t_scores, key_mask), -1)
    mix = torch.randn(3, 4, 7, 7)  # a downstream use of the probabilities, so both gradient paths matter

    a = base.clone().requires_grad_(True)
    probs, value = softmax_with_transfer_loss(_masked(a, key_mask), TransferTarget(teacher, loss, key_mask))
    (value * 0.7 + (probs * mix).sum()).backward()

    b = base.clone().requires_grad_(True)
    ref_probs, ref_value = _reference(b, teacher, loss, key_mask)
    (ref_value * 0.7 + (ref_probs * mix).sum()).backward()

    torch.testing.assert_close(probs, ref_probs)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(a.grad).all() and a.grad[:2].abs().sum() > 0


def test_fused_chunking_does_not_change_result(monkeypatch):
    import hf_attn_distill.losses as losses

    torch.manual_seed(1)
    scores, teacher = torch.randn(2, 3, 5, 5), torch.log_softmax(torch.randn(2, 3, 5, 5), -1)
    results = []
    for chunk in (1 << 20, 25):  # one chunk, then one (batch, head) row block per chunk
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk)
        x = scores.clone().requires_grad_(True)
        probs, value = softmax_with_transfer_loss(x, TransferTarget(teacher, "kl"))
        (value + probs.pow(2).sum()).backward()
        results.append((value.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_fused_rejects_mismatched_shapes_and_kinds():
    with pytest.raises(ValueError, match="group_teacher_heads"):
        softmax_with_transfer_loss(torch.zeros(1, 2, 3, 3), TransferTarget(torch.zeros(1, 4, 3, 3), "kl"))
    with pytest.raises(ValueError, match="loss must be one of"):
        TransferTarget(torch.zeros(1), "cosine")
