"""Merging benchmark result files (one process per seed, variants added later) gives the statistics of one run
over all of them, and refuses files that do not belong together."""

import argparse
import json
import re
import statistics
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from benchmarks.quality import sst2 as quality_sst2
from benchmarks.quality import translation as quality_translation
from benchmarks.quality.runs import portable_settings

SETTINGS = {"teacher_steps": 1000, "student_steps": 500, "batch_size": 32, "attention_weight_mse": 0.3}


def sst2_part(students: dict, **settings) -> dict:
    return {
        "teacher": 0.88,
        "student": "3 layers",
        "eval_set": "dev",
        "machine": "m",
        "settings": {**SETTINGS, **settings},
        "students": students,
    }


def entry(runs, seeds, wall):
    return {"mean": statistics.fmean(runs), "runs": runs, "seeds": seeds, "wall_s_mean": wall}


def write(tmp_path, name, result):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return str(path)


def test_sst2_merge_equals_statistics_of_all_runs(tmp_path):
    a = write(
        tmp_path, "a", sst2_part({"kd": entry([0.80, 0.82], [1, 2], 100.0), "kd_hidden": entry([0.84], [1], 50.0)})
    )
    b = write(
        tmp_path, "b", sst2_part({"kd": entry([0.86], [3], 400.0), "kd_hidden": entry([0.85, 0.83], [3, 2], 80.0)})
    )
    result = quality_sst2.main(["--merge_results", a, b, "--results", str(tmp_path / "merged")])
    kd, hidden = result["students"]["kd"], result["students"]["kd_hidden"]
    assert kd["runs"] == [0.80, 0.82, 0.86] and kd["seeds"] == [1, 2, 3]
    assert kd["mean"] == pytest.approx(0.82666666) and kd["std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.86]))
    assert kd["wall_s_mean"] == pytest.approx((100 + 100 + 400) / 3)  # exact mean over the 3 runs
    assert hidden["seeds"] == [1, 2, 3] and hidden["runs"] == [0.84, 0.83, 0.85]
    assert hidden["retention"] == pytest.approx(0.84 / 0.88)
    assert result["merged_from"] == ["a.json", "b.json"]
    # the summary describes the runs' settings, not the merge command's defaults (0.2)
    assert result["settings"]["attention_weight_mse"] == 0.3 and result["settings"]["seeds"] == [1, 2, 3]
    written = json.loads((tmp_path / "merged.json").read_text())
    assert written["students"]["kd"]["runs"] == [0.80, 0.82, 0.86]
    assert "| kd | 82.67% |" in (tmp_path / "merged.md").read_text()
    only_kd = quality_sst2.main(["--merge_results", a, b, "--results", str(tmp_path / "kd"), "--variants", "kd"])
    assert list(only_kd["students"]) == ["kd"] and only_kd["settings"]["variants"] == ["kd"]


def test_merge_refuses_a_run_twice_and_other_budgets(tmp_path):
    a = write(tmp_path, "a", sst2_part({"kd": entry([0.80], [1], 1.0)}))
    again = write(tmp_path, "again", sst2_part({"kd": entry([0.81], [1], 1.0)}))
    with pytest.raises(SystemExit, match="kd seed 1 is in more than one file"):
        quality_sst2.main(["--merge_results", a, again, "--results", str(tmp_path / "m")])
    longer = write(tmp_path, "longer", sst2_part({"kd": entry([0.81], [2], 1.0)}, student_steps=1000))
    other_mse = write(tmp_path, "other_mse", sst2_part({"kd": entry([0.81], [2], 1.0)}, attention_weight_mse=0.2))
    for other in (longer, other_mse):
        with pytest.raises(SystemExit, match="different teachers, students, eval sets, machines or settings"):
            quality_sst2.main(["--merge_results", a, other, "--results", str(tmp_path / "m")])


def test_sst2_merge_adds_the_general_student_with_its_own_budget(tmp_path):
    general = {"steps": 1200, "batch": 32, "tokens_per_block": 128, "wall_s": 4800.0, "objective": "o", "text": "t"}
    a = write(tmp_path, "a", sst2_part({"small_kd": entry([0.79, 0.80], [1, 2], 300.0)}))
    b = write(
        tmp_path,
        "b",
        {
            **sst2_part({"small_general_kd": entry([0.82, 0.81], [1, 2], 310.0)}, general_steps=1200),
            "general_distillation": general,
        },
    )
    result = quality_sst2.main(["--merge_results", a, b, "--results", str(tmp_path / "merged")])
    assert list(result["students"]) == ["small_kd", "small_general_kd"]
    assert result["general_distillation"] == general and result["settings"]["general_steps"] == 1200
    assert "general-distilled once: 1200 steps" in (tmp_path / "merged.md").read_text()
    without = quality_sst2.main(["--merge_results", a, b, "--results", str(tmp_path / "kd"), "--variants", "small_kd"])
    assert "general_distillation" not in without


def test_translation_merge_keeps_chrf_means_exact(tmp_path):
    settings = {
        "teacher_steps": 500,
        "teacher_train_examples": 10,
        "student_steps": 250,
        "train_examples": 8,
        "batch_size": 32,
    }
    base = {
        "teacher": 10.0,
        "teacher_chrf": 30.0,
        "student": "3+3",
        "eval_set": "flickr",
        "machine": "m",
        "settings": settings,
    }

    def part(runs, seeds, chrf):
        return {**base, "students": {"kd": {**entry(runs, seeds, 5.0), "chrf_mean": chrf}}}

    a = write(tmp_path, "a", part([11.0, 12.0], [1, 2], 31.0))
    b = write(tmp_path, "b", part([14.0], [3], 34.0))
    result = quality_translation.main(["--merge_results", a, b, "--results", str(tmp_path / "merged")])
    kd = result["students"]["kd"]
    assert kd["runs"] == [11.0, 12.0, 14.0] and kd["mean"] == pytest.approx(37 / 3)
    assert kd["chrf_mean"] == pytest.approx((31 + 31 + 34) / 3) and kd["retention"] == pytest.approx(37 / 30)


def test_portable_settings_hold_no_machine_paths(tmp_path):
    root = tmp_path / "repo"
    args = quality_sst2.QualityArguments(
        results=str(root / "benchmarks" / "results" / "x"), data_dir=str(tmp_path / "shared" / "data" / "sst2")
    )
    settings = portable_settings(args, root)
    assert settings["results"] == "benchmarks/results/x"
    assert settings["data_dir"] == "../shared/data/sst2"
    assert settings["work_dir"] == "outputs/quality_sst2" and settings["seeds"] == [1, 2, 3]
    args.merge_results = [str(root / "benchmarks" / "results" / "a.json"), "relative.json"]
    assert portable_settings(args, root)["merge_results"] == ["benchmarks/results/a.json", "relative.json"]
    namespace = argparse.Namespace(output=str(root / "benchmarks" / "results" / "speed"), steps=5)  # speed.py's args
    assert portable_settings(namespace, root) == {"output": "benchmarks/results/speed", "steps": 5}


def test_finished_runs_are_kept_and_a_rerun_continues(tmp_path):
    """A benchmark longer than one sitting is finished by running the same command again: finished (variant,
    seed) runs are reused when their key matches, and trained again when it does not."""
    from benchmarks.quality.runs import run_students

    calls = []

    def run_one(name, seed, output_dir):
        calls.append((name, seed))
        return {"accuracy": 0.5 + seed / 10}

    def summarize(runs):
        return {"students": {n: [r["accuracy"] for r in items] for n, items in runs.items()}}

    def go(key, seeds):
        return run_students(
            ["kd"],
            seeds,
            tmp_path,
            run_one,
            summarize,
            tmp_path / "res",
            lambda r: "",
            done_dir=tmp_path / "done",
            key=key,
        )

    go("teacher-a", [1])
    assert go("teacher-a", [1, 2])["students"] == {"kd": [0.6, 0.7]} and calls == [("kd", 1), ("kd", 2)]
    go("teacher-b", [1])  # another teacher or settings: trained again
    assert calls[-1] == ("kd", 1) and len(calls) == 3


def test_a_rerun_of_some_rows_keeps_the_others_in_the_table_and_the_plan_counts_every_row(tmp_path):
    """``--variants b --seeds 3`` after ``--seeds 1 2`` of every row: the table still holds every kept row of the
    benchmark (``table_variants``), in its order, and the README's plan counts every row and seed, not only the
    ones the last command asked for."""
    from benchmarks.quality.runs import run_students, runs_planned

    def go(variants, seeds):
        return run_students(
            variants,
            seeds,
            tmp_path,
            lambda name, seed, output_dir: {"f1": seed + (name == "b")},
            lambda runs: {"students": {n: {"seeds": [r["seed"] for r in rs]} for n, rs in runs.items()}},
            tmp_path / "res",
            lambda r: "",
            done_dir=tmp_path / "done",
            key="k",
            table_variants=["a", "b", "c"],
        )

    go(["a", "b", "c"], [1, 2])
    result = go(["b"], [3])
    assert result["students"] == {"a": {"seeds": [1, 2]}, "b": {"seeds": [1, 2, 3]}, "c": {"seeds": [1, 2]}}
    assert runs_planned(result, ["a", "b", "c"], (1, 2, 3)) == "9 planned (3 rows x seeds 1, 2, 3)"
    assert runs_planned(result, ["a", "b"], (1, 2)) == "9 planned (3 rows x seeds 1, 2, 3)"  # rows and seeds held


def test_two_processes_of_one_benchmark_each_write_a_table_with_the_others_rows(tmp_path):
    """Two commands of the same benchmark running at once (other variants, other seeds): a row the other keeps while
    this one runs is in the table this one writes next, so neither overwrites the table without the other's rows."""
    from benchmarks.quality.runs import run_students

    done = tmp_path / "done"

    def other_process_keeps_a_row(name, seed, output_dir):
        if name == "a":  # meanwhile the other command finishes its row c, seed 3
            done.mkdir(parents=True, exist_ok=True)
            run = {"f1": 9.0, "seed": 3, "wall_s": 1.0, "machine": "m", "commit": None}
            (done / "c_seed3.json").write_text(json.dumps({"key": "k", "run": run, "card": None}))
        return {"f1": float(seed)}

    tables = []

    def summarize(runs):
        table = {"students": {n: {"seeds": [r["seed"] for r in rs]} for n, rs in runs.items()}}
        tables.append(table)
        return table

    result = run_students(
        ["a", "b"], [2], tmp_path, other_process_keeps_a_row, summarize, tmp_path / "res", lambda r: "",
        done_dir=done, key="k", table_variants=["a", "b", "c"],
    )  # fmt: skip
    assert tables[1]["students"] == {"a": {"seeds": [2]}, "c": {"seeds": [3]}}  # written after row a
    assert result["students"] == {"a": {"seeds": [2]}, "b": {"seeds": [2]}, "c": {"seeds": [3]}}


def test_step_time_rows_are_valid_recipe_commands(monkeypatch, tmp_path):
    """Every row of benchmarks/speed/step_time.py is a command its recipe parses, with the precision, threads, lengths
    and cache the row's name says; the per-step time is the difference of two runs."""
    from benchmarks.speed import step_time
    from hf_attn_distill import DistillConfig, DistillSeq2SeqConfig
    from hf_attn_distill.recipes import common, distill_qa, distill_translation
    from hf_attn_distill.recipes.distill_classification import parse_args

    monkeypatch.setattr(step_time, "_mt_teacher_dir", lambda work: "mt-teacher")
    monkeypatch.setattr(step_time, "_qa_teacher_dir", lambda work: "qa-teacher")
    monkeypatch.setattr(step_time, "_minilm", lambda: "minilm")
    types = {
        "hf_attn_distill.recipes.distill_translation": (
            distill_translation.TranslationModelArguments,
            distill_translation.TranslationDataArguments,
            DistillSeq2SeqConfig,
        ),
        "hf_attn_distill.recipes.distill_qa": (common.ModelArguments, distill_qa.QADataArguments, DistillConfig),
    }
    for row in step_time.ROWS:
        module, argv = step_time.recipe_argv(row, tmp_path, str(tmp_path / "out"), 7)
        if module in types:
            model, data, training = common.parse_args(types[module], argv)
        else:
            model, data, training = parse_args(argv)
        assert training.max_steps == 7 and training.bf16 == ("bf16" in row), row
        assert (model.training_mode == "finetune") == ("_teacher_" in row), row
        if row.startswith(("mt_student", "qa_student")):
            assert training.eval_with_teacher is False, row  # scored alone, as the benchmarks' students
        if row.startswith("mt_"):
            assert data.max_source_length == (40 if row.endswith("len40") else 64)
            assert (training.train_sampling_strategy == "group_by_length") == row.endswith("group")
        if row.startswith("qa_"):
            assert (training.train_sampling_strategy == "group_by_length") == row.endswith("group")
            assert data.pad_to_max_length == (not row.endswith("group")), row  # recipe refuses grouping padded
        assert (training.teacher_logits_cache is not None) == row.endswith("cache"), row
        assert step_time.threads_of(row) == (2 if "_2t" in row else 1)
    assert step_time.per_step({"train_runtime": 10.0}, {"train_runtime": 30.0}, 5, 25) == 1.0
    monkeypatch.setattr(step_time, "native_bf16", lambda: False)
    assert step_time.default_rows() == [row for row in step_time.ROWS if "fp32" in row or row.startswith("sst2")]
    monkeypatch.setattr(step_time, "native_bf16", lambda: True)
    assert step_time.default_rows() == list(step_time.ROWS)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "squad" / "train.json").exists(), reason="needs ../shared/data")
