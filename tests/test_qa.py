"""Extractive QA: SQuAD metrics, features and post-processing, the KD mask, and the recipe end to end."""

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering

from hf_attn_distill import logit_kd_loss
from hf_attn_distill.tasks.metrics import (
    compute_squad_metrics,
    load_metric,
    normalize_answer,
    squad_exact_match,
    squad_f1,
)
from hf_attn_distill.tasks.qa import (
    QACollator,
    load_squad_json,
    misplaced_answers,
    postprocess_qa_predictions,
    prepare_train_features,
    prepare_validation_features,
)

# ---- metrics against hand-computed values ----


def test_normalize_answer_follows_the_official_rule():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theory") == "theory"  # 'the' only as a word


def test_exact_match_and_f1_hand_computed():
    assert squad_exact_match("the Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert squad_exact_match("Denver", ["Denver Broncos"]) == 0.0
    # pred "denver broncos team" vs ref "denver broncos": P = 2/3, R = 1, F1 = 0.8
    assert squad_f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    # best over references: vs "broncos" P = 1/3, R = 1 -> 0.5; vs "the team" -> P 1/3 R 1 -> 0.5; vs exact -> 0.8
    assert squad_f1("Denver Broncos team", ["Broncos", "the team", "Denver Broncos"]) == pytest.approx(0.8)
    assert squad_f1("cat", ["dog"]) == 0.0
    # v2: no answer
    assert squad_exact_match("", []) == 1.0 and squad_f1("", []) == 1.0
    assert squad_exact_match("something", []) == 0.0 and squad_f1("something", []) == 0.0


def test_compute_squad_metrics_v2_split_and_missing():
    refs = {"a": ["Denver Broncos"], "b": [], "c": ["1990"], "d": []}
    preds = {"a": "Denver Broncos team", "b": "", "c": "1991", "d": "x"}
    m = compute_squad_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(100 * 1 / 4)
    assert m["f1"] == pytest.approx(100 * (0.8 + 1 + 0 + 0) / 4)
    assert m["HasAns_exact"] == 0.0 and m["HasAns_f1"] == pytest.approx(40.0)
    assert m["NoAns_exact"] == 50.0 and m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    m = compute_squad_metrics({"a": "Denver Broncos"}, {"a": ["Denver Broncos"], "c": ["1990"]})
    assert m["exact_match"] == 50.0 and m["missing"] == 1
    with pytest.raises(ValueError, match="not in the references"):
        compute_squad_metrics({"zzz": "x"}, refs)


def test_squad_metric_loads_through_evaluate_offline():
    metric = load_metric("squad")
    out = metric.compute(
        predictions=[{"id": "1", "prediction_text": "the Broncos"}, {"id": "2", "prediction_text": "1991"}],
        references=[
            {"id": "1", "answers": {"text": ["Broncos"], "answer_start": [0]}},
            {"id": "2", "answers": {"text": ["1990"], "answer_start": [0]}},
        ],
    )
    assert out["exact_match"] == 50.0 and out["f1"] == 50.0


# ---- SQuAD-format data ----

FILLER = " ".join(f"word{i}" for i in range(80))
CONTEXT_1 = "Super Bowl 50 was won by the Denver Broncos in 2016 at Levi's Stadium."
# the answer sits far into a long context: with max_seq_length 64 it is only in a later window
CONTEXT_2 = f"{FILLER}. The capital of the small country is Vaduz, a town on the Rhine."


def squad_json(path, version_2=False, misplaced=False):
    qas_1 = [
        {
            "id": "q1",
            "question": "Who won Super Bowl 50?",
            "answers": [
                {"text": "Denver Broncos", "answer_start": CONTEXT_1.index("Denver Broncos")},
                {"text": "the Denver Broncos", "answer_start": CONTEXT_1.index("the Denver Broncos")},
            ],
        },
        {
            "id": "q2",
            "question": "When was it won?",
            "answers": [{"text": "2016", "answer_start": CONTEXT_1.index("2016")}],
        },
    ]
    if version_2:
        qas_1.append({"id": "q4", "question": "Who lost Super Bowl 51?", "answers": [], "is_impossible": True})
    if misplaced:
        qas_1.append({"id": "bad", "question": "Where?", "answers": [{"text": "Levi's Stadium", "answer_start": 3}]})
    qas_2 = [
        {
            "id": "q3",
            "question": "What is the capital?",
            "answers": [{"text": "Vaduz", "answer_start": CONTEXT_2.index("Vaduz")}],
        }
    ]
    data = {
        "version": "v2.0" if version_2 else "1.1",
        "data": [
            {"title": "Super_Bowl", "paragraphs": [{"context": CONTEXT_1, "qas": qas_1}]},
            {"title": "Country", "paragraphs": [{"context": CONTEXT_2, "qas": qas_2}]},
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_load_squad_json_flattens_nested_format(tmp_path):
    ds = load_squad_json(squad_json(tmp_path / "d.json", version_2=True))
    assert ds["id"] == ["q1", "q2", "q4", "q3"]
    assert ds[0]["answers"]["text"] == ["Denver Broncos", "the Denver Broncos"]
    assert ds[2]["answers"] == {"text": [], "answer_start": []}
    (tmp_path / "bad.json").write_text(json.dumps({"version": "1.1", "articles": []}))
    with pytest.raises(ValueError, match="not SQuAD-format"):
        load_squad_json(tmp_path / "bad.json")


def _features(tokenizer, ds, version_2=False, train=False, pad_to_max_length=True):
    prepare = prepare_train_features if train else prepare_validation_features
    options = dict(tokenizer=tokenizer, max_seq_length=64, doc_stride=16, max_query_length=16, version_2=version_2)
    return ds.map(
        prepare,
        batched=True,
        remove_columns=ds.column_names,
        fn_kwargs=dict(options, pad_to_max_length=pad_to_max_length),
    )


def test_labels_point_at_the_answer_tokens_in_every_window(tokenizer, tmp_path):
    ds = load_squad_json(squad_json(tmp_path / "d.json"))
    features = _features(tokenizer, ds, train=True)
    assert len(features) > len(ds)  # the long context overflowed into several windows
    by_text = []
    for f in features:
        s, e = f["start_positions"], f["end_positions"]
        by_text.append(tokenizer.decode(f["input_ids"][s : e + 1]) if s > 0 else None)
    assert "denver broncos" in by_text and "2016" in by_text and "vaduz" in by_text
    # windows of the long context without the answer are labelled CLS
    assert by_text.count(None) >= 1
    # the KD mask is exactly the context tokens
    f = features[0]
    context_tokens = [t for t, m in zip(f["input_ids"], f["kd_mask"]) if m]
    assert tokenizer.decode(context_tokens) == tokenizer.decode(
        tokenizer(CONTEXT_1, add_special_tokens=False)["input_ids"]
    )
    v2 = _features(tokenizer, load_squad_json(squad_json(tmp_path / "v2.json", version_2=True)), True, train=True)
    assert all(f["kd_mask"][0] == 1 for f in v2)  # v2: CLS (the null answer) is a position an answer can take


def test_misplaced_answers_are_refused_for_training(tokenizer, tmp_path):
    ds = load_squad_json(squad_json(tmp_path / "d.json", misplaced=True))
    assert misplaced_answers(ds) == ["bad"]
    with pytest.raises(ValueError, match="misplaced_answers"):
        _features(tokenizer, ds, train=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "validation"])
def test_collator_pads_a_batch_to_its_longest_window_exactly_as_max_length_padding(tokenizer, tmp_path, train):
    ds = load_squad_json(squad_json(tmp_path / "d.json", version_2=True))
    fixed = _features(tokenizer, ds, True, train=train)
    ragged = _features(tokenizer, ds, True, train=train, pad_to_max_length=False)
    lengths = [len(f["input_ids"]) for f in ragged]
    assert len(ragged) == len(fixed) and min(lengths) < max(lengths) <= 64  # windows of several lengths, unpadded
    columns = ["input_ids", "attention_mask", "token_type_ids", "kd_mask", "start_positions", "end_positions"]
    for rows in ([0, 1], list(range(len(ragged)))):
        batch = QACollator(tokenizer)([{c: ragged[i][c] for c in columns} for i in rows])
        longest = max(lengths[i] for i in rows)
        for column in columns:
            want = torch.tensor([fixed[i][column] for i in rows])
            want = want[:, :longest] if want.dim() == 2 else want
            assert torch.equal(batch[column], want), column
    batch = QACollator(tokenizer, pad_to_multiple_of=8)([{c: ragged[0][c] for c in columns}])
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["kd_mask"].shape == batch["input_ids"].shape
    assert batch["kd_mask"][0, lengths[0] :].sum() == 0 and batch["attention_mask"][0, lengths[0] :].sum() == 0


@pytest.mark.parametrize("version_2", [False, True])
def test_postprocessing_recovers_known_spans_exactly(tokenizer, tmp_path, version_2):
    examples = load_squad_json(squad_json(tmp_path / "d.json", version_2=version_2))
    features = _features(tokenizer, examples, version_2)
    # logits that point at each feature's labelled span (CLS for windows without it / unanswerable)
    start = np.full((len(features), 64), -5.0)
    end = np.full((len(features), 64), -5.0)
    for i, f in enumerate(features):
        start[i, f["start_positions"]] = 5.0
        end[i, f["end_positions"]] = 5.0
    answers = postprocess_qa_predictions(examples, features, start, end, version_2=version_2)
    assert answers["q1"] == "Denver Broncos" and answers["q2"] == "2016" and answers["q3"] == "Vaduz"
    if version_2:
        assert answers["q4"] == ""
    # the question's tokens score highest, and an end before each start scores higher than the real spans:
    # neither is taken
    start[:, 1] = end[:, 1] = 10.0
    for i, f in enumerate(features):
        if f["start_positions"] > 1:
            end[i, f["start_positions"] - 1] = 9.0
    assert postprocess_qa_predictions(examples, features, start, end, version_2=version_2) == answers
    # spans longer than max_answer_length are not taken
    assert postprocess_qa_predictions(examples, features, start, end, max_answer_length=1)["q1"] != "Denver Broncos"


def test_kd_mask_excludes_question_and_padding_positions(tokenizer, tmp_path):
    ds = load_squad_json(squad_json(tmp_path / "d.json"))
    features = _features(tokenizer, ds)
    mask = torch.tensor(features["kd_mask"][:2])
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 64), torch.randn(2, 64)
    base = logit_kd_loss(student, teacher, 2.0, class_mask=mask)
    changed = teacher.clone()
    changed[~mask.bool()] += torch.randn(int((~mask.bool()).sum())) * 10  # question, specials and padding
    assert logit_kd_loss(student, changed, 2.0, class_mask=mask).item() == pytest.approx(base.item(), rel=1e-6)
    changed = teacher.clone()
    changed[mask.bool()] += torch.randn(int(mask.sum())) * 10
    assert abs(logit_kd_loss(student, changed, 2.0, class_mask=mask).item() - base.item()) > 1e-3
    # equals the plain KD over the context positions alone
    row = mask[0].bool()
    want = logit_kd_loss(student[0, row][None], teacher[0, row][None], 2.0)
    got = logit_kd_loss(student[:1], teacher[:1], 2.0, class_mask=mask[:1])
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


# ---- the recipe ----


def _tiny_qa(seed, layers):
    torch.manual_seed(seed)
    return BertForQuestionAnswering(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def test_missing_columns_name_the_flag(tmp_path):
    from hf_attn_distill.tasks.qa import check_qa_columns

    ds = load_squad_json(squad_json(tmp_path / "d.json")).rename_column("question", "query")
    with pytest.raises(ValueError, match="no column 'question'.*--question_column_name"):
        check_qa_columns(ds, "train", {"--question_column_name": "question", "--context_column_name": "context"})


def _recipe_argv(teacher_dir, data, out, *extra, batch=4):
    return [
        "--teacher_model_name_or_path",
        str(teacher_dir),
        "--student_teacher_layers",
        "1,3",
        "--train_file",
        str(data),
        "--validation_file",
        str(data),
        "--output_dir",
        str(out),
        "--max_seq_length",
        "64",
        "--doc_stride",
        "16",
        "--max_query_length",
        "16",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        str(batch),
        "--per_device_eval_batch_size",
        str(batch),
        "--report_to",
        "none",
        "--use_cpu",
        "--evaluate_teacher",
        "--logging_steps",
        "1",
        *extra,
    ]


@pytest.mark.parametrize("version_2", [False, True], ids=["v1.1", "v2.0"])
def test_recipe_end_to_end(tmp_path, tokenizer, version_2, caplog):
    from hf_attn_distill.recipes.distill_qa import main

    teacher_dir = tmp_path / "teacher"
    _tiny_qa(0, 4).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    data = squad_json(tmp_path / "squad.json", version_2=version_2, misplaced=True)
    out = tmp_path / "student"
    metrics = main(_recipe_argv(teacher_dir, data, out, *(["--version_2_with_negative"] if version_2 else [])))
    for key in ("eval_exact_match", "eval_f1", "eval_loss_kd", "eval_loss_attn_enc", "teacher_eval_f1"):
        assert key in metrics, key
    if version_2:
        assert "eval_HasAns_f1" in metrics and "eval_NoAns_exact" in metrics
    # the example with a misplaced answer_start was dropped from training, counted and logged
    assert any("Dropped 1 of" in r.getMessage() and "bad" in r.getMessage() for r in caplog.records)
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["eval_f1"] == metrics["eval_f1"]
    card = (out / "README.md").read_text()
    assert "AutoModelForQuestionAnswering" in card and str(tmp_path) not in card
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "attention_encoder.png").exists() and (out / "loss_curves.png").exists()


def test_recipe_with_per_batch_padding_distills_and_scores_as_max_length_padding(tmp_path, tokenizer):
    """Padding each batch to its longest window (``--pad_to_max_length false``) leaves every distillation term
    and the scores unchanged; only the hard-label CE moves, because transformers' QA heads softmax over every
    position, padding included (as in ``run_qa.py``), so it is switched off here (``--alpha_ce 0``)."""
    from hf_attn_distill.recipes.distill_qa import main

    teacher_dir = tmp_path / "teacher"
    _tiny_qa(0, 4).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    data = squad_json(tmp_path / "squad.json", version_2=True)
    kd_only = ("--alpha_ce", "0", "--version_2_with_negative", "--hidden_weight", "1.0", "--relation_weight", "1.0")
    fixed = main(_recipe_argv(teacher_dir, data, tmp_path / "fixed", *kd_only, batch=2))
    ragged = main(
        _recipe_argv(teacher_dir, data, tmp_path / "ragged", "--pad_to_max_length", "false", *kd_only, batch=2)
    )
    compared = [k for k in fixed if k.startswith(("eval_", "teacher_eval_", "train_loss")) and "loss_ce" not in k]
    compared = [k for k in compared if not k.endswith(("runtime", "per_second"))]
    assert {
        "eval_f1",
        "eval_HasAns_f1",
        "eval_loss_kd",
        "eval_loss_attn_enc",
        "eval_loss_hidden",
        "eval_loss_relation",
    } <= set(compared)
    for key in compared:
        assert ragged[key] == pytest.approx(fixed[key], rel=1e-4, abs=1e-6), key
    # grouped batches (other batches, so another student) leave the teacher's scores, made in dataset order
    grouped = main(
        _recipe_argv(
            teacher_dir,
            data,
            tmp_path / "grouped",
            "--pad_to_max_length",
            "false",
            "--train_sampling_strategy",
            "group_by_length",
            *kd_only,
            batch=2,
        )
    )
    for key in (k for k in compared if k.startswith("teacher_eval_")):
        assert grouped[key] == pytest.approx(fixed[key], rel=1e-4, abs=1e-6), key


def test_group_by_length_over_max_length_windows_names_the_fix(tmp_path, tokenizer):
    from hf_attn_distill.recipes.distill_qa import main

    data = squad_json(tmp_path / "squad.json")
    with pytest.raises(ValueError, match="--pad_to_max_length false"):
        main(_recipe_argv(tmp_path, data, tmp_path / "out", "--train_sampling_strategy", "group_by_length"))


def test_do_predict_scores_all_of_the_test_file_while_evaluations_during_training_use_the_first_questions(
    tmp_path, tokenizer
):
    """``--test_file`` + ``--do_predict`` score every question of the test file (here the validation file itself)
    once at the end, exactly as an evaluation of the saved student on all of them; the evaluations during training
    (a learning curve) see only ``--max_eval_samples`` questions; the card reports the test scores and how many
    questions they cover."""
    from hf_attn_distill.recipes.distill_qa import main

    teacher_dir = tmp_path / "teacher"
    _tiny_qa(0, 4).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    data = squad_json(tmp_path / "squad.json")
    out = tmp_path / "student"
    curve = ["--max_eval_samples", "1", "--eval_strategy", "steps", "--eval_steps", "1"]
    metrics = main(_recipe_argv(teacher_dir, data, out, "--test_file", str(data), "--do_predict", *curve))
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_f1" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]
    again = main(["--training_mode", "finetune", *again_argv(out, data, tmp_path / "rescored")])
    assert metrics["test_f1"] == again["eval_f1"] and metrics["test_exact_match"] == again["eval_exact_match"]
    first = main(["--training_mode", "finetune", *again_argv(out, data, tmp_path / "first"), "--max_eval_samples", "1"])
    assert logged[-1]["eval_f1"] == first["eval_f1"]  # the last curve point: the first question only
    card = (out / "README.md").read_text()
    assert "local file squad.json, 3 questions" in card and f"{metrics['test_f1']:.2f}" in card


def again_argv(model_dir, data, out):
    """Flags that evaluate the model in ``model_dir`` on ``data`` without training: the recipe test's windows."""
    argv = _recipe_argv(model_dir, data, out)
    keep = {"--teacher_model_name_or_path", "--validation_file", "--output_dir", "--max_seq_length", "--doc_stride"}
    keep |= {"--max_query_length", "--per_device_eval_batch_size", "--report_to"}
    pairs = [argv[i : i + 2] for i, flag in enumerate(argv) if flag in keep]
    return [*(item for pair in pairs for item in pair), "--do_eval", "--use_cpu"]
