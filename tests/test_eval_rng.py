"""Evaluating during training does not change the training (hf_attn_distill.training.eval_rng)."""

import random

import numpy as np
import pytest
import torch
from conftest import tiny_classifier
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer, InOrderTrainer
from hf_attn_distill.training.eval_rng import preserved_rng_states


def test_preserved_rng_states_restores_every_generator():
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    with preserved_rng_states():
        torch.rand(5), random.random(), np.random.rand(4)
    got = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def _train(trainer_cls, tmp_path, tokenizer, dataset, evaluate: bool, **kwargs):
    """Six steps of a student with dropout, evaluated after every step or never; its final weights."""
    every = dict(eval_strategy="steps", eval_steps=1) if evaluate else {}
    args = DistillConfig(
        output_dir=str(tmp_path / f"eval{evaluate}"),
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        **every,
    )
    student = tiny_classifier(1, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    trainer = trainer_cls(
        model=student,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )
    trainer.train()
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evaluations) == (6 if evaluate else 0)
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("trainer", ["distill", "finetune"])
def test_a_run_with_evaluations_trains_exactly_as_one_without(trainer, tmp_path, tokenizer, sentiment_dataset):
    """A learning curve measures the run it is drawn from: the same weights, bit for bit, with evaluations after
    every step (each evaluation draws from torch's generator; without the mixin dropout differs afterwards)."""
    cls, kwargs = (
        (DistillTrainer, {"teacher_model": tiny_classifier(0)}) if trainer == "distill" else (InOrderTrainer, {})
    )
    quiet = _train(cls, tmp_path, tokenizer, sentiment_dataset, False, **kwargs)
    if trainer == "distill":
        kwargs = {"teacher_model": tiny_classifier(0)}
    curve = _train(cls, tmp_path, tokenizer, sentiment_dataset, True, **kwargs)
    assert quiet.keys() == curve.keys()
    for name in quiet:
        assert torch.equal(quiet[name], curve[name]), name