def test_general_student_is_trained_once_on_training_text_only(tmp_path, minilm_path):
    """small_general_*: the general-distillation stage on a tiny budget; a second call reuses the student."""
    from transformers import BertModel

    args = quality_sst2.QualityArguments(
        work_dir=str(tmp_path),
        data_dir=str(SHARED / "sst2"),
        general_steps=2,
        general_batch_size=2,
        general_max_seq_length=16,
        general_relation_heads=4,
    )
    folder, cost = quality_sst2.general_student(args, tmp_path)
    student = BertModel.from_pretrained(folder)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (4, 256)
    assert cost["steps"] == 2 and cost["wall_s"] > 0
    again_folder, again = quality_sst2.general_student(args, tmp_path)
    assert again_folder == folder and again["wall_s"] == cost["wall_s"]  # not trained again
    corpus = set((tmp_path / "corpus.txt").read_text().splitlines())
    with open(SHARED / "sst2" / "test.tsv") as f:
        evaluation = {line.split("\t")[0] for line in list(f)[1:]}
    assert len(corpus) > 50_000 and not corpus & evaluation


def test_speed_repeats_report_the_median_of_the_process_medians():
    """``--repeats``: one row per (pair, length, batch, mode) from several processes, each a hand-made reading: the
    median of their step medians and memory readings, every step kept; a failed process makes the row its error; a
    single process is returned as it is."""
    from benchmarks.speed.step import merge_processes

    key = {"pair": "p", "seq_len": 64, "batch": 8, "mode": "D"}
    runs = [
        {**key, "step_s": s, "step_s_all": [s, s + 1], "peak_mb": m, "peak_above_start_mb": m - 100}
        for s, m in ((0.30, 900.0), (0.26, 950.0), (0.28, 910.0))
    ]
    row = merge_processes(runs)
    assert row["step_s"] == 0.28 and row["process_step_s"] == [0.30, 0.26, 0.28]
    assert row["peak_mb"] == 910.0 and row["peak_above_start_mb"] == 810.0
    assert row["step_s_all"] == [0.30, 1.30, 0.26, 1.26, 0.28, 1.28]
    assert merge_processes([runs[0], {**key, "error": "timed out after 9 s"}])["error"] == "timed out after 9 s"
    assert merge_processes(runs[:1]) is runs[0]


def test_speed_long_pair_runs_every_mode_and_reports_memory_above_the_limit():
    """The long-position pair of benchmarks/speed/step.py on a short batch: each mode runs in this process, and the
    summary gives D's and N's working memory above L."""
    from benchmarks.speed import step as speed

    rows = []
    for mode in ("L", "D", "N"):
        spec = {"pair": "long6->3", "seq_len": 32, "batch": 1, "mode": mode, "warmup": 0, "steps": 1, "bf16": False}
        rows.append({"pair": "long6->3", "seq_len": 32, "batch": 1, "mode": mode, **speed.run_worker(spec)})
    assert all(r["step_s"] > 0 and r["peak_mb"] > 0 for r in rows)
    (summary,) = speed.ratios(rows)
    by_mode = {r["mode"]: r for r in rows}
    if "peak_above_start_mb" in by_mode["L"]:
        want = by_mode["D"]["peak_above_start_mb"] - by_mode["L"]["peak_above_start_mb"]
        assert summary["D-L_work_mb"] == pytest.approx(want)
    assert "D/N_time" in summary and "| D working MB above L |" in speed.markdown(
        {"machine": "m", "rows": rows, "ratios": [summary]}
    )


