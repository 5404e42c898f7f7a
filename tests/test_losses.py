import math

import pytest
import torch
import torch.nn.functional as F

from hf_attn_distill import attention_kl_loss, attention_mse_loss, group_teacher_heads, logit_kd_loss


def _log_probs(scores, key_mask=None):
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


# ---- logit KD ----


def test_logit_kd_zero_for_identical():
    logits = torch.randn(5, 3)
    assert logit_kd_loss(logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_hand_computed():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher probs at T=1: (0.75, 0.25)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert logit_kd_loss(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)
    # T=2 softens the teacher to softmax(t/2) and multiplies by T^2 = 4
    p = torch.softmax(t / 2, -1)[0]
    expected_t2 = 4 * float((p * (p.log() - math.log(0.5))).sum())
    assert logit_kd_loss(s, t, temperature=2.0).item() == pytest.approx(expected_t2, rel=1e-5)


def test_logit_kd_mask_excludes_items():
    s = torch.randn(2, 4, 7)
    t = torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool()
    full = logit_kd_loss(s[mask], t[mask], 1.5)
    assert logit_kd_loss(s, t, 1.5, mask).item() == pytest.approx(full.item(), rel=1e-6)


def test_logit_kd_regression_head_is_mse():
    s, t = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
    assert logit_kd_loss(s, t, 2.0).item() == pytest.approx((1 + 4) / 2)


def test_logit_kd_shape_mismatch_names_fix():
    with pytest.raises(ValueError, match="num_labels"):
        logit_kd_loss(torch.randn(2, 3), torch.randn(2, 2))


def test_logit_kd_gradient_reaches_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    logit_kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ---- attention KL ----


def test_attention_kl_zero_for_identical():
    lp = _log_probs(torch.randn(2, 3, 5, 5))
    assert attention_kl_loss(lp, lp.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_hand_computed():
    # one batch, one head, one query, two keys
    s = torch.log(torch.tensor([0.5, 0.5])).view(1, 1, 1, 2)
    t = torch.log(torch.tensor([0.9, 0.1])).view(1, 1, 1, 2)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert attention_kl_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_attention_kl_matches_torch_kl_div_per_row():
    s = _log_probs(torch.randn(2, 4, 6, 6))
    t = _log_probs(torch.randn(2, 4, 6, 6))
    ref = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
    assert attention_kl_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-5)


def test_attention_losses_ignore_padding():
    torch.manual_seed(0)
    s_scores, t_scores = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    base_kl = attention_kl_loss(_log_probs(s_scores), _log_probs(t_scores))
    base_mse = attention_mse_loss(s_scores, t_scores)
    # pad to length 7 with random junk at padded positions
    pad_s, pad_t = torch.randn(1, 2, 7, 7) * 50, torch.randn(1, 2, 7, 7) * 50
    pad_s[..., :4, :4], pad_t[..., :4, :4] = s_scores, t_scores
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    kl = attention_kl_loss(_log_probs(pad_s, mask), _log_probs(pad_t, mask), mask)
    mse = attention_mse_loss(pad_s, pad_t, mask)
    assert kl.item() == pytest.approx(base_kl.item(), rel=1e-5)
    assert mse.item() == pytest.approx(base_mse.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_kl_no_nan_for_fully_padded_rows(dtype):
    scores = torch.randn(2, 2, 5, 5).to(dtype)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])  # second example fully padded
    s = _log_probs(scores, mask).requires_grad_(True)
    t = _log_probs(scores.flip(-1), mask)
    loss = attention_kl_loss(s, t, mask) + attention_mse_loss(s.exp(), t.exp(), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.isfinite(attention_kl_loss(s, t, torch.zeros(2, 5)))  # everything padded


def test_attention_kl_gradient_reaches_student_only():
    s = _log_probs(torch.randn(1, 2, 3, 3)).detach().requires_grad_(True)
    t = _log_probs(torch.randn(1, 2, 3, 3)).detach().requires_grad_(True)
    attention_kl_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_attention_mse_hand_computed_and_zero():
    s = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert attention_mse_loss(s, t).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert attention_mse_loss(t, t.clone()).item() == 0.0
    mask = torch.tensor([[1, 0]])  # only query 0 / key 0 valid
    assert attention_mse_loss(s, t, mask).item() == pytest.approx(1.0)


def test_attention_shape_mismatch_raises():
    with pytest.raises(ValueError, match="group_teacher_heads"):
        attention_kl_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))


# ---- head grouping ----


def test_group_teacher_heads_log_probs_is_mean_of_probs():
    t = _log_probs(torch.randn(2, 6, 3, 3))
    grouped = group_teacher_heads(t, 2, "log_probs")
    expected = t.exp().unflatten(1, (2, 3)).mean(2)
    assert torch.allclose(grouped.exp(), expected, atol=1e-6)
    assert torch.allclose(grouped.exp().sum(-1), torch.ones(2, 2, 3), atol=1e-6)
    scores = torch.randn(1, 4, 2, 2)
    assert torch.allclose(group_teacher_heads(scores, 2, "scores"), scores.unflatten(1, (2, 2)).mean(2))


def test_group_teacher_heads_rejects_non_multiple():
    with pytest.raises(ValueError, match="multiple"):
        group_teacher_heads(torch.zeros(1, 6, 2, 2), 4, "log_probs")


# ---- the fused autograd functions agree with the plain formulas, values and gradients ----


