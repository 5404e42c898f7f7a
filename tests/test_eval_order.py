"""Evaluation in dataset order with length-grouped training (hf_attn_distill.training.eval_order)."""

import copy

import numpy as np
import pytest
from conftest import tiny_classifier
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from hf_attn_distill import DistillConfig, DistillTrainer, InOrderTrainer

GROUPED = dict(train_sampling_strategy="group_by_length", per_device_eval_batch_size=4)


def _args(cls, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    return cls(**{**values, **overrides})


def _predict(trainer_cls, args, model, tokenizer, dataset, **kwargs):
    trainer = trainer_cls(
        model=model, args=args, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer), **kwargs
    )
    out = trainer.predict(dataset)
    return out.predictions, out.label_ids


@pytest.fixture()
def reference(tmp_path, trained_teacher, tokenizer, sentiment_dataset):
    """Logits and labels of ``Trainer.predict`` with the default random training sampler: dataset order."""
    predictions, labels = _predict(
        Trainer, _args(TrainingArguments, tmp_path), trained_teacher, tokenizer, sentiment_dataset
    )
    assert np.array_equal(labels, np.array(sentiment_dataset["labels"]))
    return predictions, labels


def test_plain_trainer_evaluates_in_length_order_under_group_by_length(
    tmp_path, reference, trained_teacher, tokenizer, sentiment_dataset
):
    """Why the mixin exists: ``transformers.Trainer`` reorders evaluation when training groups by length."""
    args = _args(TrainingArguments, tmp_path, **GROUPED)
    _, labels = _predict(Trainer, args, trained_teacher, tokenizer, sentiment_dataset)
    assert not np.array_equal(labels, reference[1])


def test_in_order_trainer_predicts_in_dataset_order(tmp_path, reference, trained_teacher, tokenizer, sentiment_dataset):
    args = _args(TrainingArguments, tmp_path, **GROUPED)
    predictions, labels = _predict(InOrderTrainer, args, trained_teacher, tokenizer, sentiment_dataset)
    np.testing.assert_array_equal(labels, reference[1])
    np.testing.assert_allclose(predictions, reference[0], atol=1e-5)
    assert trainer_sampler_kind(args, trained_teacher, tokenizer, sentiment_dataset) == "LengthGroupedSampler"


def trainer_sampler_kind(args, model, tokenizer, dataset) -> str:
    """The training sampler is still length-grouped: only evaluation changed."""
    trainer = InOrderTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithPadding(tokenizer)
    )
    return type(trainer.get_train_dataloader().batch_sampler.sampler).__name__


def test_distill_trainer_predicts_in_dataset_order(tmp_path, reference, trained_teacher, tokenizer, sentiment_dataset):
    args = _args(DistillConfig, tmp_path, **GROUPED)
    student = copy.deepcopy(trained_teacher)  # the teacher as its own student: the same logits as the reference
    predictions, labels = _predict(
        DistillTrainer, args, student, tokenizer, sentiment_dataset, teacher_model=tiny_classifier(3)
    )
    np.testing.assert_array_equal(labels, reference[1])
    np.testing.assert_allclose(predictions, reference[0], atol=1e-5)
