import pytest
import torch
from conftest import tiny_classifier

from hf_attn_distill import student_from_config, student_from_teacher_layers


def test_student_from_teacher_layers_copies_embeddings_head_and_chosen_layers():
    teacher = tiny_classifier(0, num_hidden_layers=4)
    student = student_from_teacher_layers(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])
    assert torch.equal(
        s["bert.encoder.layer.0.attention.self.query.weight"], t["bert.encoder.layer.1.attention.self.query.weight"]
    )
    assert torch.equal(s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.3.output.dense.weight"])


def test_student_with_all_layers_reproduces_teacher():
    teacher = tiny_classifier(0, num_hidden_layers=3).eval()
    student = student_from_teacher_layers(teacher, [0, 1, 2]).eval()
    ids = torch.randint(1000, 2000, (2, 6))
    torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


@pytest.mark.parametrize("layers, match", [([0, 4], "out of range"), ([1, 1], "once"), ([], "empty")])
def test_student_from_teacher_layers_bad_input(layers, match):
    with pytest.raises(ValueError, match=match):
        student_from_teacher_layers(tiny_classifier(0, num_hidden_layers=4), layers)


def test_student_from_config_overrides():
    teacher = tiny_classifier(0, num_hidden_layers=4, hidden_size=64, num_attention_heads=8, intermediate_size=128)
    student = student_from_config(teacher, num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
    assert type(student) is type(teacher)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 32, 4, 128)
    assert cfg.vocab_size == teacher.config.vocab_size and cfg.num_labels == teacher.config.num_labels
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(vocab_size=10), "teacher's"), (dict(not_a_field=1), "no field"), (dict(num_attention_heads=5), "multiple")],
)
def test_student_from_config_bad_overrides(overrides, match):
    with pytest.raises(ValueError, match=match):
        student_from_config(tiny_classifier(0), **overrides)
