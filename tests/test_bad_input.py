"""Bad input gets an error that names the fix (the README's troubleshooting list)."""

import pytest
import torch
from conftest import FIXTURES, tiny_classifier
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer, logit_kd_loss

DATA = FIXTURES / "sentiment_tiny.tsv"


def args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return DistillConfig(**values)


def test_same_label_names_in_another_order_are_remapped(tmp_path, tokenizer, sentiment_dataset):
    teacher = tiny_classifier(0, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    student = tiny_classifier(
        1,
        num_hidden_layers=2,
        num_attention_heads=2,
        id2label={0: "positive", 1: "negative"},
        label2id={"positive": 0, "negative": 1},
    )
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path, attention_weight=0))
    batch = DataCollatorWithPadding(tokenizer)([sentiment_dataset[i] for i in range(4)])
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(batch))
        got = trainer.accounting.pop_means("eval")["loss_kd"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = logit_kd_loss(student(**inputs).logits, teacher(**inputs).logits[:, [1, 0]], 2.0)
    assert got == pytest.approx(want.item(), rel=1e-5)


def test_different_label_names_raise(tmp_path):
    teacher = tiny_classifier(0, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    student = tiny_classifier(
        1, num_hidden_layers=2, num_attention_heads=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}
    )
    with pytest.raises(ValueError, match="teacher's id2label"):
        DistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path))


def test_teacher_without_real_weights_raises(tmp_path):
    with torch.device("meta"):
        teacher = tiny_classifier(0)
    with pytest.raises(ValueError, match="meta"):
        DistillTrainer(
            model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
            teacher_model=teacher,
            args=args(tmp_path, attention_weight=0),
        )


def test_resume_from_a_checkpoint_of_another_student_shape(tmp_path, tokenizer, sentiment_dataset):
    common = dict(max_steps=2, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    first = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
        teacher_model=tiny_classifier(0),
        args=args(tmp_path / "a", **common),
        train_dataset=sentiment_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    first.train()
    other = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, hidden_size=64),
        teacher_model=tiny_classifier(0, hidden_size=64),
        args=args(tmp_path / "b", **common),
        train_dataset=sentiment_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    with pytest.raises(ValueError, match="another shape.*resume_from_checkpoint=None"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def _recipe(tmp_path, teacher_dir, **extra):
    from test_recipes import _base

    from hf_attn_distill.recipes.distill_classification import main

    return main(
        _base(
            tmp_path / "out",
            **{"--teacher_model_name_or_path": teacher_dir, "--student_teacher_layers": "0,1", **extra},
        )
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("teacher")
    tiny_classifier(0, num_hidden_layers=4).save_pretrained(folder)  # max_position_embeddings=64
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_max_length_beyond_position_embeddings(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="max_seq_length=128.*64 positions"):
        _recipe(tmp_path, teacher_dir, **{"--max_seq_length": "128"})


def test_empty_training_data(tmp_path, teacher_dir):
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match="empty"):
        _recipe(
            tmp_path,
            teacher_dir,
            **{"--train_file": str(empty), "--validation_file": str(empty), "--max_seq_length": "32"},
        )


def test_labels_out_of_range(tmp_path, teacher_dir):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\na good film\t1\na bad film\t5\n")
    with pytest.raises(ValueError, match="label 5.*num_labels=2"):
        _recipe(
            tmp_path,
            teacher_dir,
            **{"--train_file": str(bad), "--validation_file": str(bad), "--max_seq_length": "32", "--num_labels": "2"},
        )


@pytest.mark.parametrize(
    "asked, expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32), ("auto", torch.bfloat16)]
)
def test_teacher_gets_the_dtype_and_device_asked_for(tmp_path, tokenizer, sentiment_dataset, asked, expected):
    """A teacher loaded in another dtype than ``teacher_dtype`` asks for is cast (``auto`` keeps it), and it is
    placed on the training device; the KD term is computed from its logits in that dtype, in float32."""
    teacher = tiny_classifier(0).to(torch.bfloat16)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args(tmp_path, teacher_dtype=asked, alpha_ce=0.0, attention_weight=0.0),
    )
    params = list(trainer.teacher_model.parameters())
    assert {p.dtype for p in params} == {expected} and {p.device for p in params} == {trainer.args.device}
    assert not any(p.requires_grad for p in params) and not trainer.teacher_model.training
    batch = dict(DataCollatorWithPadding(tokenizer)([sentiment_dataset[i] for i in range(4)]))
    with torch.no_grad():
        reference = logit_kd_loss(student.eval()(**batch).logits, trainer.teacher_model(**batch).logits.float(), 2.0)
        assert trainer.compute_loss(student, batch).item() == pytest.approx(0.5 * reference.item(), rel=1e-5)


def test_labels_out_of_range_are_refused_through_the_trainer(tmp_path, tokenizer, sentiment_dataset):
    bad = sentiment_dataset.map(lambda row, i: {"labels": 5 if i == 3 else row["labels"]}, with_indices=True)
    trainer = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
        teacher_model=tiny_classifier(0),
        args=args(tmp_path, max_steps=2, per_device_train_batch_size=8),
        train_dataset=bad,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    with pytest.raises(ValueError, match=r"label 5, but the student has num_labels=2 \(labels 0..1\): relabel"):
        trainer.train()


def test_inputs_longer_than_the_position_embeddings_are_refused(tmp_path, tokenizer):
    teacher = tiny_classifier(0, max_position_embeddings=32)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)  # 64 positions
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args(tmp_path))
    batch = tokenizer(["a " * 38], return_tensors="pt")
    assert batch["input_ids"].shape[1] == 40
    with pytest.raises(
        ValueError,
        match="input_ids of 40 tokens, but BertForSequenceClassification has only 32 "
        "positions: truncate the inputs to at most 32 tokens",
    ):
        trainer.compute_loss(student, {**batch, "labels": torch.tensor([1])})


def test_an_empty_training_set_is_refused(tmp_path, sentiment_dataset):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        DistillTrainer(
            model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
            teacher_model=tiny_classifier(0),
            args=args(tmp_path, max_steps=2),
            train_dataset=sentiment_dataset.select([]),
        )


def test_a_teacher_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"there is no folder at .*nowhere/teacher, and it is not a Hub id"):
        DistillTrainer(
            model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
            teacher_model=str(tmp_path / "nowhere" / "teacher"),
            args=args(tmp_path),
        )
