"""No NaN or inf anywhere on the grid of hard cases: padding, peaked and flat teachers, temperatures, bf16."""

import itertools

import pytest
import torch

from hf_attn_distill import (
    TransferTarget,
    attention_kl_loss,
    attention_mse_loss,
    logit_kd_loss,
    softmax_with_transfer_loss,
    token_kd_loss,
)

MIN = torch.finfo(torch.float32).min
KEY_MASKS = {
    "none": None,
    "padded": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    "fully-padded-row": torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]),
}
TEACHERS = {
    "random": lambda: torch.randn(2, 3, 5, 5) * 3,
    "one-hot": lambda: torch.full((2, 3, 5, 5), -1e4).index_fill_(-1, torch.tensor([0]), 1e4),
    "flat": lambda: torch.zeros(2, 3, 5, 5),
}


def _masked(scores, key_mask, causal):
    blocked = torch.zeros(scores.shape[-2:], dtype=torch.bool)
    if causal:
        blocked = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    if key_mask is not None:
        blocked = blocked | ~key_mask.bool()[:, None, None, :]
    return scores.masked_fill(blocked, MIN)


@pytest.mark.parametrize("loss", ["kl", "mse_scores", "mse_probs"])
@pytest.mark.parametrize("teacher_kind", list(TEACHERS))
@pytest.mark.parametrize("mask_kind", list(KEY_MASKS))
@pytest.mark.parametrize("causal", [False, True])
def test_attention_losses_stay_finite(loss, teacher_kind, mask_kind, causal):
    torch.manual_seed(0)
    key_mask = KEY_MASKS[mask_kind]
    t_scores = TEACHERS[teacher_kind]()
    teacher = t_scores if loss == "mse_scores" else torch.log_softmax(_masked(t_scores, key_mask, causal), -1)
    for dtype in (torch.float32, torch.bfloat16):
        s = (torch.randn(2, 3, 5, 5) * 3).to(dtype).requires_grad_(True)
        probs, value = softmax_with_transfer_loss(
            _masked(s.float(), key_mask, causal), TransferTarget(teacher, loss, key_mask, causal=causal)
        )
        (value + probs.sum()).backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all(), (dtype, loss)
        ref_input = torch.log_softmax(_masked(s.detach().float(), key_mask, causal), -1)
        if loss == "kl":
            ref = attention_kl_loss(ref_input, teacher, key_mask, causal=causal)
        elif loss == "mse_probs":
            ref = attention_mse_loss(ref_input.exp(), teacher.exp(), key_mask, causal=causal)
        else:
            ref = attention_mse_loss(s.detach().float(), teacher, key_mask, causal=causal)
        assert value.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "temperature, teacher_kind", list(itertools.product([0.5, 1.0, 4.0, 20.0], ["random", "one-hot", "flat"]))
)
def test_logit_kd_stays_finite(temperature, teacher_kind):
    torch.manual_seed(0)
    t = {
        "random": torch.randn(4, 6, 7) * 5,
        "one-hot": torch.full((4, 6, 7), -1e4).index_fill_(-1, torch.tensor([2]), 1e4),
        "flat": torch.zeros(4, 6, 7),
    }[teacher_kind]
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0] = False  # a fully padded example
    for dtype in (torch.float32, torch.bfloat16):
        for fn in (logit_kd_loss, token_kd_loss):
            s = (torch.randn(4, 6, 7) * 5).to(dtype).requires_grad_(True)
            value = fn(s, t.to(dtype), temperature, mask)
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(s.grad.float()).all(), (fn.__name__, dtype)
            assert s.grad[0].abs().max() == 0  # the padded example gets no gradient


def test_bf16_autocast_training_step_is_finite(tmp_path, tokenizer, sentiment_dataset):
    from conftest import tiny_classifier
    from transformers import DataCollatorWithPadding

    from hf_attn_distill import DistillConfig, DistillTrainer

    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        bf16=True,
        max_steps=3,
        per_device_train_batch_size=8,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
        teacher_model=tiny_classifier(0),
        args=args,
        train_dataset=sentiment_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3
    for e in logs:
        for key in ("loss", "loss_ce", "loss_kd", "loss_attn_enc", "grad_norm"):
            assert torch.isfinite(torch.tensor(e[key])), (key, e)
    assert logs[0]["loss_attn_enc"] > 0