def test_gpu_plan_flags_are_the_benchmarks_own_and_full_scale_needs_cuda(tmp_path, monkeypatch):
    """benchmarks/quality/run_gpu.py: every planned flag parses with its benchmark's parser; full scale refuses a CPU."""
    import torch
    from transformers import HfArgumentParser

    from benchmarks.quality import qa as quality_qa
    from benchmarks.quality import run_gpu as run_gpu

    parsers = {
        "sst2": quality_sst2.QualityArguments,
        "qa": quality_qa.QualityQAArguments,
        "translation": quality_translation.QualityTranslationArguments,
    }
    for scale in run_gpu.PLANS:
        for task, argv in run_gpu.plan(scale, tmp_path / "work", tmp_path / "results"):
            (parsed,) = HfArgumentParser(parsers[task]).parse_args_into_dataclasses(argv)
            assert parsed.seeds == [1] and parsed.results == str(tmp_path / "results" / f"quality_{task}")
    full = dict(run_gpu.plan("full", tmp_path, tmp_path))
    (qa,) = HfArgumentParser(quality_qa.QualityQAArguments).parse_args_into_dataclasses(full["qa"])
    assert (qa.train_examples, qa.eval_examples) == (87599, 10570)  # all of SQuAD v1.1
    assert qa.teacher_dir == "" and qa.runs_dir == str(tmp_path / "runs" / "qa")  # its own teacher, its own runs
    shipped = dict(run_gpu.plan("full", tmp_path, tmp_path, teacher_dirs={"qa": "t"}))
    assert (
        HfArgumentParser(quality_qa.QualityQAArguments).parse_args_into_dataclasses(shipped["qa"])[0].teacher_dir == "t"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--scale tiny"):
        run_gpu.main(["--work_dir", str(tmp_path)])


@pytest.mark.very_slow
@pytest.mark.skipif(not (SHARED / "squad" / "train.json").exists(), reason="needs ../shared/data")
def test_gpu_plan_runs_end_to_end_at_tiny_scale(tmp_path):
    """The whole GPU plan at tiny scale on CPU (about 3 minutes on 2 cores): every part trains and writes results."""
    from benchmarks.quality import run_gpu as run_gpu

    summary = run_gpu.main(["--scale", "tiny", "--work_dir", str(tmp_path / "w"), "--results_dir", str(tmp_path / "r")])
    assert set(summary["wall_s"]) == set(run_gpu.TASKS)
    for task in run_gpu.TASKS:
        result = json.loads((tmp_path / "r" / f"quality_{task}.json").read_text())
        assert list(result["students"]) == ["kd"] and result["students"]["kd"]["seeds"] == [1]
        assert (tmp_path / "r" / "cards" / task / "README.md").exists()  # its cards stay beside its results


@pytest.mark.parametrize("name", ["speed", "speed_long", "speed_recheck", "speed_384", "speed_recheck_xeon"])
def test_the_readmes_speed_tables_are_the_committed_runs(name):
    """The speed tables of README.md and benchmarks/README.md are summary_table() of the committed result files,
    so a table cannot drift from the run it claims to show."""
    from benchmarks.speed import step as speed

    root = Path(__file__).resolve().parent.parent
    result = json.loads((root / "benchmarks" / "results" / f"{name}.json").read_text())
    table = speed.summary_table(result)
    assert table in (root / "benchmarks/README.md").read_text(), f"benchmarks/README.md does not show {name}.json"
    if name == "speed":  # the top-level README: the batch-8 rows (length sweep, QA, encoder-decoder)
        short = speed.summary_table(result, batch=8)
        assert short in (root / "README.md").read_text(), "README.md does not show benchmarks/results/speed.json"
        assert short.count("\n") == 2 + sum(item["batch"] == 8 for item in result["ratios"])
        # both READMEs say its times are paired (one process, modes in turn, per-round ratios)
        assert result["settings"]["paired"] and all(item.get("timing") == "paired" for item in result["ratios"])
        assert "times paired" in " ".join((root / "README.md").read_text().split())
        assert "**Timing is paired** (`--paired`)" in (root / "benchmarks/README.md").read_text()


def test_the_best_students_card_is_published_as_its_recipe_wrote_it(tmp_path):
    """``card_dir/README.md`` is, byte for byte, the card the best run's recipe wrote (best variant by mean, then
    its best seed), also when that run was kept from an earlier sitting; ``result["card"]`` names the run."""
    from benchmarks.quality.runs import best_run, mean_std, run_students

    scores = {("kd", 1): 0.70, ("kd", 2): 0.74, ("kd_attn", 1): 0.80, ("kd_attn", 2): 0.76}

    def run_one(name, seed, output_dir):
        output_dir.mkdir(parents=True)
        (output_dir / "README.md").write_text(f"---\nmodel: {name}\n---\ncard of {name} seed {seed}\n")
        return {"accuracy": scores[name, seed]}

    def summarize(runs):
        students = {}
        for name, items in runs.items():
            values = [r["accuracy"] for r in items]
            students[name] = {"mean": mean_std(values)[0], "runs": values, "seeds": [r["seed"] for r in items]}
        return {"students": students}

    def go(seeds):
        return run_students(
            ["kd", "kd_attn"],
            seeds,
            tmp_path / "work",
            run_one,
            summarize,
            tmp_path / "res",
            lambda r: "",
            done_dir=tmp_path / "done",
            key="k",
            card_dir=tmp_path / "cards",
        )

    assert go([1])["card"] == {"variant": "kd_attn", "seed": 1}
    assert (tmp_path / "cards" / "README.md").read_text() == "---\nmodel: kd_attn\n---\ncard of kd_attn seed 1\n"
    (tmp_path / "cards" / "README.md").unlink()
    result = go([1, 2])  # seed 1 kept from the first sitting, its card with it; kd_attn seed 1 is still the best
    assert result["card"] == {"variant": "kd_attn", "seed": 1}
    assert json.loads((tmp_path / "res.json").read_text())["card"] == {"variant": "kd_attn", "seed": 1}
    assert (tmp_path / "cards" / "README.md").read_text().endswith("card of kd_attn seed 1\n")
    # best variant by mean (kd_attn 0.78 > kd 0.72), then its best seed; the first seed wins a tie
    students = result["students"]
    assert best_run(result) == ("kd_attn", 1)
    assert best_run(result, among={("kd_attn", 2), ("kd", 2)}) == ("kd_attn", 2)
    assert best_run(result, among={("kd", 2)}) is None  # no card of the best variant: nothing published
    students["kd_attn"]["runs"] = [0.78, 0.78]
    assert best_run(result) == ("kd_attn", 1)
    assert best_run({"students": {}}) is None


def test_step_time_budget_is_steps_times_step_time_plus_evaluations():
    """The hours step_time.py reports for the translation benchmark's defaults, by hand: 6 doubling rounds
    (500 ... 16,000 steps) at the two-at-once step time, 6 dev evaluations slowed by the same factor, and 8
    variants x 2 seeds + 3 attention-weight tuning runs of 250 student steps + one evaluation each; two processes
    share the machine."""
    from benchmarks.speed import step_time

    def row(name, step_s, eval_s, processes=1):
        return {"row": name, "threads": 1, "processes": processes, "step_s": step_s, "eval_s": eval_s}

    result = {
        "machine": "m",
        "short": 5,
        "long": 25,
        "rows": [
            row("mt_teacher_bf16_1t", 2.0, 60.0),
            row("mt_teacher_bf16_1t_x2", 3.0, 90.0, processes=2),
            row("mt_student_bf16", 1.0, 30.0),
            row("qa_teacher_bf16_1t", 1.0, 10.0),  # no qa_*_x2 row: QA left out
        ],
    }
    (plan,) = step_time.budget(result)
    assert plan["benchmark"] == "quality_translation" and plan["teacher_steps"] == 16000
    assert plan["teacher_h"] == pytest.approx((16000 * 3.0 + 6 * 60.0 * 1.5) / 2 / 3600)
    assert plan["student_runs"] == 8 * 2 + 3 and plan["student_steps"] == 250
    assert plan["students_h"] == pytest.approx(19 * (250 * 1.0 + 30.0) * 1.5 / 2 / 3600)
    assert "| quality_translation | 16,000 | 6.7 | 13.5 | 19 x 250 | 1.1 | 7.8 |" in step_time.markdown(result)
    # float32 measured too and faster two-at-once (bf16 emulated): the plan uses the float32 rows
    result["rows"] += [
        row("mt_teacher_fp32_1t", 1.0, 20.0),
        row("mt_teacher_fp32_1t_x2", 1.5, 30.0, processes=2),
        row("mt_student_fp32", 0.5, 10.0),
    ]
    (plan,) = step_time.budget(result)
    assert plan["teacher_h"] == pytest.approx((16000 * 1.5 + 6 * 20.0 * 1.5) / 2 / 3600)
    assert plan["students_h"] == pytest.approx(19 * (250 * 0.5 + 10.0) * 1.5 / 2 / 3600)


def test_step_time_update_replaces_rows_only_in_a_result_of_the_same_machine(tmp_path):
    from benchmarks.speed import step_time

    fresh = {"machine": "m", "short": 5, "long": 25, "rows": []}
    with pytest.raises(SystemExit, match="measure without --update first"):
        step_time.updatable(tmp_path / "st.json", fresh)
    (tmp_path / "st.json").write_text(json.dumps({**fresh, "machine": "other", "rows": [{"row": "sst2_kd"}]}))
    with pytest.raises(SystemExit, match="another machine or with other steps"):
        step_time.updatable(tmp_path / "st.json", fresh)
    (tmp_path / "st.json").write_text(json.dumps({**fresh, "rows": [{"row": "sst2_kd"}]}))
    assert step_time.updatable(tmp_path / "st.json", fresh)["rows"] == [{"row": "sst2_kd"}]


def test_the_readmes_sst2_table_is_the_committed_run():
    root = Path(__file__).resolve().parent.parent
    table = quality_sst2.readme(json.loads((root / "benchmarks" / "results" / "quality_sst2.json").read_text()))
    assert table in (root / "README.md").read_text(), "README.md does not show benchmarks/results/quality_sst2.json"


def test_readme_table_gains_retention_and_the_flag_by_hand():
    from benchmarks.quality.runs import readme_table

    def student(mean, std, seeds=(1, 2)):
        return {"mean": mean, "std": std, "seeds": list(seeds)}

    result = {
        "metric": "BLEU",
        "teacher": 30.0,
        "students": {
            "kd_attn": student(31.5, 0.25),
            "kd": student(27.0, 0.5),
            "finetune": student(24.0, 1.0),
            "small": student(20.0, 0.0, (1,)),
        },
    }
    table = readme_table(
        result, labels={"finetune": "`finetune` (no teacher)", "kd": "`kd`"}, compared=lambda n: n != "small"
    )
    assert table.splitlines()[2:] == [
        "| teacher | 30.00 | | | | | |",
        "| `finetune` (no teacher) | 24.00 | 1.00 | 1, 2 | 80.00% | - | -3.00 |",
        "| `kd` | 27.00 | 0.50 | 1, 2 | 90.00% | +3.00 | - |",
        "| `kd_attn` (at or above the teacher!) | **31.50** | 0.25 | 1, 2 | **105.00%** | +7.50 | +4.50 |",
        "| `small` | 20.00 | 0.00 | 1 | 66.67% |  |  |",
        "",
        "Flagged: `kd_attn` at or above the teacher, so the teacher is too weak for these rows to show what its "
        "signal does.",
    ]
    # accuracies kept as fractions: scaled to points
    scaled = readme_table({"metric": "accuracy", "teacher": 0.9, "students": {"kd": student(0.81, 0.01)}}, 100, "%")
    assert "| `kd` | **81.00%** | 1.00 | 1, 2 | **90.00%** |  | - |" in scaled


def test_per_site_attention_curves_come_from_the_training_log(tmp_path):
    from benchmarks.quality.runs import term_curves

    log = [
        {"step": 50, "loss": 3.0, "loss_kd": 2.0, "loss_attn_enc": 0.4, "loss_attn_cross": 0.9, "learning_rate": 1e-4},
        {"step": 100, "loss": 2.0, "loss_kd": 1.5, "loss_attn_enc": 0.2, "loss_attn_cross": 0.7},
        {"step": 100, "train_loss": 2.5, "train_runtime": 9.0},
    ]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    curves = term_curves(tmp_path)
    assert curves == {
        "loss_kd": [[50, 2.0], [100, 1.5]],
        "loss_attn_enc": [[50, 0.4], [100, 0.2]],
        "loss_attn_cross": [[50, 0.9], [100, 0.7]],
    }
    assert term_curves(tmp_path / "missing") == {}
    other_seed = {"loss_attn_enc": [[50, 0.6], [100, 0.4]], "loss_attn_cross": [[50, 1.1], [100, 0.5]]}
    result = {
        "students": {
            "kd": {"term_curves": [{"loss_kd": [[50, 1.0]]}]},
            "kd_attn": {"term_curves": [curves, other_seed]},
        }
    }
    assert quality_translation.attention_site_lines(result) == ["- kd_attn: cross 1 -> 0.6; enc 0.5 -> 0.3"]
    learning = {"students": {"finetune": {"learning_curves": [[[50, 10.0], [100, 14.0]], [[50, 12.0], [100, 15.0]]]}}}
    assert quality_translation.learning_curve_lines(learning) == ["- finetune: 50: 11.00, 100: 14.50"]
    some = {"students": {"kd": {"learning_curves": [[[50, 9.0]]], "learning_curve_seeds": [3], "seeds": [1, 2, 3]}}}
    assert quality_translation.learning_curve_lines(some) == ["- kd (seed 3 only): 50: 9.00"]
    args = quality_translation.QualityTranslationArguments(student_steps=250, learning_curve_points=4)
    assert quality_translation.learning_curve_args(args) == [
        "--do_eval",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "62",
    ]


def test_the_readmes_result_sections_are_the_committed_results():
    """Every result section of README.md (SST-2, QA, translation, the founding claims, speed) is what
    ``python -m benchmarks.readme_sections`` writes from the committed result files, and the claims section holds
    the claims table of those files (the QA / translation claims counted only once their tables use the trained
    teachers)."""
    from benchmarks import readme_sections
    from benchmarks.quality import claims as claims

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert readme_sections.render(readme) == readme, "README.md is stale: run python -m benchmarks.readme_sections"
    results = claims.committed_results()
    fresh = {t: r for t, r in results.items() if t == "SST-2" or "teacher_dir" in r["settings"]}
    for row in claims.claim_rows(fresh):
        if row["best"] is None:  # a table still being run
            assert (
                f"| {row['task']} | {row['claim']} | not measured yet (rows so far: {row['rows_so_far']}) |" in readme
            )
        else:
            assert f"| {row['task']} | {row['claim']} | `{row['best']}` | {row['gain_points']:+.2f} |" in readme


def test_claims_compare_the_best_distilled_row_with_finetune_and_judge_the_teacher():
    from benchmarks.quality import claims as claims

    def students(**means):
        return {n: {"mean": m} for n, m in means.items()}

    sst2 = {
        "metric": "accuracy",
        "teacher": 0.9,
        "students": students(finetune=0.80, kd=0.82, kd_attn=0.85, small_kd=0.95),
    }
    mt = {
        "metric": "bleu",
        "teacher": 30.0,
        "teacher_curve": [[500, 20.0], [1000, 29.5]],
        "teacher_converged": False,
        "teacher_curve_note": "NOT converged: +9.50",
        "students": students(finetune=20.0, kd=23.0),
    }
    rows = claims.claim_rows({"SST-2": sst2, "Multi30k de-en": mt})
    assert [(r["task"], r["best"], r["met"]) for r in rows] == [
        ("SST-2", "kd_attn", True),
        ("Multi30k de-en", "kd", True),
    ]
    assert rows[0]["gain_points"] == pytest.approx(5.0) and rows[0]["gain_percent"] == pytest.approx(6.25)
    assert (
        rows[0]["meaningful"] == "students at or above it (small_kd): says nothing"
    )  # small_* not compared, but flagged
    assert (
        rows[1]["gain_percent"] == pytest.approx(15.0)
        and rows[1]["meaningful"] == "not converged (NOT converged: +9.50)"
    )
    mt["teacher_converged"] = True
    assert claims.claim_rows({"Multi30k de-en": mt})[0]["meaningful"] == "converged, above every student"
    mt["students"]["kd"]["mean"] = 20.5  # +2.5%: the +10% BLEU claim is not met
    assert claims.claim_rows({"Multi30k de-en": mt})[0]["met"] is False
    partial = {**mt, "students": students(kd=23.0, kd_attn=24.0)}  # a table still being run: no finetune yet
    (row,) = claims.claim_rows({"Multi30k de-en": partial})
    assert row["best"] is None and row["rows_so_far"] == "`kd`, `kd_attn`"
    assert "| Multi30k de-en | +10% BLEU | not measured yet (rows so far: `kd`, `kd_attn`) |" in claims.table(
        {"Multi30k de-en": partial}
    )


def test_published_model_cards_are_the_benchmark_runs_they_name():
    """model_cards/<task>/README.md is the card of the run its result file names (``card``: variant and seed): it
    parses as Hub metadata, reports that run's metric, and holds no local path."""
    from huggingface_hub import ModelCard

    root = Path(__file__).resolve().parent.parent
    index = json.loads((root / "model_cards" / "cards.json").read_text())
    assert index, "model_cards/cards.json lists no card"
    for folder, source in index.items():
        result = json.loads((root / source).read_text())
        variant, seed = result["card"]["variant"], result["card"]["seed"]
        student = result["students"][variant]
        value = student["runs"][student["seeds"].index(seed)]
        card = ModelCard.load(root / "model_cards" / folder / "README.md", ignore_metadata_errors=False)
        metric = {r.metric_type: r.metric_value for r in card.data.eval_results}[result["metric"]]
        assert metric == pytest.approx(round(value, 4)), folder
        assert not any(marker in card.content for marker in ("/work/", "/home/", "/tmp/", "/root/")), folder
        assert not re.search(r"hf_[A-Za-z0-9]{30,}", card.content), folder  # no Hub token
        listed = (root / "model_cards" / "README.md").read_text()  # the folder's index lists every card
        assert f"| [`{folder}/`]({folder}/README.md) | " in listed, folder


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("speed.step_time", "step_time"),
        ("speed.step_time", "step_time_avx512bf16"),
        ("checks.bf16", "bf16_check"),
        ("checks.group_by_length", "group_by_length_check"),
    ],
)
def test_the_timing_tables_in_benchmarks_readme_are_the_committed_runs(module, name):
    """Each machine's step_time table and the bf16_check table are their script's markdown() of the committed
    result file."""
    import importlib

    root = Path(__file__).resolve().parent.parent
    result = json.loads((root / "benchmarks" / "results" / f"{name}.json").read_text())
    table = importlib.import_module(f"benchmarks.{module}").markdown(result)
    assert table in (root / "benchmarks" / "README.md").read_text()


