"""Chunked token-level KD equals the reference logit KD in value and gradient."""

import pytest
import torch

import hf_attn_distill.terms.token_kd as token_kd
from hf_attn_distill import logit_kd_loss
from hf_attn_distill.terms.token_kd import token_kd_loss


@pytest.mark.parametrize("chunk", [1 << 22, 37 * 3, 37], ids=["one-chunk", "three-rows", "one-row"])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 8.0])
def test_token_kd_equals_reference(chunk, temperature, monkeypatch):
    monkeypatch.setattr(token_kd, "TOKEN_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 37) * 3, torch.randn(3, 5, 37) * 3
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    mix = torch.randn(3, 5, 37)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = token_kd_loss(a, t, temperature, mask)
    want = logit_kd_loss(b, t, temperature, mask)
    (got * 1.3 + (a * mix).sum()).backward()
    (want * 1.3 + (b * mix).sum()).backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.grad[2], mix[2])  # fully padded example: no KD gradient


def test_token_kd_keeps_the_logits_dtype_and_handles_all_masked():
    s = torch.randn(2, 3, 11, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 3, 11, dtype=torch.bfloat16)
    loss = token_kd_loss(s, t, 2.0, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and s.grad.dtype == torch.bfloat16 and s.grad.abs().sum() == 0
    ref = logit_kd_loss(s.float(), t.float(), 2.0)
    assert token_kd_loss(s, t, 2.0).item() == pytest.approx(ref.item(), rel=1e-3)
    with pytest.raises(ValueError, match="vocabulary"):
        token_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
