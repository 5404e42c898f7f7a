"""Installed from a wheel (not the checkout), the package finds its card template and metric modules."""

import subprocess
import sys
import textwrap

import pytest

from hf_attn_distill.metrics import accuracy, load_metric


def test_accuracy_loads_through_evaluate_offline():
    metric = load_metric("accuracy")
    predictions, references = [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]
    assert metric.compute(predictions=predictions, references=references) == {"accuracy": 0.6}
    assert accuracy(predictions, references) == 0.6
    with pytest.raises(ValueError, match="available"):
        load_metric("bleurt")


@pytest.mark.slow
def test_wheel_install_writes_model_card_and_loads_metric(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(root)], check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("hf_attn_distill-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    script = textwrap.dedent(f"""
        import hf_attn_distill
        from hf_attn_distill.model_card import write_model_card
        from hf_attn_distill.metrics import load_metric
        assert hf_attn_distill.__file__.startswith({str(target)!r}), hf_attn_distill.__file__
        fields = dict(license="apache-2.0", task="text-classification", teacher="teacher", dataset="sst2",
                      auto_class="AutoModelForSequenceClassification",
                      metric_name="accuracy", model_name="student", summary="s", teacher_metric=0.9,
                      teacher_params=10, student_metric=0.8, student_params=5, eval_split="dev")
        card = write_model_card({str(tmp_path)!r}, fields, {{"temperature": 2.0}}).read_text()
        assert "| temperature | 2.0000 |" in card and "base_model: teacher" in card
        print(load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])["accuracy"])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={"PYTHONPATH": str(target),
                         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.5"