def test_translation_group_by_length_reaches_teacher_and_students_and_keys_a_new_teacher():
    """--group_by_length batches every training run of the benchmark by length, as the recipe parses it, and keys
    a teacher of its own; off, the teacher's key is what it was before the flag existed. It is on by default."""
    from hf_attn_distill import DistillSeq2SeqConfig
    from hf_attn_distill.recipes import common, distill_translation

    types = (
        distill_translation.TranslationModelArguments,
        distill_translation.TranslationDataArguments,
        DistillSeq2SeqConfig,
    )
    off = quality_translation.QualityTranslationArguments(bf16=False, group_by_length=False)
    on = quality_translation.QualityTranslationArguments(bf16=False, group_by_length=True)
    assert quality_translation.QualityTranslationArguments(bf16=False) == on
    assert "group_by_length" not in quality_translation.teacher_settings(off)
    assert quality_translation.teacher_settings(on) == {
        **quality_translation.teacher_settings(off),
        "group_by_length": True,
    }
    for args, strategy in ((off, "random"), (on, "group_by_length")):
        argv = ["--teacher_model_name_or_path", "t", "--training_mode", "finetune"]
        argv += quality_translation.common_args(args, Path("o"), 1, 8)
        training = common.parse_args(types, argv)[-1]
        assert training.train_sampling_strategy == strategy
        assert training.eval_with_teacher is False  # students are scored alone: the teacher's eval losses cost ~3x


def test_group_by_length_check_trains_the_benchmarks_teacher_both_ways_and_tabulates_the_curves():
    from benchmarks.checks import group_by_length as check

    args = check.GroupCheckArguments(work_dir="w", teacher_max_steps=1000, extra="--batch_size 8")
    for mode, grouped in (("random", False), ("group_by_length", True)):
        (parsed,) = HfArgumentParser(quality_translation.QualityTranslationArguments).parse_args_into_dataclasses(
            check.teacher_argv(args, mode)
        )
        assert (parsed.teacher_only, parsed.teacher_max_steps, parsed.bf16) == (True, 1000, False)
        assert (parsed.group_by_length, parsed.work_dir, parsed.batch_size) == (grouped, f"w/{mode}", 8)
    result = {
        "machine": "CPU x",
        "teacher": "t",
        "runs": {
            "random": {"bleu": 30.0, "chrf": 50.0, "teacher_curve": [[500, 10.0], [1000, 20.5]]},
            "group_by_length": {"bleu": 29.5, "chrf": 49.0, "teacher_curve": [[500, 11.0]]},
        },
    }
    table = check.markdown(result)
    assert "| batches | val BLEU @ 500 | val BLEU @ 1,000 | test BLEU | test chrF |" in table
    assert "| random | 10.00 | 20.50 | 30.00 | 50.00 |" in table
    assert "| group_by_length | 11.00 |  | 29.50 | 49.00 |" in table


