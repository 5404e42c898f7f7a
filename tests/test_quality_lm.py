"""benchmarks/quality/lm.py at tiny scale on the shared SQuAD paragraphs: corpus, BPE tokenizer, a GQA Llama
teacher trained from scratch with its curve, students of every kind of row kept as they land, and a rerun that
continues instead of training again."""

import json
from pathlib import Path

import pytest

from benchmarks.quality import lm

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad"


@pytest.mark.skipif(not (DATA / "train.json").exists(), reason="needs ../shared/data/squad")
def test_the_lm_benchmark_builds_everything_keeps_rows_and_continues(tmp_path, monkeypatch):
    argv = [
        "--data_dir", str(DATA), "--work_dir", str(tmp_path / "work"), "--results", str(tmp_path / "res"),
        "--runs_dir", str(tmp_path / "runs"), "--max_paragraphs", "40", "--vocab_size", "400", "--block_size", "32",
        "--teacher_layers", "2", "--hidden_size", "32", "--intermediate_size", "64", "--teacher_heads", "4",
        "--teacher_kv_heads", "2", "--teacher_steps", "4", "--teacher_batch_size", "4", "--teacher_eval_steps", "2",
        "--student_layers", "1", "--student_steps", "2", "--student_batch_size", "4", "--student_eval_steps", "1",
        "--eval_blocks", "4", "--test_blocks", "6", "--seeds", "1", "--variants", "ce", "jsd", "fkl_attn_hidden", "fkl_top64",
    ]  # fmt: skip
    result = lm.main(argv)
    corpus = (tmp_path / "work" / "data" / "train.txt").read_text().splitlines()
    assert len(corpus) == 40 and len(set(corpus)) == 40
    teacher = json.loads((tmp_path / "runs" / "teacher.json").read_text())
    assert [step for step, _ in teacher["teacher_curve"]] == [2, 4] and teacher["key"] == result["key"]
    (teacher_dir,) = (tmp_path / "work").glob("teacher-[0-9a-f]*")
    from transformers import AutoConfig, AutoTokenizer

    tokenizer, config = AutoTokenizer.from_pretrained(teacher_dir), AutoConfig.from_pretrained(teacher_dir)
    assert config.vocab_size % 64 == 0 and config.vocab_size > len(tokenizer)  # padded past the tokenizer
    assert config.num_key_value_heads == 2 and config.num_attention_heads == 4
    assert set(result["students"]) == {"ce", "jsd", "fkl_attn_hidden", "fkl_top64"}
    for name, s in result["students"].items():
        assert s["seeds"] == [1] and s["mean"] > 1 and [p for p, _ in s["learning_curves"][0]] == [1, 2], name
        kept = json.loads((tmp_path / "runs" / f"{name}_seed1.json").read_text())
        assert kept["run"]["perplexity"] == s["mean"]
    assert "better than `ce` by" in (tmp_path / "res.md").read_text()
    # the top-k row: its cache holds k = 64 float16 log-probabilities and 16-bit ids a position (4 bytes each)
    fidelity = result["students"]["fkl_top64"]["top_k_fidelity"]
    assert result["students"]["fkl_top64"]["cache_bytes_per_token"] == pytest.approx(64 * 4, rel=0.01)
    assert 0 < fidelity["teacher_top_k_mass"] < 1 and fidelity["k"] == 64
    assert "top 64 tokens hold" in (tmp_path / "res.md").read_text()

    # with k = every token of the tokenizer the top-k losses are the dense KL (random student against the teacher)
    (args,) = lm.HfArgumentParser(lm.QualityLMArguments).parse_args_into_dataclasses(argv)
    from transformers import AutoModelForCausalLM

    sharp = AutoModelForCausalLM.from_pretrained(teacher_dir)  # a student far from the teacher: its head x 30
    sharp.lm_head.weight.data.mul_(30.0)
    sharp.save_pretrained(tmp_path / "sharp")
    val = tmp_path / "work" / "data" / "validation.txt"
    whole = lm.top_k_fidelity(args, tmp_path / "sharp", teacher_dir, val, len(tokenizer))
    assert whole["teacher_top_k_mass"] == pytest.approx(1.0, abs=1e-5) and whole["kl_dense"] > 0.1
    for tail in ("renormalize", "uniform"):
        assert whole[f"kl_top_k_{tail}"] == pytest.approx(whole["kl_dense"], rel=1e-4)

    def refuse(argv):
        raise AssertionError(f"trained again: {argv}")

    monkeypatch.setattr(lm, "run_recipe", refuse)  # a rerun continues: teacher and rows are kept
    again = lm.main(argv)
    assert again["students"] == result["students"]
    link = tmp_path / "work" / "teacher"  # the stable name recipes/configs/wiki_student.yaml reads
    assert link.resolve() == teacher_dir.resolve()
    assert lm.main([*argv, "--teacher_only", "true"]) == teacher  # teacher_only: the teacher's record, no student

    # the shipped example config distills this teacher through the CLI (its settings, this scale's sizes)
    from hf_attn_distill.cli import main as cli_main

    root = Path(__file__).resolve().parents[1]
    demo = tmp_path / "demo"
    cli_main(
        [
            "lm", str(root / "recipes" / "configs" / "wiki_student.yaml"), "--teacher_model_name_or_path", str(link),
            "--student_teacher_layers", "1", "--train_file", str(tmp_path / "work" / "data" / "train.txt"),
            "--validation_file", str(val), "--block_size", "32", "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--max_eval_samples", "4", "--output_dir", str(demo), "--use_cpu",
        ]
    )  # fmt: skip
    metrics = json.loads((demo / "eval_results.json").read_text())
    assert metrics["eval_tokens"] == 4 * 31  # 4 held-out blocks of 32 tokens, each predicting 31
    assert {"eval_loss_kd", "eval_loss_attn_dec", "eval_loss_hidden", "teacher_eval_perplexity"} <= set(metrics)
    assert str(tmp_path) not in (demo / "README.md").read_text()


