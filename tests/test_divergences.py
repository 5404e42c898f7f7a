"""Token-level LM divergences against their formulas (values and gradients, float64 references), and the chunked
loss from hidden states against the divergence of the full logits."""

import pytest
import torch
import torch.nn.functional as F

from hf_attn_distill.terms.divergences import DIVERGENCES, chunked_lm_divergence, token_divergence


def reference(student, teacher, kind, temperature, beta, alpha):
    """The formulas of the module docstring in float64, with probabilities (not log-probabilities)."""
    p_s = torch.softmax(student.double() / temperature, -1)
    p_t = torch.softmax(teacher.double() / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        return kl(p_t, p_s)
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if kind == "skew_kl":
        return kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    return kl(p_s, alpha * p_s + (1 - alpha) * p_t)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_divergence_equals_its_formula_with_its_gradient(kind, temperature):
    torch.manual_seed(0)
    student = (torch.randn(6, 11) * 2).requires_grad_(True)
    teacher = torch.randn(6, 11) * 2
    got = token_divergence(student, teacher, kind, temperature, jsd_beta=0.3, skew_alpha=0.2)
    student64 = student.detach().double().requires_grad_(True)
    want = reference(student64, teacher, kind, temperature, 0.3, 0.2)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(got.sum(), student)
    (grad64,) = torch.autograd.grad(want.sum(), student64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
    assert (want > 0).all()  # different distributions: every token diverges


def test_the_generalized_jsd_ends_are_the_two_kls_and_its_middle_is_symmetric():
    torch.manual_seed(1)
    a, b = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(token_divergence(a, b, "jsd", jsd_beta=0.0), token_divergence(a, b, "forward_kl"))
    torch.testing.assert_close(token_divergence(a, b, "jsd", jsd_beta=1.0), token_divergence(a, b, "reverse_kl"))
    torch.testing.assert_close(token_divergence(a, b, "jsd", jsd_beta=0.5), token_divergence(b, a, "jsd", jsd_beta=0.5))
    assert (token_divergence(a, a.clone(), "jsd").abs() < 1e-6).all()
    with pytest.raises(ValueError, match="Unknown divergence 'tvd'"):
        token_divergence(a, b, "tvd")


def heads(vocab, hidden, bias, seed):
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    torch.nn.init.normal_(head.weight, std=0.5)
    return head


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [5, 4096])
def test_the_chunked_loss_equals_the_divergence_of_the_full_logits(kind, bias, chunk):
    """Value and gradients (student hidden states, head weight and bias) of the chunked loss equal those of the
    masked mean over the full logits, times T²; the teacher gets no gradient."""
    s_head, t_head = heads(300, 16, bias, 0), heads(300, 24, bias, 1)
    torch.manual_seed(2)
    s_hidden = torch.randn(3, 13, 16, requires_grad=True)
    t_hidden = torch.randn(3, 13, 24)
    mask = torch.rand(3, 13) > 0.3
    got = chunked_lm_divergence(s_hidden, s_head, t_hidden, t_head, mask, kind, temperature=2.0, chunk_tokens=chunk)
    grads = torch.autograd.grad(got, [s_hidden, *s_head.parameters()])
    s_hidden2 = s_hidden.detach().clone().requires_grad_(True)
    full = token_divergence(s_head(s_hidden2)[mask], t_head(t_hidden)[mask], kind, temperature=2.0).mean() * 4.0
    want = torch.autograd.grad(full, [s_hidden2, *s_head.parameters()])
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-7)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in t_head.parameters())


def test_a_tied_head_gets_its_gradient_and_a_padded_vocabulary_is_compared_over_its_rows():
    """A head tied to the input embedding passes its gradient to the embedding; ``vocab_rows`` compares the first
    rows of both heads, as the full logits sliced to them."""
    embedding = torch.nn.Embedding(310, 16)
    s_head = torch.nn.Linear(16, 310, bias=False)
    s_head.weight = embedding.weight  # tied
    t_head = heads(320, 8, False, 3)
    torch.manual_seed(4)
    s_hidden, t_hidden = torch.randn(20, 16), torch.randn(20, 8)
    got = chunked_lm_divergence(s_hidden, s_head, t_hidden, t_head, None, "forward_kl", chunk_tokens=7, vocab_rows=300)
    (grad,) = torch.autograd.grad(got, [embedding.weight])
    full = token_divergence(s_head(s_hidden)[:, :300], t_head(t_hidden)[:, :300], "forward_kl").mean()
    (want,) = torch.autograd.grad(full, [embedding.weight])
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)
    assert grad[300:].abs().sum() == 0  # rows past the compared vocabulary get nothing


def test_no_logits_of_more_than_one_chunk_of_tokens_exist(monkeypatch):
    """Every head projection the chunked loss makes, forward and backward, covers at most ``chunk_tokens`` rows."""
    shapes = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: shapes.append(tuple(x.shape)) or linear(x, w, b))
    s_head, t_head = heads(500, 16, True, 0), heads(500, 16, True, 1)
    s_hidden = torch.randn(100, 16, requires_grad=True)
    loss = chunked_lm_divergence(s_hidden, s_head, torch.randn(100, 16), t_head, None, "jsd", chunk_tokens=8)
    loss.backward()
    assert shapes and max(rows for rows, _ in shapes) <= 8 and s_hidden.grad is not None