def test_translation_tunes_the_attention_weight_on_val_only_and_runs_every_attention_variant_with_it(
    tmp_path, monkeypatch
):
    """With a fake recipe that parses every command as the real one does (config checks included): the tuning
    runs train kd_attn with each weight of the grid (every attention site at that weight), are scored on val and
    never on the test set; the best val BLEU (1.0 here) then reaches every attention variant's test run and no
    other; a rerun reuses the scores and the finished runs."""
    from hf_attn_distill import DistillSeq2SeqConfig
    from hf_attn_distill.recipes import common, distill_translation

    types = (
        distill_translation.TranslationModelArguments,
        distill_translation.TranslationDataArguments,
        DistillSeq2SeqConfig,
    )
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    teacher = {"bleu": 40.0, "chrf": 60.0, "teacher_curve": [[500, 30.0]], "teacher_curve_note": "capped"}
    monkeypatch.setattr(quality_translation, "trained_teacher", lambda args: (teacher_dir, teacher))
    calls = {}

    def fake_recipe(argv):
        _, _, training = common.parse_args(types, argv)
        calls[Path(training.output_dir).name] = (argv, training)
        if "--do_predict" in argv:
            return {"test_bleu": 30.0, "test_chrf": 50.0}
        return {"eval_bleu": {0.3: 20.0, 1.0: 21.0, 3.0: 22.0}[training.attention_weight]}

    monkeypatch.setattr(quality_translation, "run_recipe", fake_recipe)
    argv = ["--work_dir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--model_card_dir", ""]
    argv += ["--runs_dir", str(tmp_path / "runs")]
    result = quality_translation.main([*argv, "--bf16", "false", "--seeds", "7"])
    for weight in (0.3, 1.0, 3.0):
        call, training = calls[f"tune_kd_attn_w{weight}"]
        assert "--do_predict" not in call and "--do_eval" in call and training.seed == 7
        assert training.cross_layer_map == "uniform"  # kd_attn: every site
        assert [training.attention_weight, training.decoder_attention_weight, training.cross_attention_weight] == [
            weight
        ] * 3
    assert result["attention_weight"] == 3.0
    assert result["attention_weight_tuning"]["val_bleu"] == {"0.3": 20.0, "1.0": 21.0, "3.0": 22.0}
    assert result["attention_weight_tuning"]["seed"] == 7
    tested = {name.removesuffix("_seed7"): training for name, (_, training) in calls.items() if "seed7" in name}
    assert set(tested) == set(quality_translation.VARIANTS)
    for name, training in tested.items():
        weights = [training.attention_weight, training.decoder_attention_weight, training.cross_attention_weight]
        assert weights == [3.0 if name in quality_translation.ATTENTION_VARIANTS else 1.0] * 3  # tuned; default
    assert tested["kd_attn_cross_last"].cross_layer_map == "last"
    assert tested["kd_attn_cross_last"].decoder_layer_map == "uniform"
    assert tested["kd_attn_cross_decay"].schedules == {"cross_attention_weight": "linear:0.0"}
    assert tested["kd_attn_self"].cross_layer_map is None
    assert "val BLEU by weight: 0.3: 20.00, 1.0: 21.00, 3.0: 22.00" in (tmp_path / "r.md").read_text()
    calls.clear()
    assert quality_translation.main([*argv, "--bf16", "false", "--seeds", "7"])["attention_weight"] == 3.0
    assert calls == {}  # scores and runs reused
    # a run of other seeds reuses the scores and says which seed they came from, not its own
    again = quality_translation.main([*argv, "--bf16", "false", "--seeds", "8", "--variants", "finetune", "kd_attn"])
    assert set(calls) == {"finetune_seed8", "kd_attn_seed8"}  # no tuning run
    assert again["attention_weight_tuning"]["seed"] == 7 and "kd_attn, seed 7;" in (tmp_path / "r.md").read_text()
    # a run of variants without attention still reads the tuned weight: the kept attention rows stay in its table
    calls.clear()
    plain = quality_translation.main([*argv, "--bf16", "false", "--seeds", "9", "--variants", "kd"])
    assert set(calls) == {"kd_seed9"} and plain["attention_weight"] == 3.0
    assert plain["attention_weight_tuning"]["seed"] == 7 and plain["students"]["kd_attn"]["seeds"] == [7, 8]


def test_qa_benchmark_cards_name_squad_on_the_hub_and_parse_as_the_recipe_does():
    """The QA benchmark's data flags parse with the QA recipe's own arguments, and its cards name the Hub
    dataset that shared/data/squad holds."""
    from benchmarks.quality import qa as quality_qa
    from hf_attn_distill import DistillConfig
    from hf_attn_distill.recipes import common, distill_qa

    args = quality_qa.QualityQAArguments(bf16=False)
    argv = ["--teacher_model_name_or_path", "t", "--training_mode", "finetune", *quality_qa.data_args(args)]
    model_args, data_args, _ = common.parse_args(
        (common.ModelArguments, distill_qa.QADataArguments, DistillConfig), [*argv, "--output_dir", "o"]
    )
    assert model_args.card_dataset_id == "rajpurkar/squad"
    assert data_args.max_seq_length == 256 and data_args.doc_stride == 128


def test_qa_group_by_length_pads_per_batch_groups_teacher_and_students_and_keys_a_new_teacher():
    """--group_by_length (default on) pads QA windows per batch and batches them by length in every training run,
    as the QA recipe parses it, and keys a teacher of its own; off, the teacher's key is what it was before."""
    from benchmarks.quality import qa as quality_qa
    from hf_attn_distill import DistillConfig
    from hf_attn_distill.recipes import common, distill_qa

    types = (common.ModelArguments, distill_qa.QADataArguments, DistillConfig)
    off = quality_qa.QualityQAArguments(bf16=False, group_by_length=False)
    on = quality_qa.QualityQAArguments(bf16=False, group_by_length=True)
    assert quality_qa.QualityQAArguments(bf16=False) == on
    assert "group_by_length" not in quality_qa.teacher_settings(off)
    assert quality_qa.teacher_settings(on) == {**quality_qa.teacher_settings(off), "group_by_length": True}
    for args, grouped in ((off, False), (on, True)):
        argv = ["--teacher_model_name_or_path", "t", "--training_mode", "finetune", *quality_qa.data_args(args)]
        argv += quality_qa.common_args(args, Path("o"), 1)
        _, data, training = common.parse_args(types, argv)
        assert training.train_sampling_strategy == ("group_by_length" if grouped else "random")
        assert data.pad_to_max_length is not grouped
        assert training.eval_with_teacher is False  # students are scored alone


@pytest.mark.parametrize(
    "module, dataclass_name",
    [
        ("quality.qa", "QualityQAArguments"),
        ("quality.translation", "QualityTranslationArguments"),
        ("quality.sst2", "QualityArguments"),
        ("checks.group_by_length", "GroupCheckArguments"),
    ],
)
def test_benchmark_help_prints(module, dataclass_name):
    """``--help`` formats every field's help (argparse %-formats help strings: a bare "%" breaks it)."""
    import importlib

    cls = getattr(importlib.import_module(f"benchmarks.{module}"), dataclass_name)
    text = HfArgumentParser(cls).format_help()
    for name in cls.__dataclass_fields__:
        assert f"--{name}" in text, name


def test_benchmarks_readme_teacher_progress_is_the_committed_record():
    """The teacher curves benchmarks/README.md cites are those of benchmarks/results/runs/teacher_progress_xeon.json."""
    root = Path(__file__).resolve().parent.parent
    record = json.loads((root / "benchmarks" / "results" / "runs" / "teacher_progress_xeon.json").read_text())
    readme = " ".join((root / "benchmarks" / "README.md").read_text().split())
    for name, unit in (("quality_translation", "BLEU"), ("quality_qa", "F1")):
        curve = record["teachers"][name]["curve"]
        first = f"{curve[0][1]:.1f} {unit} after {curve[0][0]:,} steps"
        assert first in readme, first
        for step, value in curve[1:]:
            assert f"{value:.1f} after {step:,}" in readme, (name, step)
        gain = f"rising by {curve[-1][1] - curve[-2][1]:.1f}"
        assert gain in readme, gain


def test_the_sst2_attention_rows_rerun_with_todays_code_is_what_the_readmes_say():
    """Seeds 1-3 of the four streamed attention rows, rerun with today's code, against the table's runs: the
    comparison table of benchmarks/README.md and the README's differences are those of the committed files."""
    root = Path(__file__).resolve().parent.parent
    results = root / "benchmarks" / "results"
    table = json.loads((results / "quality_sst2.json").read_text())["students"]
    seed1 = json.loads((results / "runs" / "quality_sst2_repro_streaming_seed1.json").read_text())["students"]
    seed23 = json.loads((results / "runs" / "quality_sst2_repro_streaming_seed23.json").read_text())["students"]
    bench = " ".join((root / "benchmarks" / "README.md").read_text().split())
    for name in ("kd_attn_kl", "kd_attn_mse", "kd_attn_hidden", "kd_tinybert"):
        assert seed1[name]["seeds"] == [1] and seed23[name]["seeds"] == [2, 3], name
        rerun = [v * 100 for v in seed1[name]["runs"] + seed23[name]["runs"]]
        old = [v * 100 for v in table[name]["runs"]]
        diff = statistics.fmean(rerun) - statistics.fmean(old)
        row = (
            f"| `{name}` | {statistics.fmean(old):.2f}% | {', '.join(f'{v:.2f}' for v in rerun)} | "
            f"{statistics.fmean(rerun):.2f}% | {diff:+.2f} | {statistics.stdev(old):.2f} / {statistics.stdev(rerun):.2f} |"
        )
        assert row in bench, row
        assert f"`{name}` {diff:+.2f}" in bench, name


SHARED_TEACHERS = Path(__file__).resolve().parent.parent.parent / "shared" / "teachers"


