import json

import numpy as np
import pytest
import torch
from conftest import tiny_classifier
from datasets import Dataset
from test_trainer import make_args, make_trainer

from hf_attn_distill import DistillConfig
from hf_attn_distill.training.teacher_cache import CACHE_INDEX_COLUMN, TeacherLogitsCache


def _counting_teacher():
    teacher = tiny_classifier(0, num_hidden_layers=2, initializer_range=0.2)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    return teacher, calls


def test_cached_logits_give_the_same_training_without_teacher_forwards(tmp_path, tokenizer, sentiment_dataset):
    common = dict(max_steps=10, attention_weight=0, logging_steps=5, num_train_epochs=2)
    teacher, calls = _counting_teacher()
    reference = make_trainer(make_args(tmp_path / "ref", **common), tokenizer, sentiment_dataset, teacher=teacher)
    reference.train()
    assert len(calls) == 10  # without a cache the teacher runs every step
    calls.clear()

    args = make_args(
        tmp_path / "cached",
        teacher_logits_cache=str(tmp_path / "cache"),
        teacher_logits_cache_dtype="float32",
        **common,
    )
    cached = make_trainer(args, tokenizer, sentiment_dataset, teacher=teacher)
    built_calls = len(calls)
    assert built_calls == int(np.ceil(len(sentiment_dataset) / args.per_device_eval_batch_size))
    cached.train()
    # the (deep-copied) teacher keeps the counting hook: it ran for the cache build only, not while training
    assert len(calls) == built_calls
    want = [e for e in reference.state.log_history if "loss_kd" in e]
    got = [e for e in cached.state.log_history if "loss_kd" in e]
    assert len(want) == len(got) == 2
    for a, b in zip(want, got):
        assert b["loss_kd"] == pytest.approx(a["loss_kd"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_cache_is_reused_and_rebuilt_when_the_teacher_changes(tmp_path, tokenizer, sentiment_dataset):
    folder = tmp_path / "cache"
    args = make_args(tmp_path, attention_weight=0, teacher_logits_cache=str(folder))
    teacher, calls = _counting_teacher()
    make_trainer(args, tokenizer, sentiment_dataset, teacher=teacher)
    first = len(calls)
    make_trainer(args, tokenizer, sentiment_dataset, teacher=teacher)
    assert len(calls) == first  # same teacher and data: reused
    other = tiny_classifier(5, num_hidden_layers=2, initializer_range=0.2)
    trainer = make_trainer(args, tokenizer, sentiment_dataset, teacher=other)
    meta = json.loads((folder / "meta.json").read_text())
    from hf_attn_distill.training.teacher_cache import weights_checksum

    assert meta["teacher_weights_checksum"] == weights_checksum(trainer.teacher_model)
    logits = np.load(folder / "logits.npy")
    assert logits.shape == (len(sentiment_dataset), 2) and logits.dtype == np.float16
    rows = trainer.teacher_logits_cache.lookup(torch.tensor([0, 3]))
    with torch.no_grad():
        ids = torch.tensor([sentiment_dataset[0]["input_ids"]])
        direct = trainer.teacher_model(input_ids=ids).logits[0]
    torch.testing.assert_close(rows[0], direct, atol=2e-3, rtol=2e-3)  # float16 storage
    assert CACHE_INDEX_COLUMN in trainer.train_dataset.column_names
    # other training data: rebuilt
    rebuilt_at = json.loads((folder / "meta.json").read_text())["dataset_fingerprint"]
    make_trainer(args, tokenizer, sentiment_dataset.select(range(10)), teacher=other)
    assert json.loads((folder / "meta.json").read_text())["dataset_fingerprint"] != rebuilt_at
    assert np.load(folder / "logits.npy").shape == (10, 2)


def test_cache_requires_logit_only_distillation(tmp_path):
    with pytest.raises(ValueError, match="attention_weight=0"):
        DistillConfig(output_dir=str(tmp_path), report_to="none", teacher_logits_cache=str(tmp_path / "c"))


def test_incomplete_cache_is_not_used(tmp_path):
    cache = TeacherLogitsCache(tmp_path, {"k": 1})
    with pytest.raises(RuntimeError, match="incomplete"):
        cache.lookup(torch.tensor([0]))
    with pytest.raises(ValueError, match="covers 1 of 3"):
        cache.build([{CACHE_INDEX_COLUMN: torch.tensor([0])}], lambda b: torch.zeros(1, 2), num_examples=3)
    assert not cache.is_complete


def test_cache_refuses_question_answering_teachers(tmp_path):
    from transformers import BertConfig, BertForQuestionAnswering

    from hf_attn_distill import DistillConfig, DistillTrainer

    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    rows = Dataset.from_list([{"input_ids": [1, 2, 3], "start_positions": 1, "end_positions": 2}] * 4)
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        attention_weight=0,
        teacher_logits_cache=str(tmp_path / "cache"),
    )
    with pytest.raises(ValueError, match="Drop teacher_logits_cache for QA"):
        DistillTrainer(
            model=BertForQuestionAnswering(config),
            teacher_model=BertForQuestionAnswering(config),
            args=args,
            train_dataset=rows,
        )
