"""The translation recipe end to end on tiny models and a few real Multi30k-style sentence pairs."""

import pytest
import torch
from conftest import tiny_bert_config
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BertModel

from hf_attn_distill.recipes.distill_translation import load_parallel_text, main
from hf_attn_distill.tasks.metrics import compute_translation_metrics

DE = [
    "Zwei junge Männer sind im Freien.",
    "Ein Mädchen klettert in ein Spielhaus.",
    "Ein Hund rennt im Schnee.",
    "Eine Frau liest ein Buch.",
    "Männer spielen Fußball.",
    "Ein Kind isst Eis.",
]
EN = [
    "Two young men are outside.",
    "A girl climbs into a playhouse.",
    "A dog runs in the snow.",
    "A woman reads a book.",
    "Men play soccer.",
    "A child eats ice cream.",
]


@pytest.fixture()
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        (folder / f"{split}.de").write_text("\n".join(DE) + "\n")
        (folder / f"{split}.en").write_text("\n".join(EN) + "\n")
    return folder


@pytest.fixture()
def encoder_dir(tmp_path, tokenizer):
    torch.manual_seed(0)
    folder = tmp_path / "encoder"
    BertModel(tiny_bert_config(num_hidden_layers=4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


COMMON = [
    "--source_lang",
    "de",
    "--target_lang",
    "en",
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "3",
    "--per_device_eval_batch_size",
    "3",
    "--report_to",
    "none",
    "--use_cpu",
    "--save_strategy",
    "no",
    "--predict_with_generate",
    "--generation_max_length",
    "8",
    "--generation_num_beams",
    "1",
    "--learning_rate",
    "1e-3",
    "--disable_tqdm",
    "true",
]


def test_teacher_then_student_with_every_site(tmp_path, data_dir, encoder_dir):
    teacher_dir = tmp_path / "teacher"
    teacher_metrics = main(
        [
            "--training_mode",
            "finetune",
            "--teacher_model_name_or_path",
            str(encoder_dir),
            "--build_encoder_decoder",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(teacher_dir),
            "--do_train",
            "--do_eval",
            *COMMON,
        ]
    )
    assert "eval_bleu" in teacher_metrics
    student_dir = tmp_path / "student"
    metrics = main(
        [
            "--teacher_model_name_or_path",
            str(teacher_dir),
            "--student_teacher_layers",
            "1,3",
            "--student_decoder_layers",
            "0,3",
            "--layer_map",
            "uniform",
            "--decoder_layer_map",
            "uniform",
            "--cross_layer_map",
            "uniform",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(student_dir),
            "--do_train",
            "--do_eval",
            "--do_predict",
            "--evaluate_teacher",
            *COMMON,
        ]
    )
    for key in ("eval_loss_kd", "eval_loss_attn_enc", "eval_loss_attn_dec", "eval_loss_attn_cross"):
        assert metrics[key] > 0, key
    # the reported BLEU is sacrebleu's on the student's own greedy translations of the test sources
    student = AutoModelForSeq2SeqLM.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    enc = tokenizer(DE, return_tensors="pt", padding=True)
    generated = student.generate(**enc, max_length=8, num_beams=1)
    hyps = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    # against the raw reference sentences, lower-cased by default
    assert metrics["test_bleu"] == pytest.approx(compute_translation_metrics(hyps, EN)["bleu"], abs=1e-6)
    assert metrics["test_chrf"] == pytest.approx(compute_translation_metrics(hyps, EN)["chrf"], abs=1e-6)
    assert "teacher_test_bleu" in metrics
    assert (student.config.encoder.num_hidden_layers, student.config.decoder.num_hidden_layers) == (2, 2)
    for site in ("encoder", "decoder", "cross"):  # cross: a source x target alignment grid per mapped layer
        assert (student_dir / f"attention_{site}.png").stat().st_size > 0
    card = (student_dir / "README.md").read_text()
    assert "AutoModelForSeq2SeqLM" in card and "cross" in card and str(tmp_path) not in card


def test_bad_parallel_data_names_the_file(tmp_path):
    (tmp_path / "train.de").write_text("a\nb\nc\n")
    (tmp_path / "train.en").write_text("a\nb\n")
    with pytest.raises(ValueError, match="aligned line by line"):
        load_parallel_text(tmp_path, "train", "de", "en")
    (tmp_path / "train.en").write_text("a\n\nc\n")
    with pytest.raises(ValueError, match=r"train.en has empty lines \(line 2"):
        load_parallel_text(tmp_path, "train", "de", "en")
    with pytest.raises(FileNotFoundError, match="val.de"):
        load_parallel_text(tmp_path, "val", "de", "en")


def test_encoder_only_teacher_is_refused(tmp_path, data_dir, encoder_dir):
    with pytest.raises(ValueError, match="not an encoder-decoder model.*--build_encoder_decoder"):
        main(
            [
                "--training_mode",
                "finetune",
                "--teacher_model_name_or_path",
                str(encoder_dir),
                "--data_dir",
                str(data_dir),
                "--output_dir",
                str(tmp_path / "x"),
                "--do_train",
                *COMMON,
            ]
        )


def test_sequence_level_kd_trains_on_cached_teacher_translations(tmp_path, data_dir, encoder_dir):
    teacher_dir = tmp_path / "teacher"
    main(
        [
            "--training_mode",
            "finetune",
            "--teacher_model_name_or_path",
            str(encoder_dir),
            "--build_encoder_decoder",
            "--data_dir",
            str(data_dir),
            "--output_dir",
            str(teacher_dir),
            "--do_train",
            *COMMON,
        ]
    )
    out = tmp_path / "seq_kd"
    args = [
        "--teacher_model_name_or_path",
        str(teacher_dir),
        "--student_teacher_layers",
        "1,3",
        "--student_decoder_layers",
        "0,3",
        "--sequence_kd",
        "--sequence_kd_num_beams",
        "2",
        "--max_target_length",
        "8",
        "--data_dir",
        str(data_dir),
        "--output_dir",
        str(out),
        "--do_train",
        *COMMON,
    ]
    main(args)
    import gzip
    import json

    cached = json.loads(gzip.decompress((out / "teacher_translations" / "translations.json.gz").read_bytes()))
    teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    first = teacher.generate(**tokenizer(DE[:1], return_tensors="pt"), num_beams=2, max_length=8)[0].tolist()[1:]
    sep = tokenizer.sep_token_id
    assert cached[0] == (first[: first.index(sep) + 1] if sep in first else first)
    assert len(cached) == len(DE)
    assert "sequence_kd" in (out / "README.md").read_text()


def _check_scores_pair_in_order(metrics, prefix, folder, tokenizer, distinct=True):
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    generated = model.generate(**tokenizer(DE, return_tensors="pt", padding=True), max_length=8, num_beams=1)
    hyps = [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    if distinct:  # different translations, so that pairing them with the wrong references changes the score
        assert len(set(hyps)) > 1, prefix
    expected = compute_translation_metrics(hyps, EN)
    assert metrics[f"{prefix}_chrf"] == pytest.approx(expected["chrf"], abs=1e-6), prefix
    assert metrics[f"{prefix}_bleu"] == pytest.approx(expected["bleu"], abs=1e-6), prefix


def test_scores_pair_each_translation_with_its_reference_under_group_by_length(tmp_path, data_dir, encoder_dir):
    """Length-grouped training must not reorder evaluation (transformers' Trainer does): BLEU and chrF pair
    translation i with reference i, for a fine-tuned model, a student and its teacher scored in the same run."""
    grouped = [
        "--data_dir",
        str(data_dir),
        "--do_train",
        "--do_predict",
        "--train_sampling_strategy",
        "group_by_length",
    ]
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher_metrics = main(
        [
            "--training_mode",
            "finetune",
            "--teacher_model_name_or_path",
            str(encoder_dir),
            "--build_encoder_decoder",
            "--output_dir",
            str(teacher_dir),
            *grouped,
            *COMMON,
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    _check_scores_pair_in_order(teacher_metrics, "test", teacher_dir, tokenizer)
    metrics = main(
        [
            "--teacher_model_name_or_path",
            str(teacher_dir),
            "--student_teacher_layers",
            "1,3",
            "--student_decoder_layers",
            "0,3",
            "--evaluate_teacher",
            "--output_dir",
            str(student_dir),
            *grouped,
            *COMMON,
        ]
    )
    _check_scores_pair_in_order(metrics, "teacher_test", teacher_dir, tokenizer)
    _check_scores_pair_in_order(metrics, "test", student_dir, tokenizer, distinct=False)


def test_translations_are_generated_as_long_as_the_targets_not_transformers_default_20_tokens(tmp_path, encoder_dir):
    """Without --generation_max_length, generation stops at --max_target_length (as run_translation.py), not at
    transformers' generic max_length of 20 tokens that cut long translations at 21; the generation settings used
    are in the results and the card."""
    folder = tmp_path / "long"
    folder.mkdir()
    long_en = [" and ".join([sentence.rstrip(".")] * 4) + "." for sentence in EN]  # 30+ tokens each
    for split in ("train", "val", "test_2016_flickr"):
        (folder / f"{split}.de").write_text("\n".join(DE) + "\n")
        (folder / f"{split}.en").write_text("\n".join(long_en) + "\n")
    common = [flag for flag in COMMON if flag not in ("--generation_max_length", "8")]
    out = tmp_path / "model"
    argv = ["--training_mode", "finetune", "--teacher_model_name_or_path", str(encoder_dir), "--build_encoder_decoder"]
    argv += ["--data_dir", str(folder), "--output_dir", str(out), "--max_target_length", "40", "--do_predict"]
    metrics = main([*argv, *common])
    assert metrics["test_generation_max_length"] == 40 and metrics["test_generation_num_beams"] == 1
    assert metrics["test_gen_len"] > 21  # the untrained decoder never stops early: only the length limit cuts it
    card = (out / "README.md").read_text()
    assert "generation_max_length" in card and "| 40 |" in card
