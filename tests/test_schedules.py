"""Temperature and loss-weight schedules: the formulas, the parsing, and a training run whose logged loss is
the scheduled combination of its logged terms."""

import math

import pytest
from conftest import tiny_classifier
from test_trainer_exactness import InOrderTrainer, uneven_dataset
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig
from hf_attn_distill.training.schedules import parse_schedules, scheduled_value


def test_schedule_formulas_by_hand():
    assert scheduled_value("constant", 2.0, math.nan, 0.7) == 2.0
    assert scheduled_value("linear", 4.0, 1.0, 0.25) == pytest.approx(3.25)
    assert scheduled_value("cosine", 1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert scheduled_value("cosine", 1.0, 0.0, 0.5) == pytest.approx(0.5)
    assert scheduled_value("cosine", 1.0, 0.0, 0.25) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert scheduled_value("linear", 4.0, 1.0, 1.5) == pytest.approx(1.0)  # clamped


def test_parse_forms_and_errors():
    expected = {"temperature": ("linear", 1.0), "attention_weight": ("cosine", 0.0)}
    assert parse_schedules("temperature=linear:1.0,attention_weight=cosine:0") == expected
    assert parse_schedules('{"temperature": "linear:1", "attention_weight": "cosine:0.0"}') == expected
    assert parse_schedules({"alpha_kd": "constant"})["alpha_kd"][0] == "constant"
    for spec, match in [
        ("layer_map=linear:1", "Cannot schedule"),
        ("temperature=step:1", "must be one of"),
        ("temperature=linear", "needs an end value"),
        ("temperature=linear:0", "end above 0"),
        ("alpha_kd=linear:-1", ">= 0"),
        ("alpha_kd=linear:nan", "finite"),
        ("temperature=cosine:inf", "finite"),
        ("temperature", "items are 'name=kind:end'"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_schedules(spec)
    with pytest.raises(ValueError, match="starts at its configured value 0"):
        DistillConfig(output_dir="x", report_to="none", hidden_weight=0.0, schedules="hidden_weight=linear:1")


def test_training_uses_and_logs_the_scheduled_values(tmp_path, tokenizer):
    teacher = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1)
    args = DistillConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        temperature=4.0,
        attention_weight=1.0,
        alpha_kd=0.8,
        schedules="temperature=linear:1.0,attention_weight=cosine:0.0",
    )
    trainer = InOrderTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=uneven_dataset(),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_kd" in e]
    assert len(logs) == 4
    for step, log in enumerate(logs):  # step k trains with progress k / max_steps
        assert log["temperature"] == pytest.approx(4.0 - 3.0 * step / 4)
        assert log["attention_weight"] == pytest.approx((1 + math.cos(math.pi * step / 4)) / 2)
        combined = 0.5 * log["loss_ce"] + 0.8 * log["loss_kd"] + log["attention_weight"] * log["loss_attn_enc"]
        assert log["loss"] == pytest.approx(combined, rel=1e-3)
    assert "alpha_kd" not in logs[0]  # only scheduled values are logged


def test_kd_term_uses_the_scheduled_temperature(tmp_path, tokenizer):
    import torch

    from hf_attn_distill import DistillTrainer, logit_kd_loss

    teacher, student = tiny_classifier(0), tiny_classifier(1, num_hidden_layers=2)
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        alpha_ce=0.0,
        alpha_kd=1.0,
        attention_weight=0.0,
        temperature=4.0,
        schedules="temperature=linear:1.0",
    )
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    trainer.state.global_step, trainer.state.max_steps = 2, 4  # halfway: T = 2.5
    batch = dict(DataCollatorWithPadding(tokenizer)([uneven_dataset()[i] for i in range(4)]))
    with torch.no_grad():
        expected = logit_kd_loss(student(**batch).logits, teacher(**batch).logits, 2.5)
        assert trainer.compute_loss(student.eval(), batch).item() == pytest.approx(expected.item(), rel=1e-5)
