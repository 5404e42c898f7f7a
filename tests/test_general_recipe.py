"""Task-agnostic distillation (``hf-attn-distill general``): unlabeled text, base models, a student to fine-tune."""

import json

import pytest
import torch
from conftest import tiny_bert_config
from datasets import Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, BertModel

from hf_attn_distill.recipes import distill_classification, distill_general

NARROW = "num_hidden_layers=2,hidden_size=16,num_attention_heads=2,intermediate_size=32"


@pytest.fixture(scope="module")
def base_teacher_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("base_teacher")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(initializer_range=0.2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory, sentiment_rows):
    folder = tmp_path_factory.mktemp("text")
    lines = [r["sentence"] for r in sentiment_rows]
    (folder / "train.txt").write_text("\n".join(lines[:40] + ["", "   "] + lines[40:]) + "\n")
    (folder / "valid.txt").write_text("\n".join(lines[:16]) + "\n")
    return folder


def general_args(teacher, files, output_dir, *extra):
    return [
        "--teacher_model_name_or_path",
        teacher,
        "--student_config_overrides",
        NARROW,
        "--train_file",
        str(files / "train.txt"),
        "--validation_file",
        str(files / "valid.txt"),
        "--max_seq_length",
        "32",
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--learning_rate",
        "5e-3",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--save_strategy",
        "no",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
        "--do_eval",
        *extra,
    ]


def test_packing_fills_blocks_in_order(tokenizer):
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["a b c d e f g", "h i j k l m n o p q r s t"]})})
    data = distill_general.GeneralDataArguments(train_file="x.txt", max_seq_length=8)
    blocks = distill_general.tokenize(raw, tokenizer, data)["train"]["input_ids"]
    body = tokenizer(["a b c d e f g", "h i j k l m n o p q r s t"], add_special_tokens=False)["input_ids"]
    flat = [t for ids in body for t in ids]
    assert [len(b) for b in blocks] == [8, 8, 8]  # 20 tokens -> three blocks of 6 (+ [CLS], [SEP]), tail dropped
    assert all(b[0] == tokenizer.cls_token_id and b[-1] == tokenizer.sep_token_id for b in blocks)
    assert [t for b in blocks for t in b[1:-1]] == flat[:18]
    unpacked = distill_general.tokenize(raw, tokenizer, distill_general.GeneralDataArguments("x.txt", pack=False))
    assert unpacked["train"]["input_ids"][0] == tokenizer("a b c d e f g")["input_ids"]


def test_general_distillation_learns_and_its_student_fine_tunes(
    tmp_path, base_teacher_dir, text_files, tiny_teacher_dir
):
    before = distill_general.main(general_args(base_teacher_dir, text_files, tmp_path / "untrained"))
    after = distill_general.main(
        general_args(base_teacher_dir, text_files, tmp_path / "general", "--do_train", "--max_steps", "20")
    )
    # the held-out relation loss is measured on unlabeled text, and training lowers it
    assert before["eval_loss"] == pytest.approx(before["eval_loss_relation"], rel=1e-6)
    assert after["eval_loss_relation"] < 0.8 * before["eval_loss_relation"]
    saved = json.loads((tmp_path / "general" / "config.json").read_text())
    assert saved["architectures"] == ["BertModel"] and saved["hidden_size"] == 16
    card = (tmp_path / "general" / "README.md").read_text()
    assert "feature-extraction" in card and "relation" in card and str(tmp_path) not in card
    # the classification recipe fine-tunes it: the student starts from the general-distilled encoder
    student = BertModel.from_pretrained(tmp_path / "general")
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "general", num_labels=2)
    torch.testing.assert_close(
        classifier.bert.encoder.layer[1].attention.self.query.weight,
        student.encoder.layer[1].attention.self.query.weight,
    )
    (text_files / "train.tsv").write_text(
        "sentence\tlabel\n"
        + "".join(f"{line}\t{i % 2}\n" for i, line in enumerate((text_files / "valid.txt").read_text().splitlines()))
    )
    metrics = distill_classification.main(
        [
            "--teacher_model_name_or_path",
            tiny_teacher_dir,
            "--student_model_name_or_path",
            str(tmp_path / "general"),
            "--train_file",
            str(text_files / "train.tsv"),
            "--validation_file",
            str(text_files / "train.tsv"),
            "--output_dir",
            str(tmp_path / "sst2"),
            "--max_steps",
            "2",
            "--max_seq_length",
            "32",
            "--report_to",
            "none",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
            "--do_train",
            "--do_eval",
            "--print_summary",
            "false",
        ]
    )
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["train_loss"] > 0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--alpha_kd", "0.5"], "alpha_kd=0.5.*no labels or logits.*--alpha_kd 0"),
        (["--relation_weight", "0"], "nothing to train on"),
        (["--training_mode", "finetune"], "only distills"),
    ],
)
def test_bad_arguments_name_the_fix(tmp_path, base_teacher_dir, text_files, extra, match):
    with pytest.raises(ValueError, match=match):
        distill_general.main(general_args(base_teacher_dir, text_files, tmp_path / "bad", *extra))