@pytest.mark.skipif(not (SHARED_TEACHERS / "README.md").exists(), reason="../shared/teachers is not laid out here")
def test_the_shipped_teachers_are_the_defaults_taken_as_they_are_and_refused_for_other_settings(tmp_path):
    """Both quality benchmarks default to their teacher in ../shared/teachers; its recorded cache key is the one
    this code computes for the benchmark's default settings and data (so any machine, bf16 or not, accepts it), its
    curve and converged flag come from its teacher_curve.json, and a setting that changes what the students see,
    or other training data, is refused with a message that names the setting."""
    from benchmarks.quality import qa as quality_qa
    from benchmarks.quality import translation as quality_translation

    cases = (
        (quality_qa, quality_qa.QualityQAArguments, "squad-minilm-l6", "max_seq_length", 384),
        (
            quality_translation,
            quality_translation.QualityTranslationArguments,
            "multi30k-de-en-minilm",
            "max_length",
            64,
        ),
    )
    for module, arguments, name, setting, other in cases:
        folder = SHARED_TEACHERS / name
        for bf16 in (False, True):
            args = arguments(bf16=bf16)
            assert Path(args.teacher_dir) == folder
            teacher = module.shipped(args)
            recorded = json.loads((folder / "teacher_curve.json").read_text())
            provenance = json.loads((folder / "provenance.json").read_text())
            assert teacher["cache_key"] == provenance["cache_key"] and teacher["teacher_curve"] == recorded["curve"]
            gain = recorded["curve"][-1][1] - recorded["curve"][-2][1]
            assert teacher["teacher_converged"] is (gain < 1.0) is False
            assert f"still gained {gain:.2f}" in teacher["teacher_curve_note"]
        default = getattr(arguments, setting)
        with pytest.raises(SystemExit, match=rf"trained with {setting}={default} \(this run: {other}\)"):
            module.shipped(arguments(bf16=False, **{setting: other}))
    data = tmp_path / "multi30k"
    data.mkdir()
    for lang in ("de", "en"):
        (data / f"train.{lang}").write_text("ein satz\n" if lang == "de" else "a sentence\n")
    with pytest.raises(SystemExit, match="trained on other data or settings"):
        quality_translation.shipped(quality_translation.QualityTranslationArguments(bf16=False, data_dir=str(data)))
    with pytest.raises(SystemExit, match="not a shipped teacher: provenance.json is missing"):
        quality_qa.shipped(quality_qa.QualityQAArguments(bf16=False, teacher_dir=str(tmp_path)))


@pytest.mark.skipif(not (SHARED_TEACHERS / "README.md").exists(), reason="../shared/teachers is not laid out here")
@pytest.mark.parametrize("name", ["qa", "translation"])
def test_the_committed_quality_rows_are_recognised_by_todays_code(name):
    """Every kept (variant, seed) run under benchmarks/results/runs/quality_<task>/ carries the key today's code
    computes for the command that made it (the shipped teacher, float32; for translation's attention rows, the
    weight tuned on val and kept in tuning/), so a rerun continues them and a refactor cannot orphan them; each
    names the machine and the commit that ran it."""
    import importlib

    from benchmarks.quality.teachers import fingerprint

    module = importlib.import_module(f"benchmarks.quality.{name}")
    cls = module.QualityQAArguments if name == "qa" else module.QualityTranslationArguments
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(["--bf16", "false"])
    settings = {"teacher": module.shipped(args)["cache_key"], **module.student_settings(args)}
    root = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "runs" / f"quality_{name}"
    records = sorted(root.glob("*_seed*.json"))
    if not records:
        pytest.skip(f"no kept run of quality_{name} yet")
    weight = None
    if name == "translation":
        tuning = fingerprint({k: v for k, v in settings.items() if k != "attention_weight_grid"}, [])
        scores = json.loads((root / "tuning" / f"{tuning}.json").read_text())
        weight = max(args.attention_weight_grid, key=lambda w: scores[str(w)]["val_bleu"])
        table = json.loads((ROOT / "benchmarks/results/quality_translation.json").read_text())
        seeds = sorted({scores[str(w)]["seed"] for w in args.attention_weight_grid})
        assert table["attention_weight_tuning"]["seed"] in (seeds, seeds[0] if len(seeds) == 1 else None)
    for record in records:
        kept = json.loads(record.read_text())
        variant = record.stem.rsplit("_seed", 1)[0]
        tuned = {"attention_weight": weight} if name == "translation" and variant in module.ATTENTION_VARIANTS else {}
        assert kept["key"] == fingerprint({**settings, **tuned}, []), record.name
        assert kept["run"]["machine"] and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", kept["run"]["commit"] or ""), record


def test_runs_done_lists_every_variant_and_its_seeds():
    from benchmarks.quality.runs import curve_points, runs_done

    result = {"students": {"finetune": {"seeds": [1, 2]}, "kd": {"seeds": [1]}}}
    assert runs_done(result) == "3 (`finetune` seeds 1, 2; `kd` seed 1)"
    assert curve_points([[500, 63.371], [1000, 68.384]]) == "500: 63.37, 1,000: 68.38"


def test_the_readme_says_how_much_finetunes_curve_still_rose_over_its_last_doubling():
    from benchmarks.readme_sections import curve_reading

    result = {
        "students": {
            "finetune": {
                "learning_curves": [[[75, 20.0], [150, 30.0], [300, 34.0]], [[75, 22.0], [150, 32.0], [300, 38.0]]]
            }
        }
    }
    reading = curve_reading(result)
    assert "75: 21.00, 150: 31.00, 300: 36.00" in reading and "it still rose +5.00 from step 150 to 300" in reading
    assert curve_reading({"students": {"kd": {}}}) == ""


def test_lm_memory_runs_every_method_and_they_agree(tmp_path):
    """benchmarks/speed/lm_memory.py at tiny scale: every method runs in its own process (or says why not: Liger
    needs its package and Triton), and the three that run give the same forward-KL loss."""
    from benchmarks.speed import lm_memory

    argv = ["--vocabs", "300", "--batch", "2", "--tokens", "16", "--student_hidden", "8", "--teacher_hidden", "12"]
    result = lm_memory.main([*argv, "--repeats", "1", "--output", str(tmp_path / "lm")])
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(lm_memory.METHODS)
    losses = [rows[m]["loss"] for m in ("naive", "token_kd", "chunked")]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]) and losses[0] > 0
    assert "skipped" in rows["liger"] or rows["liger"]["loss"] == pytest.approx(losses[0], rel=1e-4)
    assert rows["chunked_ce_kd"]["loss"] == pytest.approx(rows["naive_ce_kd"]["loss"], rel=1e-5)
    assert rows["naive_ce_kd"]["loss"] > 0.5 * losses[0]  # the cross-entropy is in it
    assert "| 300 | chunked |" in (tmp_path / "lm.md").read_text()


def test_the_lm_memory_tables_are_the_committed_run():
    """benchmarks/README.md shows summary_tables() of benchmarks/results/lm_memory.json: its memory and time tables
    cannot drift from the run."""
    from benchmarks.speed import lm_memory

    result = json.loads((ROOT / "benchmarks/results/lm_memory.json").read_text())
    assert lm_memory.summary_tables(result) in (ROOT / "benchmarks/README.md").read_text()


def test_lm_memory_resumes_and_records_a_killed_worker(tmp_path, monkeypatch):
    """A worker the kernel kills (out of memory) becomes a row that says so, and the other methods still run; a
    rerun of the same shape keeps the measured rows (the same measurements, not new ones) and tries the killed
    method again."""
    import subprocess

    from benchmarks.speed import lm_memory

    argv = ["--vocabs", "300", "--batch", "2", "--tokens", "16", "--student_hidden", "8", "--teacher_hidden", "12"]
    argv += ["--repeats", "1", "--output", str(tmp_path / "lm")]
    real_run = subprocess.run

    def run(cmd, **kwargs):
        if '"method": "naive"' in cmd[-1]:
            return subprocess.CompletedProcess(cmd, -9, "", "")
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(lm_memory.subprocess, "run", run)
    first = lm_memory.main([*argv, "--methods", "naive", "chunked"])
    rows = {r["method"]: r for r in first["rows"]}
    assert rows["naive"]["skipped"] == "the process exited with code -9 (killed: out of memory on this machine)"
    assert rows["chunked"]["loss"] > 0

    def run_again(cmd, **kwargs):
        assert '"method": "naive"' in cmd[-1], "the measured method ran again"
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(lm_memory.subprocess, "run", run_again)
    again = {r["method"]: r for r in lm_memory.main([*argv, "--methods", "naive", "chunked"])["rows"]}
    assert again["chunked"] == rows["chunked"] and again["naive"]["loss"] > 0


def test_lm_memory_worker_fails_cleanly_past_the_memory_the_machine_has():
    """A method that needs more memory than the worker may take (here: 20 MB more) ends as a row that names the
    failed allocation, not as a process the kernel kills."""
    import subprocess
    import sys

    spec = {"method": "naive", "vocab": 32000, "batch": 2, "tokens": 256, "student_hidden": 64, "teacher_hidden": 64}
    spec |= {"repeats": 1, "memory_allowance_mb": 20}  # full logits: 2 x 256 x 32,000 float32 = 62.5 MiB each
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed.lm_memory", "--_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=root,
        check=True,
    )
    row = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert "can't allocate memory" in row["skipped"]


def test_sst2_seed1_after_the_re_layout_and_attention_keep_mb_is_the_streaming_rerun_to_the_last_bit():
    """The seed-1 reruns of this version (results/runs/quality_sst2_{keep,layout,layout_b}_seed1.json) give the
    teacher and every row they ran exactly the accuracy of the streaming rerun (quality_sst2_repro_streaming_seed1),
    and benchmarks/README.md lists exactly those rows."""
    root = Path(__file__).resolve().parent.parent
    runs = root / "benchmarks" / "results" / "runs"
    reference = json.loads((runs / "quality_sst2_repro_streaming_seed1.json").read_text())
    names = []
    for stem in ("keep", "layout", "layout_b"):
        rerun = json.loads((runs / f"quality_sst2_{stem}_seed1.json").read_text())
        assert rerun["teacher"] == reference["teacher"] == 0.8841743119266054
        for name, row in rerun["students"].items():
            assert row["seeds"] == [1] and row["runs"] == reference["students"][name]["runs"], name
            names.append(name)
    bench = " ".join((root / "benchmarks" / "README.md").read_text().split())
    listed = ", ".join(f"`{name}`" for name in sorted(names))
    assert f"reproduced the streaming rerun's seed 1 to the last bit ({len(names)} rows): {listed}." in bench


