"""The distillation update is the same however the batch is split, checkpointed or compiled."""

import pytest
import torch
from conftest import one_sgd_step, tiny_classifier
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer

LENGTHS = [3, 4, 3, 4, 12, 11, 12, 10]  # two micro-batches with very different padding and counts
TERMS = ("loss", "loss_ce", "loss_kd", "loss_attn_enc")


class InOrderTrainer(DistillTrainer):
    """Batches in dataset order, so the split into micro-batches is the one the test chooses."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def uneven_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": [101] + torch.randint(1000, 3000, (n - 2,), generator=g).tolist() + [102], "labels": i % 2}
        for i, n in enumerate(LENGTHS)
    ]
    return Dataset.from_list(rows)


def exact_trainer(
    tmp_path, tokenizer, batch, accumulation, trainer_cls=InOrderTrainer, config_cls=DistillConfig, **overrides
):
    """A trainer for one plain SGD step over the 8 rows, in order, split into ``batch`` x ``accumulation``."""
    values = one_sgd_step(tmp_path / f"b{batch}ga{accumulation}", batch, accumulation, **overrides)
    teacher = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1)
    return trainer_cls(
        model=student,
        teacher_model=teacher,
        args=config_cls(**values),
        train_dataset=uneven_dataset(),
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def one_update(tmp_path, tokenizer, batch, accumulation, trainer_cls=InOrderTrainer, **overrides):
    """Student weights and first log after one SGD step over the 8 rows."""
    trainer = exact_trainer(tmp_path, tokenizer, batch, accumulation, trainer_cls, **overrides)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, log


START = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1).state_dict()


def assert_same_update(a, b):
    """Same weight update (compared as deltas from the start, to 0.1% of the largest change) and same logs."""
    (weights_a, log_a), (weights_b, log_b) = a, b
    deltas_a = {k: weights_a[k] - START[k] for k in START}
    deltas_b = {k: weights_b[k] - START[k] for k in START}
    largest = max(d.abs().max().item() for d in deltas_a.values())
    assert largest > 1e-5  # the update is real
    for key in deltas_a:
        torch.testing.assert_close(deltas_b[key], deltas_a[key], atol=1e-3 * largest, rtol=1e-3, msg=key)
    for key in TERMS:
        if key in log_a:
            assert log_b[key] == pytest.approx(log_a[key], rel=1e-5), key


ATTENTION_ONLY = dict(alpha_ce=0.0, alpha_kd=0.0, attention_weight=1.0)


@pytest.mark.parametrize("terms", ["attention-only", "all-terms"])
@pytest.mark.parametrize("loss", ["kl", "mse_scores", "mse_probs"])
def test_accumulation_equals_one_large_batch(tmp_path, tokenizer, loss, terms):
    weights = ATTENTION_ONLY if terms == "attention-only" else {}
    big = one_update(tmp_path, tokenizer, 8, 1, attention_loss=loss, **weights)
    small = one_update(tmp_path, tokenizer, 4, 2, attention_loss=loss, **weights)
    assert_same_update(big, small)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("loss", ["kl", "mse_scores", "mse_probs"])
def test_gradient_checkpointing_gives_the_same_update(tmp_path, tokenizer, loss, reentrant):
    plain = one_update(tmp_path / "plain", tokenizer, 4, 2, attention_loss=loss, **ATTENTION_ONLY)
    checkpointed = one_update(
        tmp_path / "ckpt",
        tokenizer,
        4,
        2,
        attention_loss=loss,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        **ATTENTION_ONLY,
    )
    assert_same_update(plain, checkpointed)
    # with every term on as well
    assert_same_update(
        one_update(tmp_path / "plain-all", tokenizer, 8, 1, attention_loss=loss),
        one_update(
            tmp_path / "ckpt-all",
            tokenizer,
            8,
            1,
            attention_loss=loss,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        ),
    )


def test_compute_loss_outside_train_is_the_batch_mean(tmp_path, tokenizer):
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, alpha_ce=0.5, alpha_kd=0.5)
    teacher = tiny_classifier(0, num_hidden_layers=4)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    batch = DataCollatorWithPadding(tokenizer)(uneven_dataset().to_list())
    loss = trainer.compute_loss(student.train(), dict(batch))
    terms = trainer.accounting.pop_means("train")
    assert loss.item() == pytest.approx(
        0.5 * terms["loss_ce"] + 0.5 * terms["loss_kd"] + terms["loss_attn_enc"], rel=1e-5
    )
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.dim() > 1)


@pytest.mark.slow
def test_torch_compile_trains_with_attention_transfer(tmp_path, tokenizer):
    """Unmapped layers compile; recorded attention runs outside the graph (torch.compiler.disable)."""
    eager = one_update(tmp_path / "eager", tokenizer, 4, 2, attention_loss="kl")
    compiled = one_update(tmp_path / "compiled", tokenizer, 4, 2, attention_loss="kl", torch_compile=True)
    assert compiled[1]["loss_attn_enc"] > 0
    assert_same_update(eager, compiled)
