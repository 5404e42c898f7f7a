"""README.md's Python snippets, run as written on tiny random models and tiny data: a snippet that stops working
(a renamed argument, a changed signature) fails here."""

import re
from pathlib import Path

import torch
from conftest import tiny_bert_config, tiny_classifier
from datasets import Dataset
from test_qa import squad_json
from test_seq2seq import bart
from transformers import BertForQuestionAnswering, DataCollatorForSeq2Seq

from hf_attn_distill.tasks.qa import load_squad_json

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def layers(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_readme_has_the_snippets_these_tests_run():
    code = snippets()
    assert len(code) == 2 and "student_from_teacher_layers(teacher, [1, 3, 5])" in code[0]
    assert "prepare_train_features" in code[1] and "DistillSeq2SeqTrainer" in code[1]


def test_the_classification_snippet_trains_a_student_made_of_teacher_layers(
    tmp_path, monkeypatch, sentiment_dataset, tokenizer
):
    monkeypatch.chdir(tmp_path)
    teacher = tiny_classifier(0, num_hidden_layers=6)
    namespace = {"teacher": teacher, "train": sentiment_dataset, "dev": sentiment_dataset, "tokenizer": tokenizer}
    exec(snippets()[0].replace("trainer.train()", ""), namespace)
    student, trainer = namespace["student"], namespace["trainer"]
    for layer, source in zip(student.bert.encoder.layer, (1, 3, 5), strict=True):
        assert torch.equal(layer.output.dense.weight, teacher.bert.encoder.layer[source].output.dense.weight)
    assert [t.name for t in trainer.transfers] == ["loss_attn_enc"]
    before = layers(student)
    trainer.train()  # the snippet's last line
    steps = -(-len(sentiment_dataset) // trainer.args.per_device_train_batch_size) * 3  # 3 epochs by default
    assert trainer.state.global_step == steps
    assert all(not torch.equal(a, b) for a, b in zip(before, layers(student)))


def test_the_qa_and_translation_snippets_build_trainers_that_train(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    qa_part, seq2seq_part = snippets()[1].split("\n\nfrom hf_attn_distill import DistillSeq2Seq")
    torch.manual_seed(0)
    qa_teacher = BertForQuestionAnswering(tiny_bert_config(num_hidden_layers=4, max_position_embeddings=512))
    torch.manual_seed(1)
    student = BertForQuestionAnswering(tiny_bert_config(num_hidden_layers=2, max_position_embeddings=512))
    namespace = {
        "squad_train": load_squad_json(squad_json(tmp_path / "squad.json")),
        "tokenizer": tokenizer,
        "student": student,
        "qa_teacher": qa_teacher,
    }
    exec(snippets()[0].splitlines()[0], namespace)  # the first snippet's imports, as a reader's session has them
    exec(qa_part, namespace)
    features, trainer = namespace["train_features"], namespace["trainer"]
    assert "kd_mask" in features.column_names and len(features[0]["input_ids"]) == 384
    trainer.args.max_steps = 2
    before = layers(student)
    trainer.train()
    assert trainer.state.global_step == 2 and all(not torch.equal(a, b) for a, b in zip(before, layers(student)))

    torch.manual_seed(2)
    pairs = Dataset.from_list(
        [
            {"input_ids": torch.randint(3, 100, (n,)).tolist(), "labels": torch.randint(3, 100, (n // 2,)).tolist()}
            for n in (8, 10, 12, 14)
        ]
    )
    namespace = {
        "small_bart": bart(1, 2, 1),
        "bart": bart(2, 2, 0),
        "pairs": pairs,
        "tokenizer": tokenizer,
        "DataCollatorForSeq2Seq": DataCollatorForSeq2Seq,
    }
    exec("from hf_attn_distill import DistillSeq2Seq" + seq2seq_part, namespace)
    trainer = namespace["trainer"]
    assert [t.name for t in trainer.transfers] == ["loss_attn_enc", "loss_attn_dec", "loss_attn_cross"]
    trainer.args.max_steps = 2
    before = layers(namespace["small_bart"])
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, layers(namespace["small_bart"])))