def test_sst2_seed1_after_the_forward_loss_gradient_kernel_reproduces_every_attention_row():
    """The seed-1 reruns after the streamed kernel took the attention loss's gradient in forward
    (results/runs/quality_sst2_kernel{,_b}_seed1.json) give the teacher and every attention row exactly the accuracy
    of the streaming rerun (quality_sst2_repro_streaming_seed1), and benchmarks/README.md lists exactly those rows."""
    root = Path(__file__).resolve().parent.parent
    runs = root / "benchmarks" / "results" / "runs"
    reference = json.loads((runs / "quality_sst2_repro_streaming_seed1.json").read_text())
    names = []
    for stem in ("kernel", "kernel_b"):
        rerun = json.loads((runs / f"quality_sst2_{stem}_seed1.json").read_text())
        assert rerun["teacher"] == reference["teacher"] == 0.8841743119266054
        for name, row in rerun["students"].items():
            assert row["seeds"] == [1] and row["runs"] == reference["students"][name]["runs"], name
            names.append(name)
    names = sorted(set(names))  # a process reads the rows another finished into the shared work folder
    assert names == ["kd_attn_hidden", "kd_attn_kl", "kd_attn_mse", "kd_tinybert"]  # every attention row
    bench = " ".join((root / "benchmarks" / "README.md").read_text().split())
    listed = ", ".join(f"`{name}`" for name in names)
    assert f"gave the streaming rerun's seed-1 accuracy exactly ({len(names)} rows): {listed}." in bench


def test_lm_modes_times_each_mode_from_the_trainers_runtime(tmp_path, monkeypatch):
    """benchmarks/speed/lm_modes.py at tiny scale: a step's time is the difference of the trainer's runtimes over
    steps + 1 and 1 step (here a fake recipe of 2 s + 0.5 s a step, 1.5 s on-policy), seq_kd's generation time per
    record, and the table's ratios are those of the JSON."""
    from benchmarks.speed import lm_modes
    from hf_attn_distill.recipes import distill_lm

    seen = []

    def recipe(argv):
        seen.append(argv)
        steps = int(argv[argv.index("--max_steps") + 1])
        return {"train_runtime": 2.0 + steps * (1.5 if "--lmbda" in argv else 0.5)}

    monkeypatch.setattr(distill_lm, "main", recipe)
    argv = ["--layers", "2", "--hidden", "16", "--vocab", "100", "--prompt_tokens", "4", "--new_tokens", "4"]
    result = lm_modes.main(
        [*argv, "--records", "4", "--batch_size", "2", "--steps", "3", "--output", str(tmp_path / "m")]
    )
    rows = result["rows"]
    assert rows["off_policy"]["step_s"] == pytest.approx(0.5) and rows["on_policy"]["step_s"] == pytest.approx(1.5)
    assert [a[a.index("--student_teacher_layers") + 1] for a in seen] == ["1"] * 4
    assert rows["seq_kd"]["records"] == 4 and rows["seq_kd"]["s_per_record"] > 0
    table = (tmp_path / "m.md").read_text()
    assert "| `on_policy` | 1.500 s / step | 3.00x |" in table
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == rows
    with pytest.raises(ValueError, match="Unknown modes"):
        lm_modes.main(["--modes", "offline"])


ROOT = Path(__file__).resolve().parents[1]


