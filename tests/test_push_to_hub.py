"""``--push_to_hub`` end to end against a local server speaking the Hub's endpoints (offline)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURES, tiny_classifier
from fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_SECRETtoken123456789"


def run_recipe(tmp_path, hub, tokenizer, *extra):
    teacher = tmp_path / "teacher"
    tiny_classifier(0, num_hidden_layers=4).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    data = str(FIXTURES / "sentiment_tiny.tsv")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_attn_distill.recipes.distill_classification",
            "--teacher_model_name_or_path",
            str(teacher),
            "--student_teacher_layers",
            "1,3",
            "--train_file",
            data,
            "--validation_file",
            data,
            "--output_dir",
            str(tmp_path / "student"),
            "--max_steps",
            "2",
            "--max_seq_length",
            "64",
            "--do_train",
            "--do_eval",
            "--report_to",
            "none",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "me/tiny-student",
            "--hub_private_repo",
            "true",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_push_to_hub_uploads_the_student_and_a_valid_card(tmp_path, tokenizer):
    with FakeHub() as hub:
        proc = run_recipe(tmp_path, hub, tokenizer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.repos["me/tiny-student"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(files)
    assert not any(name.startswith("checkpoint-") or "/checkpoint-" in name for name in files)
    assert hub.private["me/tiny-student"]
    assert all(auth == f"Bearer {TOKEN}" for method, path, auth in hub.requests if method == "POST")
    card = files["README.md"].decode()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and "hf_attn_distill" in metadata["tags"]
    assert "base_model" not in metadata  # a local teacher is no Hub id: named in the text only, never by its path
    assert metadata["model-index"][0]["name"] == "me/tiny-student" and "`teacher`" in card
    assert str(tmp_path) not in card and TOKEN not in card
    # the token is never printed, logged or uploaded
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    assert not any(TOKEN.encode() in content for content in files.values())
    for path in (tmp_path / "student").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt"):
            assert TOKEN not in path.read_text(errors="ignore"), path


@pytest.mark.slow
def test_failed_push_keeps_the_local_student_and_says_why(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    with FakeHub(fail_commits=True) as hub:
        proc = run_recipe(tmp_path, hub, tokenizer, "--hub_strategy", "end")
    assert proc.returncode != 0
    assert "Pushing to the Hub repo me/tiny-student failed" in proc.stderr and "saved in" in proc.stderr
    assert TOKEN not in proc.stderr and TOKEN not in proc.stdout
    student = tmp_path / "student"
    assert (student / "README.md").exists() and (student / "eval_results.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(student).config.num_hidden_layers == 2
