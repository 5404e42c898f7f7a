"""The ``hf-attn-distill`` command, the shipped YAML configs, and ``accelerate launch`` of a recipe script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from transformers import AutoModelForSequenceClassification, HfArgumentParser

from hf_attn_distill import DistillConfig
from hf_attn_distill.cli import RECIPES, config_to_flags, main, recipe_argv, summary

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA = FIXTURES / "sentiment_tiny.tsv"
SHARED = ROOT.parent / "shared" / "data"
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
# shipped config -> subcommand, by the data set its name starts with
TASK_OF_CONFIG = {"sst2": "classification", "squad": "qa", "multi30k": "translation", "wiki": "lm"}
BENCHMARK_TEACHER = {"wiki"}  # configs whose teacher and data a benchmark builds (benchmarks.quality.lm)


def console_script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: install the package (pip install -e '.[test,demo]')"
    return str(path)


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    out = subprocess.run(
        cmd, check=False, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def test_help_lists_each_subcommand_with_its_recipe_summary(capsys):
    from hf_attn_distill.recipes import (
        distill_classification,
        distill_general,
        distill_lm,
        distill_qa,
        distill_translation,
    )

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert text.startswith("usage: hf-attn-distill")
    assert list(RECIPES) == ["classification", "qa", "translation", "general", "lm"]
    recipes = (distill_classification, distill_qa, distill_translation, distill_general, distill_lm)
    for command, recipe in zip(RECIPES, recipes):
        assert summary(RECIPES[command]) == recipe.__doc__.splitlines()[0]
        assert f"{command} {summary(RECIPES[command])}" in text


@pytest.mark.parametrize(
    "command, own_flag",
    [
        ("classification", "--text_pair_column"),
        ("qa", "--doc_stride"),
        ("translation", "--student_decoder_layers"),
        ("lm", "--block_size"),
        ("general", "--pack"),
    ],
)
def test_subcommand_help_is_the_recipe_parser_help(capsys, command, own_flag):
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and sys.argv == argv
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-attn-distill {command} ")
    for flag in (
        own_flag,
        "--teacher_model_name_or_path",
        "--student_teacher_layers",
        "--attention_loss",
        "--max_steps",
    ):
        assert flag in out, flag
    others = {"--text_pair_column", "--doc_stride", "--student_decoder_layers", "--pack"} - {own_flag}
    assert not any(flag in out for flag in others)  # each subcommand reaches its own recipe


@pytest.mark.parametrize(
    "argv, message", [(["distill"], "invalid choice: 'distill'"), ([], "required: command"), (["--max_steps", "3"], "")]
)
def test_unknown_or_missing_subcommand_exits_2_naming_the_choices(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: hf-attn-distill" in err
    if argv == ["distill"]:
        assert "'classification', 'qa', 'translation'" in err


def test_config_file_then_flags_becomes_the_files_flags_then_the_overrides(tmp_path):
    config = {
        "teacher_model_name_or_path": "t",
        "student_teacher_layers": "1,3",
        "train_file": "a.tsv",
        "output_dir": "out",
        "max_steps": 7,
        "learning_rate": 2.0e-4,
        "do_train": True,
        "do_eval": False,
        "report_to": ["none"],
        "num_labels": None,
        "lr_scheduler_kwargs": {"power": 2.0},
    }
    (tmp_path / "c.json").write_text(json.dumps(config))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    flags = config_to_flags(tmp_path / "c.yaml")
    assert flags == config_to_flags(tmp_path / "c.json")
    assert (
        "--student_teacher_layers=1,3" in flags and "--do_eval=false" in flags and "--num_labels" not in " ".join(flags)
    )
    # a lone config file is left to the recipe's own YAML/JSON parsing; flags after it override its values
    assert recipe_argv([str(tmp_path / "c.yaml")]) == [str(tmp_path / "c.yaml")]
    argv = recipe_argv([str(tmp_path / "c.yaml"), "--max_steps", "3", "--output_dir", "other"])
    assert argv == flags + ["--max_steps", "3", "--output_dir", "other"]
    from hf_attn_distill.recipes.distill_classification import ClassificationModelArguments, DataArguments

    model_args, data_args, training_args = HfArgumentParser(
        (ClassificationModelArguments, DataArguments, DistillConfig)
    ).parse_args_into_dataclasses(argv)
    assert (training_args.max_steps, training_args.output_dir) == (3, "other")
    assert training_args.learning_rate == 2.0e-4 and training_args.do_train and not training_args.do_eval
    assert training_args.lr_scheduler_kwargs == {"power": 2.0} and model_args.num_labels is None
    assert (model_args.student_teacher_layers, data_args.train_file) == ("1,3", "a.tsv")


class Parsed(Exception):
    """Raised in place of training, carrying what the recipe parsed."""


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_shipped_configs_parse_with_their_recipe_and_point_at_real_files(monkeypatch, config):
    """Through the CLI, up to the recipe's argument parsing (nothing trains). Teacher configs leave the MiniLM
    folder to the command line; student configs read the teacher their teacher config writes."""
    import yaml

    import hf_attn_distill.recipes.common as recipe_common

    real_parse = recipe_common.parse_args

    def parse_only(types, args, prog=None):
        raise Parsed(real_parse(types, args, prog))

    monkeypatch.setattr(recipe_common, "parse_args", parse_only)
    monkeypatch.chdir(ROOT)
    command = TASK_OF_CONFIG[config.name.split("_")[0]]
    raw = yaml.safe_load(config.read_text())
    teacher_config = "teacher_model_name_or_path" not in raw
    argv = [command, str(config.relative_to(ROOT))]
    if teacher_config:
        argv += ["--teacher_model_name_or_path", "folder/of/all-MiniLM-L6-v2"]
    with pytest.raises(Parsed) as parsed:
        main(argv)
    model_args, data_args, training_args = parsed.value.args[0]
    assert 0 < training_args.max_steps <= 1000 and training_args.save_strategy == "no" and training_args.do_train
    if teacher_config:
        assert model_args.training_mode == "finetune" and model_args.teacher_model_name_or_path.startswith("folder/")
        assert not model_args.has_student
    elif config.name.split("_")[0] in BENCHMARK_TEACHER:  # the teacher the benchmark links, on its corpus
        from benchmarks.quality.lm import QualityLMArguments

        work = Path(QualityLMArguments.work_dir)
        assert model_args.training_mode == "distill" and model_args.student_teacher_layers == "1,3,5"
        assert Path(model_args.teacher_model_name_or_path) == work / "teacher"
        assert [Path(data_args.train_file), Path(data_args.validation_file)] == [
            work / "data" / "train.txt",
            work / "data" / "validation.txt",
        ]
        assert data_args.block_size == QualityLMArguments.block_size and training_args.max_steps == 400
        assert (training_args.layer_map, training_args.hidden_layer_map) == ("uniform", "uniform")
        return
    else:
        assert model_args.training_mode == "distill" and model_args.student_teacher_layers == "1,3,5"
        teacher_yaml = config.with_name(config.name.replace("_student", "_teacher"))
        assert yaml.safe_load(teacher_yaml.read_text())["output_dir"] == model_args.teacher_model_name_or_path
    if command == "translation":
        assert (data_args.source_lang, data_args.target_lang) == ("de", "en")
        assert model_args.build_encoder_decoder == teacher_config
        files = [
            Path(data_args.data_dir) / f"{split}.{lang}"
            for split in (data_args.train_split, data_args.test_split)
            for lang in ("de", "en")
        ]
    else:
        files = [
            Path(f)
            for f in (data_args.train_file, data_args.validation_file, getattr(data_args, "test_file", None))
            if f
        ]
    assert files and all(not f.is_absolute() and str(f).startswith("../shared/data/") for f in files)
    if SHARED.exists():
        missing = [str(f) for f in files if not (ROOT / f).is_file()]
        assert not missing, missing


def test_every_shipped_config_has_a_subcommand():
    assert {c.name.split("_")[0] for c in CONFIGS} == set(TASK_OF_CONFIG)
    assert {c.name for c in CONFIGS} >= {
        f"{data}_{role}.yaml"
        for data in TASK_OF_CONFIG
        for role in (("student",) if data in BENCHMARK_TEACHER else ("teacher", "student"))
    }


def test_console_script_help():
    out = run([console_script("hf-attn-distill"), "--help"], cwd=ROOT)
    for command in RECIPES:
        assert f"\n    {command}" in out.stdout


def test_console_script_tiny_run_from_a_config_with_overrides(tmp_path, tiny_teacher_dir):
    """A YAML config plus overriding flags, in a fresh process: the flags win, the file supplies the rest."""
    import yaml

    config = {
        "teacher_model_name_or_path": tiny_teacher_dir,
        "student_teacher_layers": "0,3",
        "train_file": str(DATA),
        "validation_file": str(DATA),
        "output_dir": str(tmp_path / "from_file"),
        "max_steps": 1,
        "max_seq_length": 64,
        "per_device_train_batch_size": 8,
        "report_to": "none",
        "save_strategy": "no",
        "do_train": True,
        "do_eval": True,
        "attention_loss": "mse_probs",
        "disable_tqdm": True,
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    out_dir = tmp_path / "student"
    run(
        [
            console_script("hf-attn-distill"),
            "classification",
            "tiny.yaml",
            "--max_steps",
            "3",
            "--output_dir",
            str(out_dir),
        ],
        cwd=tmp_path,
    )
    assert not (tmp_path / "from_file").exists()
    assert json.loads((out_dir / "trainer_state.json").read_text())["global_step"] == 3
    assert AutoModelForSequenceClassification.from_pretrained(out_dir).config.num_hidden_layers == 2
    results = json.loads((out_dir / "eval_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and results["eval_loss_attn_enc"] > 0
    assert (out_dir / "tokenizer.json").exists() and (out_dir / "README.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["recipe", "cli"])
def test_accelerate_launch_runs_the_recipe_unchanged(tmp_path, tiny_teacher_dir, how):
    """``accelerate launch`` (one CPU process) of the recipe module, or of the CLI module, with plain recipe flags."""
    target = (
        ["-m", "hf_attn_distill.recipes.distill_classification"]
        if how == "recipe"
        else ["-m", "hf_attn_distill.cli", "classification"]
    )
    out_dir = tmp_path / "student"
    flags = [
        "--teacher_model_name_or_path",
        tiny_teacher_dir,
        "--student_teacher_layers",
        "1,3",
        "--train_file",
        str(DATA),
        "--validation_file",
        str(DATA),
        "--output_dir",
        str(out_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--max_seq_length",
        "64",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--do_train",
        "--do_eval",
        "--disable_tqdm",
        "true",
    ]
    run(
        [
            console_script("accelerate"),
            "launch",
            "--cpu",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *target,
            *flags,
        ],
        cwd=tmp_path,
        HF_HOME=str(tmp_path / "hf_home"),
    )  # no accelerate default_config.yaml from the user's cache
    assert json.loads((out_dir / "trainer_state.json").read_text())["global_step"] == 2
    assert AutoModelForSequenceClassification.from_pretrained(out_dir).config.num_hidden_layers == 2
    assert "eval_accuracy" in json.loads((out_dir / "eval_results.json").read_text())


def test_the_readmes_commands_parse_as_written(monkeypatch):
    """Every `hf-attn-distill` command of README.md's command-line block reaches its recipe's argument parsing
    with the flags it shows (nothing trains)."""
    import re
    import shlex

    import hf_attn_distill.recipes.common as recipe_common

    real_parse = recipe_common.parse_args

    def parse_only(types, args, prog=None):
        raise Parsed(real_parse(types, args, prog))

    monkeypatch.setattr(recipe_common, "parse_args", parse_only)
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Recipes and command line\n\n```bash\n(.*?)```", readme, re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    assert [c[:2] for c in commands] == [
        ["hf-attn-distill", "classification"],
        ["hf-attn-distill", "lm"],
        ["hf-attn-distill", "lm"],
    ]
    parsed = []
    for command in commands:
        with pytest.raises(Parsed) as got:
            main(command[1:])
        parsed.append(got.value.args[0])
    (model, data, training), (lm_model, lm_data, lm_training), (demo_model, _, demo_training) = parsed
    assert (model.teacher_model_name_or_path, model.student_teacher_layers) == ("out/teacher", "1,3,5")
    assert data.train_file.endswith("sst2/train.tsv") and data.validation_file.endswith("sst2/dev.tsv")
    assert training.output_dir == "out/student" and training.do_train and training.do_eval
    assert training.max_steps == 1000
    assert demo_model.teacher_model_name_or_path == "outputs/quality_lm/teacher" and demo_training.do_train
    assert (lm_model.teacher_model_name_or_path, lm_model.student_teacher_layers) == ("out/lm_teacher", "0,2,4")
    assert (lm_data.train_file, lm_data.validation_file, lm_data.block_size) == ("train.txt", "val.txt", 512)
    assert lm_training.divergence == "jsd" and lm_training.output_dir == "out/lm" and lm_training.do_eval
