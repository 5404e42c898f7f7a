import pytest

from hf_attn_distill.model_card import render_model_card, write_model_card

FIELDS = {
    "model_name": "tiny-student", "teacher": "tiny-teacher", "dataset": "sst2", "eval_split": "dev",
    "task": "text-classification", "license": "apache-2.0", "metric_name": "accuracy", "summary": "A test.",
    "auto_class": "AutoModelForSequenceClassification",
    "student_metric": 0.8512, "teacher_metric": 0.9, "student_params": 22_700_000, "teacher_params": 33_400_000,
}


def test_render_fills_every_placeholder_and_settings(tmp_path):
    path = write_model_card(tmp_path, FIELDS, {"temperature": 2.0, "attention_loss": "kl"})
    card = path.read_text()
    assert path.name == "README.md" and "$" not in card.replace("$$", "")
    assert "tiny-teacher" in card and "0.8512" in card and "22.7M" in card
    assert "| temperature | 2.0000 |" in card and "| attention_loss | kl |" in card


def test_missing_field_and_missing_template_raise():
    with pytest.raises(KeyError):
        render_model_card({k: v for k, v in FIELDS.items() if k != "teacher"})
    with pytest.raises(FileNotFoundError, match="template="):
        render_model_card(FIELDS, template="/nonexistent/card.md")
