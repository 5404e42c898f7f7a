"""The causal-LM loss from hidden states (``chunked_lm_loss``): the fused cross-entropy + divergence kernel against
the full logits (values and gradients, any combination of the two), and the trainer's chunked path against its
full-logit path on tiny GPT-2 / Llama / Qwen2 pairs: same terms, same update, no full logits made, nothing left on
the heads."""

import pytest
import torch
import torch.nn.functional as F
from test_decoder_only import FAMILIES, VOCAB, collate, rows, trainer_for

from hf_attn_distill import token_divergence
from hf_attn_distill.terms.divergences import LMHeadSettings, lm_head_losses


def head(vocab, hidden, bias, seed):
    torch.manual_seed(seed)
    module = torch.nn.Linear(hidden, vocab, bias=bias)
    torch.nn.init.normal_(module.weight, std=0.5)
    return module


def reference(s_hidden, s_head, t_hidden, t_head, targets, settings):
    logits, t_logits = s_head(s_hidden), t_head(t_hidden).detach()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    rows = slice(None, settings.vocab_rows)
    kd = (
        token_divergence(
            logits[:, rows],
            t_logits[:, rows],
            settings.divergence,
            settings.temperature,
            settings.jsd_beta,
            settings.skew_alpha,
        ).sum()
        * settings.temperature**2
    )
    return ce, kd


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl"])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0), (0.3, 2.0)])
@pytest.mark.parametrize("backprop", ["weighted", "ce_only", "kd_only"])
def test_both_sums_and_every_combination_of_their_gradients_equal_the_full_logits(divergence, weights, backprop):
    """The gradient prepared in forward serves the weighted sum it was prepared for; any other combination (one
    term alone, other weights) is computed anew: both equal autograd through the full logits."""
    s_head, t_head = head(300, 16, True, 0), head(310, 24, False, 1)
    torch.manual_seed(2)
    s_hidden = torch.randn(37, 16, requires_grad=True)
    t_hidden, targets = torch.randn(37, 24), torch.randint(0, 300, (37,))
    settings = LMHeadSettings(divergence, 2.0, 0.3, 0.2, 5, 300, *weights)
    ce, kd = lm_head_losses(s_hidden, s_head, t_hidden, t_head, targets, settings)
    s_hidden2 = s_hidden.detach().clone().requires_grad_(True)
    ce_ref, kd_ref = reference(s_hidden2, s_head, t_hidden, t_head, targets, settings)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
    combine = {
        "weighted": lambda a, b: 0.25 * (weights[0] * a + weights[1] * b),  # the trainer's form: weight x scale
        "ce_only": lambda a, b: a * 0.7,
        "kd_only": lambda a, b: b * 1.3,
    }[backprop]
    params = [s_hidden, *s_head.parameters()]
    got = torch.autograd.grad(combine(ce, kd), params, allow_unused=True)
    want = torch.autograd.grad(combine(ce_ref, kd_ref), [s_hidden2, *s_head.parameters()], allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_ignored_targets_add_nothing_to_the_sums_or_the_gradients(divergence):
    """Rows whose target is -100 count in the divergence but not in the cross-entropy, as ``F.cross_entropy``
    (the closed-form forward-KL gradient and the autograd one of the other divergences alike)."""
    s_head, t_head = head(200, 12, True, 3), head(200, 20, False, 4)
    torch.manual_seed(5)
    s_hidden = torch.randn(23, 12, requires_grad=True)
    t_hidden, targets = torch.randn(23, 20), torch.randint(0, 200, (23,))
    targets[::3] = -100
    settings = LMHeadSettings(divergence, 1.5, 0.5, 0.1, 4, None, 0.6, 0.4)
    ce, kd = lm_head_losses(s_hidden, s_head, t_hidden, t_head, targets, settings)
    s_hidden2 = s_hidden.detach().clone().requires_grad_(True)
    ce_ref, kd_ref = reference(s_hidden2, s_head, t_hidden, t_head, targets, settings)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(0.6 * ce + 0.4 * kd, [s_hidden, *s_head.parameters()])
    want = torch.autograd.grad(0.6 * ce_ref + 0.4 * kd_ref, [s_hidden2, *s_head.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("vocab_rows", [None, 180])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_the_forward_kl_kernel_equals_the_full_logits_at_every_temperature_and_width(temperature, vocab_rows, weights):
    """The closed-form forward-KL + CE kernel (at ``T = 1`` one softmax serves both terms; with ``vocab_rows`` the
    teacher's term covers the first columns only; ignored targets in between): sums and gradients equal autograd
    through the full logits, for the weighted sum it prepared and for the terms alone."""
    s_head, t_head = head(200, 12, True, 6), head(200, 20, True, 7)
    torch.manual_seed(8)
    s_hidden = torch.randn(29, 12, requires_grad=True)
    t_hidden, targets = torch.randn(29, 20), torch.randint(0, 200, (29,))
    targets[1::4] = -100
    settings = LMHeadSettings("forward_kl", temperature, 0.5, 0.1, 6, vocab_rows, *weights)
    for combine in (lambda a, b: weights[0] * a + weights[1] * b, lambda a, b: 0.7 * a + 1.3 * b):
        ce, kd = lm_head_losses(s_hidden, s_head, t_hidden, t_head, targets, settings)
        s_hidden2 = s_hidden.detach().clone().requires_grad_(True)
        ce_ref, kd_ref = reference(s_hidden2, s_head, t_hidden, t_head, targets, settings)
        torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kd, kd_ref, rtol=1e-5, atol=1e-5)
        got = torch.autograd.grad(combine(ce, kd), [s_hidden, *s_head.parameters()])
        want = torch.autograd.grad(combine(ce_ref, kd_ref), [s_hidden2, *s_head.parameters()])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_without_targets_or_teacher_only_the_other_sum_is_made():
    s_head, t_head = head(50, 8, False, 0), head(50, 8, False, 1)
    hidden, t_hidden, targets = torch.randn(9, 8, requires_grad=True), torch.randn(9, 8), torch.randint(0, 50, (9,))
    ce, kd = lm_head_losses(hidden, s_head, None, None, targets, LMHeadSettings(chunk_tokens=4))
    assert kd.item() == 0 and ce.item() == pytest.approx(
        F.cross_entropy(s_head(hidden), targets, reduction="sum").item()
    )
    ce, kd = lm_head_losses(hidden, s_head, t_hidden, t_head, None, LMHeadSettings(chunk_tokens=4))
    assert ce.item() == 0 and kd.item() == pytest.approx(
        token_divergence(s_head(hidden), t_head(t_hidden)).sum().item()
    )


def step_update(trainer):
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {k: v - start[k] for k, v in trainer.model.state_dict().items()}, log


@pytest.mark.parametrize(
    "family, divergence", [*((family, "forward_kl") for family in FAMILIES), ("llama", "jsd"), ("gpt2", "reverse_kl")]
)
def test_the_chunked_lm_loss_trains_as_the_full_logits(family, divergence, tmp_path):
    """One SGD step over padded batches split 2 x 4: the chunked path (4-token chunks) logs the same terms and
    makes the same update as the full-logit path; its heads never return more than the last position, and
    nothing stays on them after training."""
    settings = dict(divergence=divergence, alpha_ce=0.4, alpha_kd=0.6, decoder_layer_map=None)
    chunked = trainer_for(family, tmp_path / "chunked", 2, 4, lm_chunk_tokens=4, **settings)
    full = trainer_for(family, tmp_path / "full", 2, 4, chunked_lm_loss=False, **settings)
    shapes = []
    head = chunked.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: shapes.append((*out.shape, a[0].is_contiguous())))
    got_delta, got_log = step_update(chunked)
    handle.remove()
    want_delta, want_log = step_update(full)
    assert shapes and all(shape[1] == 1 for shape in shapes)  # [B, 1, V]: no full logits
    assert all(shape[-1] for shape in shapes)  # the last position handed over contiguous (a plain GEMM, no bmm)
    largest = max(d.abs().max().item() for d in want_delta.values())
    assert largest > 1e-5
    for key, delta in want_delta.items():
        torch.testing.assert_close(got_delta[key], delta, atol=1e-4 * largest, rtol=1e-4, msg=key)
    for term in ("loss", "loss_ce", "loss_kd"):
        assert got_log[term] == pytest.approx(want_log[term], rel=1e-5), term
    for model in (chunked.model, chunked.teacher_model):
        assert not model.get_output_embeddings()._forward_pre_hooks


def test_the_chunked_terms_equal_the_models_own_loss_and_the_shifted_kd(tmp_path):
    """Evaluation terms of the chunked path: loss_ce is the student's own loss, loss_kd the KL at position t where
    token t + 1 counts, over the full logits."""
    trainer = trainer_for("llama", tmp_path, decoder_layer_map=None, alpha_kd=0.5, alpha_ce=0.5)
    student, teacher = trainer.model, trainer.teacher_model
    batch = collate(rows()[:4])
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(batch))
        got = trainer.accounting.pop_means("eval")
        s_logits, t_logits = student(**batch).logits, teacher(**batch).logits
        own = student(**batch).loss
    valid = batch["labels"][:, 1:].ne(-100)
    kd = token_divergence(s_logits[:, :-1][valid], t_logits[:, :-1][valid], "forward_kl", 2.0).mean() * 4
    assert got["loss_ce"] == pytest.approx(own.item(), rel=1e-5)
    assert got["loss_kd"] == pytest.approx(kd.item(), rel=1e-5)


