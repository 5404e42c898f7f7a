"""Installed from a wheel (not the checkout), the package finds its card template, metric modules and recipes."""

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from hf_attn_distill.tasks.metrics import accuracy, load_metric


def test_accuracy_loads_through_evaluate_offline():
    metric = load_metric("accuracy")
    predictions, references = [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]
    assert metric.compute(predictions=predictions, references=references) == {"accuracy": 0.6}
    assert accuracy(predictions, references) == 0.6
    with pytest.raises(ValueError, match="available"):
        load_metric("bleurt")


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """The project built as a wheel and installed with ``pip --target``: (wheel, target folder). Built from a copy of
    the files git tracks (a stale ``build/`` folder in the checkout would leak removed modules into the wheel)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "hf_attn_distill"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("hf_attn_distill-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True
    )
    return wheel, target


def isolated_env(target) -> dict:
    return {
        "PYTHONPATH": str(target),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
    }


def run_python(script: str, cwd, target) -> subprocess.CompletedProcess:
    """``python -c script`` in ``cwd`` with only the wheel's install (``target``) on the path, offline."""
    return subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=cwd, env=isolated_env(target), capture_output=True, text=True
    )


@pytest.mark.slow
def test_wheel_install_writes_model_card_and_loads_metric(tmp_path, wheel_install):
    _, target = wheel_install
    script = textwrap.dedent(f"""
        import hf_attn_distill
        from hf_attn_distill.hub.model_card import CardInfo, write_model_card
        from hf_attn_distill.tasks.metrics import load_metric
        assert hf_attn_distill.__file__.startswith({str(target)!r}), hf_attn_distill.__file__
        info = CardInfo(model_name="student", task="text-classification", teacher="teacher", dataset="sst2",
                        eval_split="dev", method="logit KD", student_params=5, teacher_params=10,
                        student_layers="3-layer", metrics={{"accuracy": 0.8}}, teacher_metrics={{"accuracy": 0.9}},
                        settings={{"temperature": 2.0}})
        card = write_model_card({str(tmp_path)!r}, info).read_text()
        assert "| temperature | 2.0000 |" in card and "base_model: teacher" in card
        print(load_metric("accuracy").compute(predictions=[1, 0], references=[1, 1])["accuracy"])
    """)
    out = run_python(script, tmp_path, target)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.5"


@pytest.mark.slow
def test_wheel_ships_recipes_inside_the_package_and_the_console_script(tmp_path, wheel_install):
    """The recipes are the package hf_attn_distill.recipes (no top-level `recipes` package to collide with), and the
    wheel's ``hf-attn-distill`` script dispatches to those copies, from a folder without the checkout."""
    wheel, target = wheel_install
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.name for p in (ROOT / "hf_attn_distill" / "recipes").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("hf_attn_distill/recipes/")) == recipes
    assert not any(n.startswith(("recipes/", "tests/", "benchmarks/")) for n in names)
    package = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "hf_attn_distill").rglob("*.py"))
    assert package == sorted(n for n in names if n.endswith(".py"))
    assert not (target / "recipes").exists()
    script = target / "bin" / "hf-attn-distill"
    out = subprocess.run(
        [str(script), "--help"], check=False, cwd=tmp_path, env=isolated_env(target), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(f"\n    {command}" in out.stdout for command in ("classification", "qa", "translation"))
    check = textwrap.dedent(f"""
        import sys
        from hf_attn_distill.cli import main
        sys.argv = ["x"]
        try:
            main(["qa", "--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        module = sys.modules["hf_attn_distill.recipes.distill_qa"]
        assert module.__file__.startswith({str(target)!r}), module.__file__
        assert "recipes" not in sys.modules and module.common.__name__ == "hf_attn_distill.recipes.common"
    """)
    out = run_python(check, tmp_path, target)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: hf-attn-distill qa ") and "--doc_stride" in out.stdout


@pytest.mark.slow
def test_the_installed_package_works_from_any_folder(tmp_path, wheel_install):
    """Installed from the wheel and run from a folder with no checkout (and no ../shared) beside it: the demo asks
    for its data folder by flag name; the packaged MiniLM is found through hf_attn_distill.utils.pretrained; a classifier
    distilled from it by the recipe trains one step and writes its card."""
    _, target = wheel_install
    data = ROOT / "tests" / "fixtures" / "sentiment_tiny.tsv"
    script = textwrap.dedent(f"""
        from hf_attn_distill.utils.pretrained import minilm_path
        from hf_attn_distill.recipes import distill_classification, sst2_demo
        assert sst2_demo.__file__.startswith({str(target)!r}), sst2_demo.__file__
        try:
            sst2_demo.main(["--output_dir", "demo"])
        except SystemExit as exit:
            message = str(exit)
        else:
            raise AssertionError("the demo ran without its data")
        assert "pass --data_dir" in message and "train.tsv" in message, message
        metrics = distill_classification.main([
            "--teacher_model_name_or_path", minilm_path(), "--student_teacher_layers", "1",
            "--train_file", {str(data)!r}, "--max_train_samples", "8", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--max_seq_length", "16", "--output_dir", "student",
            "--do_train", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true",
        ])
        print("EPOCH", metrics["epoch"])
    """)
    out = run_python(script, tmp_path, target)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EPOCH" in out.stdout and (tmp_path / "student" / "README.md").exists()
    assert not (tmp_path / "demo").exists()  # nothing written before the data was found
