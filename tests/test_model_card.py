"""Model cards: Hub metadata with a model-index that huggingface_hub parses back, no local paths, and the
card DistillTrainer.create_model_card writes from what it trained and evaluated."""

import getpass

import pytest
from huggingface_hub import ModelCard
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer
from hf_attn_distill.hub.model_card import (
    CardInfo,
    build_model_card,
    card_metrics,
    count_parameters,
    hub_model_id,
    public_model_name,
    summary_table,
    write_model_card,
)
from tests.conftest import tiny_classifier


def _info(**overrides) -> CardInfo:
    values = dict(
        model_name="me/tiny-student",
        task="text-classification",
        teacher="/home/someone/models/teacher",
        dataset="sst2",
        eval_split="validation split",
        method="logit KD",
        student_params=17_400_000,
        teacher_params=22_700_000,
        student_layers="3-layer",
        metrics={"accuracy": 0.85123},
        teacher_metrics={"accuracy": 0.9},
        settings={"temperature": 2.0, "layer_map": "uniform"},
        student_latency_ms=4.0,
        teacher_latency_ms=7.6,
        latency_note="batch 1",
        license="apache-2.0",
        repo_id="me/tiny-student",
    )
    values.update(overrides)
    return CardInfo(**values)


def test_card_metadata_parses_back_as_a_model_index(tmp_path):
    path = write_model_card(tmp_path, _info())
    card = ModelCard.load(path, ignore_metadata_errors=False)  # raises on a malformed model-index
    (result,) = card.data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_split) == (
        "text-classification",
        "sst2",
        "validation split",
    )
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.8512)
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.model_name == "me/tiny-student" and "knowledge-distillation" in card.data.tags
    assert card.data.base_model is None  # the teacher is a local folder, not a Hub id
    # teacher vs student table, compression and speed-up computed from the numbers given
    assert "| teacher | 22.7M | 0.9000 | 7.60 ms |" in card.text  # a folder named "teacher" is not named twice
    assert "| this student | 17.4M | 0.8512 | 4.00 ms |" in card.text
    assert f"{22.7 / 17.4:.2f}x fewer parameters" in card.text and f"{7.6 / 4.0:.2f}x faster" in card.text
    assert "| temperature | 2.0000 |" in card.text and "@article{hinton2015distilling" in card.text
    assert "/home/someone" not in card.content and "{{" not in card.content
    assert 'pipeline("text-classification", model="me/tiny-student")' in card.text  # loads from the repo id
    assert build_model_card(_info(license=None)).data.license is None  # no license asserted unless given


def test_hub_teacher_becomes_base_model_and_local_paths_never_appear(tmp_path):
    card = build_model_card(_info(teacher="sentence-transformers/all-MiniLM-L6-v2"))
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    local = tmp_path / "teacher"
    local.mkdir()
    for name in (str(local), "outputs/run/teacher", "../teacher"):
        assert hub_model_id(name) is None, name
        assert public_model_name(name) == "teacher"
    assert hub_model_id("bert-base-uncased") == "bert-base-uncased"
    card = build_model_card(_info(teacher=str(local)))
    assert str(tmp_path) not in card.content and card.data.base_model is None


def test_card_metrics_prefers_test_and_splits_teacher():
    metrics = {
        "eval_accuracy": 0.5,
        "test_accuracy": 0.7,
        "teacher_test_accuracy": 0.8,
        "test_loss": 1.0,
        "test_bleu": 20.0,
        "teacher_eval_accuracy": 0.6,
    }
    assert card_metrics(metrics) == ({"accuracy": 0.7, "bleu": 20.0}, {"accuracy": 0.8})
    assert card_metrics(metrics, "eval") == ({"accuracy": 0.5}, {"accuracy": 0.6})


def test_bad_card_info_and_missing_template_raise():
    with pytest.raises(ValueError, match="Unknown card task"):
        _info(task="summarization")
    with pytest.raises(ValueError, match="Unknown citations"):
        _info(citations=("nobody2020",))
    with pytest.raises(FileNotFoundError, match="template="):
        build_model_card(_info(), template="/nonexistent/card.md")