def test_a_model_that_transforms_its_logits_after_the_head_is_refused_naming_the_fix(tmp_path):
    trainer = trainer_for("llama", tmp_path, decoder_layer_map=None)
    original = type(trainer.model).forward

    def scaled(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    trainer.model.forward = scaled.__get__(trainer.model)
    with pytest.raises(ValueError, match="set chunked_lm_loss=False"):
        trainer.compute_loss(trainer.model, dict(collate(rows()[:2])))


def test_a_known_head_transform_falls_back_to_full_logits(tmp_path, caplog):
    trainer = trainer_for("llama", tmp_path, decoder_layer_map=None)
    student = FAMILIES["llama"](2, 2, 1)
    student.config.final_logit_softcapping = 30.0
    from hf_attn_distill import DistillTrainer

    with caplog.at_level("WARNING"):
        again = DistillTrainer(model=student, teacher_model=trainer.teacher_model, args=trainer.args)
    assert again.objective("loss_kd").head_pass is None
    assert "final_logit_softcapping=30.0" in caplog.text and VOCAB == 500


def test_a_divergence_other_than_forward_kl_is_refused_for_class_logits(tmp_path):
    from conftest import one_sgd_step, tiny_classifier
    from datasets import Dataset

    from hf_attn_distill import DistillConfig, DistillTrainer

    args = DistillConfig(**one_sgd_step(tmp_path, 2, 1, divergence="reverse_kl", layer_map=None))
    data = Dataset.from_list([{"input_ids": [1, 5, 6, 2], "attention_mask": [1] * 4, "labels": 1}] * 2)
    trainer = DistillTrainer(model=tiny_classifier(1), teacher_model=tiny_classifier(0), args=args, train_dataset=data)
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    with pytest.raises(ValueError, match="use divergence='forward_kl'"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_chunked_update(reentrant, tmp_path):
    """Checkpointed decoder layers re-run in backward; the head's hidden states are outside them: the same update."""
    kwargs = dict(layer_map=None, decoder_layer_map=None, lm_chunk_tokens=4)
    plain, _ = step_update(trainer_for("llama", tmp_path / "plain", 2, 4, **kwargs))
    checkpointed, _ = step_update(
        trainer_for(
            "llama",
            tmp_path / "ckpt",
            2,
            4,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
            **kwargs,
        )
    )
    largest = max(d.abs().max().item() for d in plain.values())
    for key, delta in plain.items():
        torch.testing.assert_close(checkpointed[key], delta, atol=1e-5 * largest, rtol=1e-5, msg=key)


def test_bfloat16_hidden_states_meet_a_float32_head_in_its_dtype():
    """Under autocast a model's last hidden states may be bfloat16 while its head is float32: the sums are the
    float32 ones of those hidden states, and their gradient comes back in the hidden states' dtype."""
    torch.manual_seed(0)
    head, t_head = torch.nn.Linear(16, 40), torch.nn.Linear(24, 40)
    hidden = torch.randn(9, 16).bfloat16().requires_grad_(True)
    t_hidden = torch.randn(9, 24).bfloat16()
    targets = torch.randint(0, 40, (9,))
    settings = LMHeadSettings(temperature=2.0, chunk_tokens=4, ce_weight=0.5, kd_weight=0.5)
    ce, kd = lm_head_losses(hidden, head, t_hidden, t_head, targets, settings)
    wide = hidden.detach().float().requires_grad_(True)
    want_ce, want_kd = lm_head_losses(wide, head, t_hidden.float(), t_head, targets, settings)
    torch.testing.assert_close((ce, kd), (want_ce, want_kd))
    (grad,) = torch.autograd.grad(0.5 * ce + 0.5 * kd, hidden)
    (want,) = torch.autograd.grad(0.5 * want_ce + 0.5 * want_kd, wide)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), want.bfloat16().float())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_under_bfloat16_autocast_the_chunked_loss_trains_as_the_full_logits(family, tmp_path):
    """``bf16=True`` (autocast): the head ran in bfloat16, so the check of the model's own logits allows that
    rounding (it refused every bf16 run before), and the chunked terms and update match the full logits' to it."""
    deltas, logs = [], []
    for chunked in (True, False):
        trainer = trainer_for(family, tmp_path / str(chunked), bf16=True, chunked_lm_loss=chunked)
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        deltas.append({k: v - start[k] for k, v in trainer.model.state_dict().items()})
        logs.append(next(e for e in trainer.state.log_history if "loss" in e))
    for term in ("loss_ce", "loss_kd"):
        assert logs[0][term] == pytest.approx(logs[1][term], rel=1e-3), term
    largest = max(d.abs().max().item() for d in deltas[1].values())
    for key, value in deltas[1].items():
        torch.testing.assert_close(deltas[0][key], value, atol=2e-2 * largest, rtol=2e-2, msg=key)