def test_the_lm_cost_readings_are_the_committed_runs():
    """README's on-policy / seq_kd costs and benchmarks/README.md's lm_modes and lm_memory tables are the committed
    results (lm_modes.json, lm_memory.json)."""
    modes = json.loads((ROOT / "benchmarks/results/lm_modes.json").read_text())
    rows, batch = modes["rows"], modes["settings"]["batch_size"]
    on = rows["on_policy"]["step_s"] / rows["off_policy"]["step_s"]
    seq = rows["seq_kd"]["s_per_record"] * batch / rows["off_policy"]["step_s"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"{on:.1f}x an off-policy step, and `seq_kd`'s answers {seq:.1f} steps a batch, once" in readme
    bench = (ROOT / "benchmarks/README.md").read_text()
    table = (ROOT / "benchmarks/results/lm_modes.md").read_text().split("\n\n", 2)[2].strip()
    assert table in bench
    memory = json.loads((ROOT / "benchmarks/results/lm_memory.json").read_text())
    by = {(r["vocab"], r["method"]): r for r in memory["rows"]}
    for vocab in sorted({r["vocab"] for r in memory["rows"]}):
        cells = [f"{by[vocab, 'naive']['one_logits_tensor_mb']:,.0f}"] if "loss" in by[vocab, "naive"] else []
        peaks = [
            f"{by[vocab, m]['peak_mb']:,.0f}" if "loss" in by[vocab, m] else "did not fit"
            for m in ("naive", "token_kd", "chunked", "naive_ce_kd", "chunked_ce_kd")
        ]
        line, times = [x for x in bench.splitlines() if x.startswith(f"| {vocab:,} |")][:2]
        assert line.endswith(" | ".join(peaks) + " |"), line
        assert not cells or line.startswith(f"| {vocab:,} | {cells[0]} |"), line
        seconds = [
            f"{by[vocab, m]['step_s']:.2f}" if "loss" in by[vocab, m] else "-"
            for m in ("naive", "token_kd", "chunked", "naive_ce_kd", "chunked_ce_kd")
        ]
        assert times == f"| {vocab:,} | " + " | ".join(seconds) + " |", times


def test_speed_paired_timing_rotates_the_modes_and_takes_per_round_ratios():
    """``--paired``: rounds rotate the modes; D/X is the median over rounds of D's step over X's in the same round
    (hand-computed), and it replaces the ratio of the separate processes' medians, whose times are kept."""
    from benchmarks.speed.step import apply_paired, paired_ratios, ratios, rotated

    assert [rotated(["L", "D", "N"], i) for i in range(4)] == [
        ["L", "D", "N"],
        ["D", "N", "L"],
        ["N", "L", "D"],
        ["L", "D", "N"],
    ]
    # a process that slows down halfway slows both sides of every round's ratio
    times = {"L": [1.0, 2.0, 1.0], "D": [1.1, 2.4, 0.9], "N": [2.0, 4.0, 1.5]}
    got = paired_ratios(times)
    assert got == {"D/L_time": pytest.approx(1.1), "D/N_time": pytest.approx(0.6)}
    key = {"pair": "p", "seq_len": 64, "batch": 8}
    rows = [
        {**key, "mode": "L", "step_s": 0.5, "peak_mb": 900.0},
        {**key, "mode": "D", "step_s": 2.0, "peak_mb": 950.0},
        {**key, "mode": "N", "error": "timed out after 9 s"},
    ]
    apply_paired(rows, {"times": {m: times[m] for m in "LD"}, "ratios": paired_ratios({m: times[m] for m in "LD"})})
    assert [r.get("step_s") for r in rows] == [1.0, 1.1, None] and rows[1]["process_step_s"] == [2.0]
    (item,) = ratios(rows, {("p", 64, 8): {"ratios": {"D/L_time": 1.1}}})
    assert item["D/L_time"] == pytest.approx(1.1) and item["timing"] == "paired" and "D/N_time" not in item
    assert ratios(rows)[0]["D/L_time"] == pytest.approx(1.1)  # the paired medians: 1.1 / 1.0


def test_speed_paired_worker_times_every_mode_in_one_process():
    """One paired process on the long pair at 32 tokens: every mode stepped ``steps`` times after warm-up, and its
    ratios are paired_ratios() of its own times."""
    from benchmarks.speed import step as speed

    spec = {"pair": "long6->3", "seq_len": 32, "batch": 1, "modes": ["L", "D", "N"], "warmup": 1, "steps": 3}
    run = speed.run_paired_worker({**spec, "bf16": False})
    assert sorted(run["times"]) == ["D", "L", "N"] and all(len(t) == 3 and min(t) > 0 for t in run["times"].values())
    assert run["ratios"] == speed.paired_ratios(run["times"])


def test_the_readmes_speed_sentences_are_the_committed_runs():
    """README.md's sentences about long lengths (4,096 tokens' memory; from 512 tokens on: D/N, and D's working
    memory over L's where the default keeps the attention and where it streams it) and short ones (D/L at 64-384
    tokens, and how many rows are above 1.05) are computed from the committed runs; every memory figure was measured
    from before the first step."""
    from hf_attn_distill import DistillConfig
    from hf_attn_distill.attention.streamed import keeps_attention

    results = ROOT / "benchmarks" / "results"
    runs = {name: json.loads((results / f"{name}.json").read_text()) for name in ("speed", "speed_long")}
    ratios = {name: run["ratios"] for name, run in runs.items()}
    assert all(
        run["settings"].get("memory_from_first_step")
        or (run["settings"]["memory_rerun"] and all(r.get("memory_rerun") for r in run["rows"]))
        for run in runs.values()
    )
    work = {r["mode"]: r["peak_above_start_mb"] for r in runs["speed_long"]["rows"] if r["seq_len"] == 4096}
    long = [x for x in ratios["speed"] if x["seq_len"] >= 512] + ratios["speed_long"]
    # each run's rows were kept or streamed by the attention_keep_mb it ran with (recorded; None: 128, the default then)
    keep_mb = {name: run["settings"]["attention_keep_mb"] or 128.0 for name, run in runs.items()}
    assert keep_mb["speed"] == keep_mb["speed_long"] == DistillConfig.attention_keep_mb
    keep = int(keep_mb["speed"] * 2**20) // 4
    kept = [x for x in long if keeps_attention(x["batch"], 12, x["seq_len"], x["seq_len"], keep)]
    streamed = [x for x in long if x not in kept]
    extra = json.loads((results / "speed_384.json").read_text())["ratios"]  # 384 tokens of both encoder pairs
    short = [x["D/L_time"] for x in ratios["speed"] + extra if x["seq_len"] < 512]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"4,096 tokens take {work['D']:,.0f} MB, the naive way {work['N'] / 1024:.0f} GB" in readme
    d_n = [x["D/N_time"] for x in long]

    def span(items):
        low, high = (f"{f(x['D/L_work_mem'] for x in items):.2f}" for f in (min, max))
        return f"{low}x" if low == high else f"{low}-{high}x"

    def lengths(items):
        return ", ".join(format(n, ",") for n in sorted({x["seq_len"] for x in items}))

    assert (
        f"From 512 tokens on: {min(d_n):.2f}-{max(d_n):.2f}x the naive time; `D`'s working memory is {span(kept)} "
        f"`L`'s where the attention is kept ({lengths(kept)} tokens) and {span(streamed)} where it streams "
        f"({lengths(streamed)})"
    ) in readme
    above = sum(value > 1.05 for value in short)
    assert f"at 64-384 tokens {min(short):.2f}-{max(short):.2f}x `L` ({above} of {len(short)} rows above 1.05" in readme


def test_the_lm_memory_and_token_kd_prose_is_the_committed_runs():
    """benchmarks/README.md's reading of lm_memory.json (memory and time ratios at 32,000; sizes, times, ratios and
    the target at 152,064; what fit at 256,000; the losses' agreement) and docs/internals.md's token_kd_memory
    figures are computed from the committed runs."""
    memory = json.loads((ROOT / "benchmarks/results/lm_memory.json").read_text())
    by = {(r["vocab"], r["method"]): r for r in memory["rows"]}
    small, large, largest = sorted({r["vocab"] for r in memory["rows"]})
    n, c, f, fn = (by[small, m] for m in ("naive", "chunked", "chunked_ce_kd", "naive_ce_kd"))
    N, T, C, F, FN = (by[large, m] for m in ("naive", "token_kd", "chunked", "chunked_ce_kd", "naive_ce_kd"))
    top = {m: by[largest, m] for m in ("token_kd", "chunked", "chunked_ce_kd")}
    tensors = N["peak_mb"] / N["one_logits_tensor_mb"]
    bench = " ".join((ROOT / "benchmarks/README.md").read_text().split())
    for reading in (
        f"At 32,000 the chunked loss needs {n['peak_mb'] / c['peak_mb']:.0f}x less memory than both full logits and "
        f"{c['step_s'] / n['step_s']:.2f}x their time (the fused CE + KD: {fn['peak_mb'] / f['peak_mb']:.0f}x less, "
        f"{f['step_s'] / fn['step_s']:.2f}x the time)",
        f"both full logits (`naive`) needed {N['peak_mb'] / 1000:.1f} GB ({tensors:.1f} `[tokens, vocab]` float32 "
        f"tensors) and {N['step_s']:.1f} s, `token_kd` (the logits, no float32 copies of them) "
        f"{T['peak_mb'] / 1000:.1f} GB and {T['step_s']:.1f} s, the chunked loss {C['peak_mb'] / 1000:.1f} GB "
        f"(1/{N['peak_mb'] / C['peak_mb']:.1f} of `naive`, 1/{T['peak_mb'] / C['peak_mb']:.1f} of `token_kd`;",
        f"and {C['step_s']:.1f} s ({C['step_s'] / N['step_s']:.2f}x `naive`, {C['step_s'] / T['step_s']:.2f}x "
        f"`token_kd`); the fused CE + KD {F['peak_mb'] / 1000:.1f} GB and {F['step_s']:.1f} s against "
        f"{FN['peak_mb'] / 1000:.1f} GB and {FN['step_s']:.1f} s from full logits.",
        f"they needed {tensors:.1f} such tensors, which would be {tensors * 4:.0f} GB); `token_kd` needed "
        f"{top['token_kd']['peak_mb'] / 1000:.1f} GB and {top['token_kd']['step_s']:.1f} s, the chunked loss "
        f"{top['chunked']['peak_mb'] / 1000:.1f} GB (1/{top['token_kd']['peak_mb'] / top['chunked']['peak_mb']:.1f}) "
        f"and {top['chunked']['step_s']:.1f} s ({top['chunked']['step_s'] / top['token_kd']['step_s']:.2f}x), the "
        f"fused CE + KD {top['chunked_ce_kd']['peak_mb'] / 1000:.1f} GB and {top['chunked_ce_kd']['step_s']:.1f} s.",
    ):
        assert reading in bench, reading
    met = C["peak_mb"] <= N["peak_mb"] / 5 and C["step_s"] <= N["step_s"]
    assert met and "(extra memory at most 1/5 of the full-logit loss's, time at most its) is met" in bench
    assert all("allocate memory" in by[largest, m]["skipped"] for m in ("naive", "naive_ce_kd"))
    assert "At 256,000 (Gemma's size) the full-logit formulas did not fit" in bench
    for vocab in (small, large, largest):  # the losses of one vocabulary agree
        for kind in (("naive", "token_kd", "chunked"), ("naive_ce_kd", "chunked_ce_kd")):
            losses = [by[vocab, m]["loss"] for m in kind if "loss" in by[vocab, m]]
            assert max(losses) - min(losses) <= 2e-6, (vocab, kind)
    assert "The losses of one vocabulary agree within 2e-6 across methods." in bench
    rows = {r["method"]: r for r in json.loads((ROOT / "benchmarks/results/token_kd_memory.json").read_text())["rows"]}
    internals = " ".join((ROOT / "docs/internals.md").read_text().split())
    assert (
        f"peaks at {rows['chunked']['peak_above_logits_mb']:,.0f} MB above the logits against "
        f"{rows['reference']['peak_above_logits_mb']:,.0f} MB for the plain formula"
    ) in internals


def test_the_evaluation_cost_table_is_the_committed_run():
    """benchmarks/README.md's evaluation-cost table and its reading are computed from speed_eval.json."""
    result = json.loads((ROOT / "benchmarks/results/speed_eval.json").read_text())
    by = {(r["batch"], r["mode"]): r["eval_s"] for r in result["rows"]}
    bench = (ROOT / "benchmarks/README.md").read_text()
    added = []
    for batch in sorted({r["batch"] for r in result["rows"]}):
        plain, student = by[batch, "plain"], by[batch, "student_only"]
        logits, attention = by[batch, "teacher_logits"], by[batch, "teacher_attn"]
        added.append(attention / logits - 1)
        assert (
            f"| {batch} | {plain:.3f} s | {student:.3f} s ({student / plain:.2f}×) | {logits:.3f} s | "
            f"{attention:.3f} s ({attention / logits:.2f}× logits only) |"
        ) in bench
    assert f"attention adds {min(added) * 100:.0f}–{max(added) * 100:.0f}% to that" in " ".join(bench.split())


def test_speed_memory_rerun_replaces_memory_keeps_times_and_continues(monkeypatch):
    """``--memory_rerun``: every row's memory comes from a new process of its mode (hand-made readings), step times
    and the paired time ratios stay, memory ratios are recomputed from the new readings, and rows already re-measured
    are not measured again."""
    from benchmarks.speed import step as speed

    def row(mode, s, peak, work):
        return {"pair": "p", "seq_len": 64, "batch": 8, "mode": mode, "step_s": s, "peak_mb": peak,
                "peak_above_start_mb": work}  # fmt: skip

    old = {
        "settings": {"bf16": False, "attention_keep_mb": None},
        "rows": [row("L", 1.0, 1000.0, 500.0), row("D", 1.1, 900.0, 50.0)],
        "ratios": [{"pair": "p", "seq_len": 64, "batch": 8, "D/L_time": 1.02, "timing": "paired", "D/L_mem": 0.9}],
    }
    fresh = {"L": (1100.0, 600.0), "D": (1320.0, 450.0)}
    calls = []

    def run_row(spec, timeout):
        calls.append(spec["mode"])
        assert (spec["warmup"], spec["steps"], spec["bf16"]) == (1, 2, False)
        peak, work = fresh[spec["mode"]]
        return {"pair": "p", "seq_len": 64, "batch": 8, "mode": spec["mode"], "step_s": 9.0, "peak_mb": peak,
                "peak_above_start_mb": work}  # fmt: skip

    monkeypatch.setattr(speed, "run_row", run_row)
    written = []
    result = speed.rerun_memory(old, 1, 2, 60, written.append)
    assert calls == ["L", "D"] and len(written) == 2
    assert [(r["step_s"], r["peak_mb"], r["peak_above_start_mb"]) for r in result["rows"]] == [
        (1.0, 1100.0, 600.0),
        (1.1, 1320.0, 450.0),
    ]
    (item,) = result["ratios"]
    assert item["D/L_time"] == 1.02 and item["timing"] == "paired"
    assert item["D/L_mem"] == 1320.0 / 1100.0 and item["D/L_work_mem"] == 450.0 / 600.0
    assert item["D-L_work_mb"] == -150.0
    assert result["settings"]["memory_rerun"]["steps"] == 2 and old["rows"][0]["peak_mb"] == 1000.0
    calls.clear()
    assert speed.rerun_memory(result, 1, 2, 60)["rows"] == result["rows"] and calls == []
    assert "Memory measured again at commit" in speed.markdown({**result, "machine": "m"})


def test_a_runs_commit_is_dirty_for_code_changes_not_for_the_results_the_benchmarks_write(tmp_path, monkeypatch):
    """A run records ``<commit>+dirty`` when tracked code differs from the commit; the result files the benchmarks
    themselves rewrite as rows land (``benchmarks/results``) leave it clean."""
    import subprocess

    from benchmarks.quality import runs

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "table.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(runs, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results" / "table.json").write_text('{"row": 1}\n')
    (tmp_path / "notes.log").write_text("untracked\n")
    assert runs.project_commit() == head
    (tmp_path / "code.py").write_text("a = 2\n")
    assert runs.project_commit() == head + "+dirty"