def test_trainer_create_model_card_reports_what_it_trained(tmp_path, sentiment_dataset, tokenizer):
    teacher, student = tiny_classifier(0), tiny_classifier(1, num_hidden_layers=2)
    args = DistillConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        attention_loss="mse_probs",
        layer_map="0:1,1:3",
        temperature=3.0,
        hub_model_id="me/distilled",
        disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=sentiment_dataset,
        eval_dataset=sentiment_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.create_model_card(dataset="sentiment_tiny", teacher_metrics={"accuracy": 0.75})
    card = ModelCard.load(tmp_path / "run" / "README.md", ignore_metadata_errors=False)
    (result,) = card.data.eval_results
    assert result.metric_value == round(metrics["eval_accuracy"], 4) and result.dataset_type == "sentiment_tiny"
    assert card.data.model_name == "me/distilled"
    assert "2-layer text classification student" in card.text
    assert "logit KD + attention transfer (mse_probs; encoder)" in card.text
    assert "| layer_map | [[0, 1], [1, 3]] |" in card.text and "| temperature | 3.0000 |" in card.text
    assert f"| {count_parameters(student) / 1e6:.1f}M | {metrics['eval_accuracy']:.4f} |" in card.text
    assert "| 0.7500 |" in card.text
    assert str(tmp_path) not in card.content and getpass.getuser() not in card.content.replace("knowledge", "")


def test_summary_table_lists_teacher_and_student():
    from hf_attn_distill.hub.model_card import summary_table

    lines = summary_table(_info()).splitlines()
    assert lines[0].split() == ["model", "parameters", "accuracy", "latency", "(batch", "1)"]
    assert lines[2].split() == ["teacher", "22.7M", "0.9000", "7.60", "ms"]
    assert lines[3].split() == ["this", "student", "17.4M", "0.8512", "4.00", "ms"]


def test_a_task_without_a_distillation_card_gets_the_generic_one(tmp_path):
    from transformers import BertForTokenClassification

    from tests.conftest import tiny_bert_config

    teacher, student = (
        BertForTokenClassification(tiny_bert_config()),
        BertForTokenClassification(tiny_bert_config(num_hidden_layers=2)),
    )
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, attention_weight=0.0)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    assert trainer.create_model_card(model_name="tagger") is None
    card = (tmp_path / "README.md").read_text()
    assert "generated_from_trainer" in card and "# tagger" in card  # transformers' generic draft


def test_cards_name_local_data_by_file_and_hub_data_by_id():
    """A local folder's name is not a Hub id: only Hub data goes into `datasets:`; the metrics name the file they
    were measured on (another data set's validation file is not 'the validation split of' the training data)."""
    from hf_attn_distill.recipes.common import describe_data

    local = describe_data(None, "/home/me/squad/train.json", "/home/me/covid_qa/dev.json", "validation")
    assert local == {
        "dataset": "local data (train.json for training)",
        "dataset_id": None,
        "eval_split": "local file dev.json",
    }
    hub = describe_data("glue", None, None, "validation", "sst2")
    assert hub == {"dataset": "glue (sst2)", "dataset_id": "glue", "eval_split": "validation split of glue (sst2)"}
    common = dict(
        model_name="s",
        task="question-answering",
        teacher="t",
        method="KD",
        student_params=1,
        teacher_params=2,
        student_layers="3-layer",
        metrics={"f1": 80.0},
    )
    card = build_model_card(CardInfo(**common, **local))
    assert "datasets" not in card.data.to_dict() and "/home/me" not in str(card)
    assert card.data.eval_results[0].dataset_split == "local file dev.json"
    assert build_model_card(CardInfo(**common, **hub)).data.datasets == ["glue"]


def test_a_teacher_folder_named_teacher_is_not_named_twice():
    info = CardInfo(
        model_name="s",
        task="text-classification",
        teacher="/somewhere/teacher",
        dataset="d",
        eval_split="dev",
        method="KD",
        student_params=1,
        teacher_params=2,
        student_layers="3-layer",
        metrics={"accuracy": 0.8},
        teacher_metrics={"accuracy": 0.9},
    )
    table = summary_table(info)
    assert "teacher teacher" not in table and table.splitlines()[2].startswith("teacher ")
    assert "teacher `minilm`" in build_model_card(CardInfo(**{**vars(info), "teacher": "/abs/out/minilm"})).text