def _reference_kl(log_s, log_t, key_mask, query_mask):
    k = key_mask.bool()[:, None, None, :]
    q = query_mask.bool()[:, None, :, None]
    row = (log_t.exp() * (log_t - log_s)).masked_fill(~k, 0.0).sum(-1, keepdim=True)
    q = q.expand_as(row).float()
    return (row * q).sum() / q.sum()


def _reference_mse(s, t, key_mask, query_mask):
    valid = (key_mask.bool()[:, None, None, :] & query_mask.bool()[:, None, :, None]).expand_as(s).float()
    return ((s - t).pow(2) * valid).sum() / valid.sum()


def test_fused_attention_losses_match_plain_autograd():
    torch.manual_seed(1)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    query_mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 0]])  # differs from key_mask on purpose
    scores_t = torch.randn(2, 3, 6, 6)
    log_t = _log_probs(scores_t, key_mask)
    for fused, reference, make in (
        (attention_kl_loss, _reference_kl, lambda x: _log_probs(x, key_mask)),
        (attention_mse_loss, _reference_mse, lambda x: x),
    ):
        base = torch.randn(2, 3, 6, 6)
        a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
        target = log_t if fused is attention_kl_loss else scores_t
        got = fused(make(a), target, key_mask, query_mask)
        want = reference(make(b), target, key_mask, query_mask)
        got.backward()
        want.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(a.grad, b.grad, atol=1e-6), fused.__name__
        assert a.grad.abs().sum() > 0


def test_attention_kl_teacher_zero_probability_keys_give_no_nan():
    # a teacher that gives key 2 exactly zero mass (log p = -inf), the student some
    log_t = torch.log(torch.tensor([0.5, 0.5, 0.0])).view(1, 1, 1, 3)
    log_s = torch.log(torch.tensor([0.25, 0.25, 0.5])).view(1, 1, 1, 3).requires_grad_(True)
    loss = attention_kl_loss(log_s, log_t)
    loss.backward()
    assert loss.item() == pytest.approx(2 * 0.5 * math.log(0.5 / 0.25), rel=1e-6)
    assert torch.isfinite(log_s.grad).all() and log_s.grad[0, 0, 0, 2] == 0


def test_fused_losses_accept_teacher_tensors_from_inference_mode():
    with torch.inference_mode():
        log_t = _log_probs(torch.randn(1, 2, 4, 4))
    s = torch.randn(1, 2, 4, 4, requires_grad=True)
    (attention_kl_loss(_log_probs(s), log_t) + attention_mse_loss(s, log_t)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ---- causal masks and counts (each term divided by what it sums over) ----


def test_causal_mse_counts_only_visible_entries():
    # 4x4 causal, one head, no padding: 10 visible entries, each with squared difference 1
    student, teacher = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert attention_mse_loss(student, teacher, causal=True).item() == pytest.approx(1.0)
    # future entries do not count, whatever they hold
    teacher[..., torch.ones(4, 4, dtype=torch.bool).triu(1)] = 100.0
    assert attention_mse_loss(student, teacher, causal=True).item() == pytest.approx(1.0)


def test_causal_kl_hand_computed():
    # query 0 sees key 0 only (KL 0); query 1 sees keys 0, 1: teacher (0.9, 0.1), student (0.5, 0.5)
    neg = float("-inf")
    s = torch.tensor([[0.0, neg], [math.log(0.5), math.log(0.5)]]).view(1, 1, 2, 2)
    t = torch.tensor([[0.0, neg], [math.log(0.9), math.log(0.1)]]).view(1, 1, 2, 2)
    expected = (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2  # mean over the 2 query rows
    assert attention_kl_loss(s, t, causal=True).item() == pytest.approx(expected, rel=1e-5)


def test_attention_loss_count_per_kind():
    from hf_attn_distill import attention_loss_count

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert attention_loss_count("kl", 2, 2, 4, 4, mask).item() == 2 * (3 + 2)
    assert attention_loss_count("mse_scores", 2, 2, 4, 4, mask).item() == 2 * (9 + 4)
    assert attention_loss_count("mse_probs", 1, 2, 4, 4, mask, causal=True).item() == (1 + 2 + 3) + (1 + 2)
    queries = torch.tensor([[1, 1, 0], [1, 0, 0]])  # cross-attention: 3 target queries over 4 source keys
    assert attention_loss_count("mse_scores", 1, 2, 3, 4, mask, queries).item() == 2 * 3 + 1 * 2
    assert attention_loss_count("kl", 3, 2, 4, 4).item() == 3 * 8


@pytest.mark.parametrize("loss", ["kl", "mse_scores"])
@pytest.mark.parametrize("num_q, num_k", [(6, 6), (4, 7), (7, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_loss_count_equals_the_valid_mask_it_never_builds(loss, num_q, num_k, causal):
    """attention_loss_count counts from the [B, K] / [B, Q] masks; the same as counting the [B, 1, Q, K] mask."""
    from hf_attn_distill.attention.masks import attention_loss_count, attention_valid_mask

    g = torch.Generator().manual_seed(num_q * 10 + num_k)
    key = torch.rand(3, num_k, generator=g) > 0.3
    query = torch.rand(3, num_q, generator=g) > 0.3
    key[0, :] = False  # an example with no valid key at all
    for k, q in ((key, query), (key, None), (None, query), (None, None)):
        if q is None and k is not None and num_q != num_k:
            continue
        valid = attention_valid_mask(3, num_q, num_k, k, q, causal)
        if valid is None:
            valid = torch.ones(3, 1, num_q, num_k, dtype=torch.bool)
        want = (valid.any(-1).sum() if loss == "kl" else valid.sum()) * 5
        assert attention_loss_count(loss, 5, 3, num_q, num_k, k, q, causal).item() == want.item()