def test_a_retrained_lm_teacher_must_be_the_one_the_kept_rows_had(tmp_path):
    kept = {"key": "k", "perplexity": 40.0, "machine": "cpu A"}
    same = lm.same_teacher(kept, {"perplexity": 40.0 * (1 + 1e-4), "machine": "cpu B"}, tmp_path / "teacher.json")
    assert same["perplexity"] == 40.0 and same["retrained"] == [{"perplexity": 40.004, "machine": "cpu B"}]
    with pytest.raises(RuntimeError, match="would mix teachers.*move .* aside"):
        lm.same_teacher(kept, {"perplexity": 40.1, "machine": "cpu B"}, tmp_path / "teacher.json")


def test_the_lm_reading_sets_the_best_kd_row_against_ce_and_attention_against_it():
    """Hand-made rows: the best of fkl / rkl / jsd is the one of lowest perplexity, each gain is the difference of
    means, "more than the std" uses the larger std of the two sides, and one seed says there is no std yet."""

    def row(mean, std, seeds):
        return {"mean": mean, "std": std, "seeds": seeds}

    result = {
        "students": {
            "ce": row(160.0, 1.0, [1, 2]),
            "fkl": row(150.0, 0.5, [1, 2]),
            "rkl": row(149.0, 2.0, [1, 2]),
            "fkl_attn": row(150.5, 0.2, [1, 2]),
            "fkl_attn_hidden": row(140.0, 1.0, [1]),
        }
    }
    assert lm.reading(result) == (
        "Targets (gains in perplexity points, positive is better): the best logit-KD row, `rkl`, against `ce`: "
        "+11.00, more than the larger seed std (2.00); `fkl_attn` against `rkl`: -1.50, not more than the larger "
        "seed std (2.00); `fkl_attn_hidden` against `rkl`: +9.00 (one seed on a side: no std yet)."
    )
    assert lm.reading({"students": {"ce": row(160.0, 0.0, [1])}}) == ""


def test_the_lm_section_names_every_planned_row_run_or_not():
    """The README's LM paragraph names every row of the plan: those with runs, then the others as not run yet."""
    result = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/quality_lm.json").read_text())
    paragraph = lm.readme(result).split("\n")[2]
    waiting = [name for name in lm.VARIANTS if name not in result["students"]]
    assert all(f"`{name}`" in paragraph for name in lm.VARIANTS)
    assert ("; not run yet: " in paragraph) == bool(waiting)
    if waiting:
        assert all(f"`{name}`" in paragraph.split("; not run yet: ")[1] for name in waiting)
        assert not any(f"`{name}` (" in paragraph.split("; not run yet: ")[1] for name in result["students"])
