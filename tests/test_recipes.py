"""The classification recipe and the SST-2 demo, called through their ``main()``."""

import json
from pathlib import Path

import pytest
from conftest import FIXTURES, tiny_classifier
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification

from hf_attn_distill.recipes.distill_classification import main as recipe_main

DATA = FIXTURES / "sentiment_tiny.tsv"
SHARED_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def _base(output_dir, **extra):
    args = {
        "--train_file": str(DATA),
        "--validation_file": str(DATA),
        "--output_dir": str(output_dir),
        "--max_steps": "4",
        "--per_device_train_batch_size": "8",
        "--report_to": "none",
        "--save_strategy": "no",
        "--do_train": None,
        "--do_eval": None,
        "--disable_tqdm": "true",
        "--learning_rate": "1e-3",
        "--max_seq_length": "64",
    }
    args.update(extra)
    out = []
    for k, v in args.items():
        out += [k] if v is None else [k, v]
    return out


def recomputed_accuracy(model_dir, rows, text="sentence", pair=None, label="label", names=None) -> float:
    """Accuracy of the saved model on ``rows``, one unpadded example at a time (independent of the recipe)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    correct = 0
    with torch.no_grad():
        for row in rows:
            enc = tokenizer(
                row[text], row[pair] if pair else None, truncation=True, max_length=128, return_tensors="pt"
            )
            gold = names.index(row[label]) if names else int(row[label])
            correct += int(model(**enc).logits.argmax(-1).item() == gold)
    return correct / len(rows)


def tsv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_finetune_then_distill_from_teacher_layers(tmp_path, tiny_teacher_dir, capsys):
    teacher_dir = tmp_path / "teacher"
    metrics = recipe_main(
        _base(teacher_dir, **{"--training_mode": "finetune", "--teacher_model_name_or_path": tiny_teacher_dir})
    )
    assert metrics["eval_accuracy"] == pytest.approx(recomputed_accuracy(teacher_dir, tsv_rows(DATA)))
    student_dir = tmp_path / "student"
    metrics = recipe_main(
        _base(
            student_dir,
            **{
                "--teacher_model_name_or_path": str(teacher_dir),
                "--student_teacher_layers": "1,3",
                "--attention_loss": "mse_scores",
                "--evaluate_teacher": "true",
                "--logging_steps": "1",
            },
        )
    )
    assert metrics["eval_accuracy"] == pytest.approx(recomputed_accuracy(student_dir, tsv_rows(DATA)))
    assert metrics["teacher_eval_accuracy"] == pytest.approx(recomputed_accuracy(teacher_dir, tsv_rows(DATA)))
    assert metrics["eval_loss_kd"] > 0 and metrics["eval_loss_attn_enc"] > 0
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2
    assert (student_dir / "tokenizer.json").exists()
    assert (student_dir / "loss_curves.png").stat().st_size > 0 and (student_dir / "attention_encoder.png").exists()
    card = ModelCard.load(student_dir / "README.md", ignore_metadata_errors=False)
    assert "2-layer text classification student distilled from `teacher`" in card.text
    assert "attention transfer (mse_scores; encoder)" in card.text
    (result,) = card.data.eval_results
    assert result.metric_type == "accuracy" and result.metric_value == round(metrics["eval_accuracy"], 4)
    assert f"| {metrics['teacher_eval_accuracy']:.4f} |" in card.text  # teacher row, measured in this run
    assert card.data.base_model is None and str(tmp_path) not in card.content  # local teacher: no path, no base_model
    summary = capsys.readouterr().out.split("latency (batch 1)")[-1]  # the closing summary table
    assert "this student" in summary and f"{metrics['eval_accuracy']:.4f}" in summary
    assert f"{metrics['teacher_eval_accuracy']:.4f}" in summary
    assert json.loads((student_dir / "eval_results.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]


def test_student_from_config_overrides_and_json_config(tmp_path, tiny_teacher_dir):
    config = {
        "teacher_model_name_or_path": tiny_teacher_dir,
        "student_config_overrides": "num_hidden_layers=2,hidden_size=16",
        "train_file": str(DATA),
        "validation_file": str(DATA),
        "output_dir": str(tmp_path / "s"),
        "max_steps": 2,
        "max_seq_length": 64,
        "report_to": "none",
        "save_strategy": "no",
        "do_train": True,
        "do_eval": True,
        "layer_map": "last",
        "attention_loss": "kl",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    metrics = recipe_main([str(path)])
    assert "eval_loss_attn_enc" in metrics
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s")
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)


def test_yaml_config(tmp_path, tiny_teacher_dir):
    yaml = pytest.importorskip("yaml")
    config = {
        "teacher_model_name_or_path": tiny_teacher_dir,
        "student_teacher_layers": "0,3",
        "train_file": str(DATA),
        "validation_file": str(DATA),
        "output_dir": str(tmp_path / "y"),
        "max_steps": 2,
        "max_seq_length": 64,
        "report_to": "none",
        "save_strategy": "no",
        "do_train": True,
        "attention_weight": 0,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = recipe_main([str(path)])
    state = json.loads((tmp_path / "y" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and metrics["train_loss"] > 0
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "y").config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"--text_column": "text"}, "--text_column"),
        ({"--label_column": "y"}, "--label_column"),
        ({"--student_teacher_layers": "0,9"}, "out of range"),
        ({"--student_teacher_layers": None}, "needs a student"),
        ({"--card_teacher_id": "/home/me/teacher"}, "--card_teacher_id '/home/me/teacher' is not a Hub id"),
        ({"--card_dataset_id": "../data"}, "--card_dataset_id '../data' is not a Hub id"),
    ],
)
def test_bad_arguments_name_the_fix(tmp_path, tiny_teacher_dir, extra, match):
    args = {"--teacher_model_name_or_path": tiny_teacher_dir, "--student_teacher_layers": "0,1", **extra}
    if extra.get("--student_teacher_layers", "x") is None:
        del args["--student_teacher_layers"]
    with pytest.raises(ValueError, match=match):
        recipe_main(_base(tmp_path / "bad", **args))


def test_student_with_other_tokenizer_is_rejected(tmp_path, tiny_teacher_dir):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]))
    other = tmp_path / "other_student"
    tiny_classifier(3, num_hidden_layers=2).save_pretrained(other)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(other)
    with pytest.raises(
        ValueError, match=r"give \d+ ids different tokens \(first: id 1: teacher '\[unused0\]', student '\[UNK\]'"
    ):
        recipe_main(
            _base(
                tmp_path / "x",
                **{"--teacher_model_name_or_path": tiny_teacher_dir, "--student_model_name_or_path": str(other)},
            )
        )


@pytest.mark.slow
def test_recipe_with_real_minilm_teacher(tmp_path, minilm_path):
    """Real pretrained weights: fine-tune MiniLM briefly, distill 3 of its layers, get a loadable student."""
    teacher_dir = tmp_path / "teacher"
    recipe_main(
        _base(
            teacher_dir,
            **{
                "--training_mode": "finetune",
                "--teacher_model_name_or_path": minilm_path,
                "--learning_rate": "1e-4",
                "--max_steps": "6",
            },
        )
    )
    metrics = recipe_main(
        _base(
            tmp_path / "student",
            **{
                "--teacher_model_name_or_path": str(teacher_dir),
                "--student_teacher_layers": "1,3,5",
                "--student_layers_from": minilm_path,
                "--learning_rate": "1e-4",
                "--max_steps": "6",
            },
        )
    )
    assert all(k in metrics for k in ("eval_accuracy", "eval_loss_ce", "eval_loss_kd", "eval_loss_attn_enc"))
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 384


@pytest.mark.slow
@pytest.mark.very_slow
@pytest.mark.skipif(not SHARED_SST2.exists(), reason="needs ../shared/data/sst2")
def test_sst2_demo_runs_end_to_end(tmp_path, capsys):
    from hf_attn_distill.recipes.sst2_demo import main as demo_main

    result = demo_main(
        [
            "--output_dir",
            str(tmp_path),
            "--teacher_steps",
            "3",
            "--student_steps",
            "3",
            "--latency_sentences",
            "10",
            "--batch_size",
            "8",
        ]
    )
    assert set(result["models"]) and 0 < result["retention"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "student" / "README.md")
    assert card.data.datasets == ["nyu-mll/glue"] and card.data.eval_results[0].dataset_type == "nyu-mll/glue"
    assert (tmp_path / "demo_results.md").read_text().count("|") > 10
    # one results table, with one latency measurement: the recipes' own closing tables are not printed
    out = capsys.readouterr().out
    assert "latency (batch 1)" not in out and out.count("CPU latency / sentence") == 1


def test_sentence_pairs_from_jsonl(tmp_path, tiny_teacher_dir):
    rows = [
        {"premise": "a good film", "hypothesis": "the film is good", "gold": "entailment"},
        {"premise": "a bad film", "hypothesis": "the film is good", "gold": "contradiction"},
    ] * 8
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    metrics = recipe_main(
        [
            "--teacher_model_name_or_path",
            tiny_teacher_dir,
            "--student_teacher_layers",
            "0,3",
            "--train_file",
            str(path),
            "--validation_file",
            str(path),
            "--text_column",
            "premise",
            "--text_pair_column",
            "hypothesis",
            "--label_column",
            "gold",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--do_train",
            "--do_eval",
            "--max_seq_length",
            "64",
        ]
    )
    names = ["contradiction", "entailment"]
    assert metrics["eval_accuracy"] == pytest.approx(
        recomputed_accuracy(tmp_path / "out", rows, "premise", "hypothesis", "gold", names)
    )
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert student.config.id2label == {0: "contradiction", 1: "entailment"}  # string labels mapped in sorted order


def test_shipped_yaml_config_parses():
    from hf_attn_distill.recipes.distill_classification import parse_args

    root = Path(__file__).resolve().parents[1]
    model_args, data_args, training_args = parse_args([str(root / "recipes" / "configs" / "sst2_student.yaml")])
    assert model_args.student_teacher_layers == "1,3,5" and training_args.attention_loss == "kl"
    assert data_args.train_file.endswith("sst2/train.tsv") and training_args.max_steps == 1000


def test_tensorboard_gets_every_loss_term_and_the_attention_figures(tmp_path, tiny_teacher_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    recipe_main(
        _base(
            out,
            **{
                "--teacher_model_name_or_path": tiny_teacher_dir,
                "--student_teacher_layers": "1,3",
                "--report_to": "tensorboard",
                "--logging_steps": "1",
            },
        )
    )
    (events,) = {p.parent for p in out.glob("runs/**/events.out.tfevents.*")}
    run = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = run.Tags()
    assert {"train/loss_ce", "train/loss_kd", "train/loss_attn_enc", "eval/loss_attn_enc"} <= set(tags["scalars"])
    assert [e.value for e in run.Scalars("train/loss_attn_enc")] == pytest.approx(
        [
            e["loss_attn_enc"]
            for e in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss_attn_enc" in e
        ],
        rel=1e-5,
    )
    assert {"distillation/attention_encoder", "distillation/loss_curves"} <= set(tags["images"])
    (image,) = run.Images("distillation/attention_encoder")
    assert image.step == 4 and image.width > 100


def test_card_names_the_hub_teacher_and_dataset_that_local_copies_came_from(tmp_path, tiny_teacher_dir):
    """--card_teacher_id / --card_dataset_id: a student trained from local copies is published with the Hub ids
    of its teacher (base_model) and data (datasets), still without a local path."""
    from huggingface_hub import ModelCard

    out = tmp_path / "student"
    extra = {"--card_teacher_id": "someone/tiny-teacher", "--card_dataset_id": "nyu-mll/glue"}
    args = {"--teacher_model_name_or_path": tiny_teacher_dir, "--student_teacher_layers": "0,1", **extra}
    recipe_main(_base(out, **args))
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "someone/tiny-teacher" and card.data.datasets == ["nyu-mll/glue"]
    result = card.data.eval_results[0]
    assert (result.dataset_type, result.dataset_name) == (
        "nyu-mll/glue",
        "local files of nyu-mll/glue (sentiment_tiny.tsv for training)",
    )
    assert "`someone/tiny-teacher`" in card.text and str(tmp_path) not in str(card)
