#!/usr/bin/env python
"""Per-step time of the quality benchmarks' teacher and student steps, to spend the CPU well before long runs.

Every row runs the task's recipe, exactly as the quality benchmark does, twice in a fresh process: for
``--short`` and for ``--long`` steps. The difference of the two ``train_runtime`` values over the difference of
steps is the time of one step, without data preparation, model loading or the first steps' warm-up. Rows
(``--rows``, default all):

- ``{mt,qa}_teacher_{fp32,bf16}_{1,2}t``: the teacher's fine-tuning step, float32 or bf16 autocast, 1 or 2 torch
  threads; ``*_x2`` runs two such 1-thread processes at once (what two background runs on 2 cores get each);
- ``mt_teacher_{fp32,bf16}_1t_group``, ``qa_teacher_fp32_1t_group``: with
  ``train_sampling_strategy="group_by_length"`` (batches of similar lengths, less padding; QA windows padded per
  batch, ``--pad_to_max_length false``). The first steps of a grouped epoch take the longest batches of its first
  group of 50, so ``--short``/``--long`` below 50 overstate the grouped step time;
- ``mt_teacher_bf16_1t_len40``: sources cut at 40 tokens instead of 64 (5% of Multi30k's German sentences are
  longer than 40 MiniLM tokens, so this also changes what the model sees);
- ``{mt,qa}_student_{fp32,bf16}``: a student step with KD + attention KL at every mapped site (1 thread), its
  evaluation without the teacher (``eval_with_teacher=False``, as the benchmarks score students);
- ``sst2_kd_cache``: a logit-KD student step reading the teacher-logit cache instead of running the teacher,
  next to ``sst2_kd`` without it.

Each row also reports the time of one evaluation on the dev subset the benchmark evaluates on (``eval_s``), what
evaluation during training would cost per call. Writes ``benchmarks/results/step_time.json`` and ``.md``. Run it
on a quiet machine: another process on the cores skews every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.quality.runs import write_results
from hf_attn_distill.utils.hardware import native_bf16
from hf_attn_distill.utils.profiling import machine_info

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"


def _minilm() -> str:
    from hf_attn_distill.utils.pretrained import minilm_path

    return minilm_path()


def _common(out: str, steps: int, batch: int, bf16: bool, evaluate: bool = True) -> list[str]:
    import torch

    precision = ["--bf16", "true", "--use_cpu", str(not torch.cuda.is_available())] if bf16 else []
    return [
        "--output_dir",
        out,
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        str(batch),
        "--per_device_eval_batch_size",
        "64",
        "--logging_steps",
        str(max(steps, 1)),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--do_train",
        *(["--do_eval"] if evaluate else []),
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        "0",
        "--warmup_steps",
        "0",
        *precision,
    ]


def _mt_teacher_dir(work: Path) -> str:
    """An untrained MiniLM encoder-decoder saved once: what the translation students distill from (for speed,
    a trained teacher costs the same)."""
    folder = work / "mt_teacher"
    if not (folder / "config.json").exists():
        from hf_attn_distill.recipes.distill_translation import main

        main(
            [
                "--training_mode",
                "finetune",
                "--teacher_model_name_or_path",
                _minilm(),
                "--build_encoder_decoder",
                "--data_dir",
                str(DATA / "multi30k"),
                "--source_lang",
                "de",
                "--target_lang",
                "en",
                "--max_train_samples",
                "64",
                "--max_eval_samples",
                "8",
                *_common(str(folder), 1, 8, False),
            ]
        )
    return str(folder)


def _qa_teacher_dir(work: Path) -> str:
    folder = work / "qa_teacher"
    if not (folder / "config.json").exists():
        from hf_attn_distill.recipes.distill_qa import main

        main(
            [
                "--training_mode",
                "finetune",
                "--teacher_model_name_or_path",
                _minilm(),
                "--train_file",
                str(DATA / "squad" / "train.json"),
                "--validation_file",
                str(DATA / "squad" / "validation.json"),
                "--max_train_samples",
                "64",
                "--max_eval_samples",
                "8",
                *_common(str(folder), 1, 8, False),
            ]
        )
    return str(folder)


def recipe_argv(row: str, work: Path, out: str, steps: int, evaluate: bool = True) -> tuple[str, list[str]]:
    """``(recipe module, argv)`` of one row's run of ``steps`` steps (and one evaluation, if ``evaluate``)."""
    bf16 = "bf16" in row
    if row.startswith("mt_"):
        source_len = "40" if row.endswith("len40") else "64"
        data = [
            "--data_dir",
            str(DATA / "multi30k"),
            "--source_lang",
            "de",
            "--target_lang",
            "en",
            "--max_train_samples",
            "4000",
            "--max_eval_samples",
            "1014",
            "--max_source_length",
            source_len,
            "--max_target_length",
            "48",
            "--evaluate_teacher",
            "false",
            "--predict_with_generate",
            "--generation_max_length",
            "48",
            "--generation_num_beams",
            "1",
        ]
        if row.endswith("group"):
            data += ["--train_sampling_strategy", "group_by_length"]
        if "_teacher_" in row:
            model = [
                "--training_mode",
                "finetune",
                "--teacher_model_name_or_path",
                _minilm(),
                "--build_encoder_decoder",
            ]
        else:
            model = [
                "--teacher_model_name_or_path",
                _mt_teacher_dir(work),
                "--student_teacher_layers",
                "1,3,5",
                "--student_decoder_layers",
                "1,3,5",
                "--layer_map",
                "uniform",
                "--decoder_layer_map",
                "uniform",
                "--cross_layer_map",
                "uniform",
                "--eval_with_teacher",  # as the benchmark's students: scored alone
                "false",
            ]
        return "hf_attn_distill.recipes.distill_translation", [*model, *data, *_common(out, steps, 32, bf16, evaluate)]
    if row.startswith("qa_"):
        data = [
            "--train_file",
            str(DATA / "squad" / "train.json"),
            "--validation_file",
            str(DATA / "squad" / "validation.json"),
            "--max_train_samples",
            "2000",
            "--max_eval_samples",
            "2000",
            "--max_seq_length",
            "256",
            "--doc_stride",
            "128",
            "--evaluate_teacher",
            "false",
        ]
        if row.endswith("group"):
            data += ["--pad_to_max_length", "false", "--train_sampling_strategy", "group_by_length"]
        if "_teacher_" in row:
            model = ["--training_mode", "finetune", "--teacher_model_name_or_path", _minilm()]
        else:
            model = ["--teacher_model_name_or_path", _qa_teacher_dir(work), "--student_teacher_layers", "1,3,5"]
            model += ["--eval_with_teacher", "false"]  # as the benchmark's students: scored alone
        return "hf_attn_distill.recipes.distill_qa", [*model, *data, *_common(out, steps, 16, bf16, evaluate)]
    sst2 = DATA / "sst2"
    cache = ["--teacher_logits_cache", str(work / "sst2_logits")] if row.endswith("cache") else []
    return "hf_attn_distill.recipes.distill_classification", [
        "--teacher_model_name_or_path",
        _minilm(),
        "--student_teacher_layers",
        "1,3,5",
        "--attention_weight",
        "0",
        "--train_file",
        str(sst2 / "train.tsv"),
        "--validation_file",
        str(sst2 / "test.tsv"),
        "--max_train_samples",
        "4000",
        "--max_seq_length",
        "64",
        "--evaluate_teacher",
        "false",
        *cache,
        *_common(out, steps, 32, False, evaluate),
    ]


ROWS = (
    "mt_teacher_fp32_1t",
    "mt_teacher_fp32_2t",
    "mt_teacher_fp32_1t_x2",
    "mt_teacher_fp32_1t_group",
    "mt_teacher_bf16_1t",
    "mt_teacher_bf16_2t",
    "mt_teacher_bf16_1t_x2",
    "mt_teacher_bf16_1t_group",
    "mt_teacher_bf16_1t_len40",
    "mt_student_fp32",
    "mt_student_bf16",
    "qa_teacher_fp32_1t",
    "qa_teacher_fp32_2t",
    "qa_teacher_fp32_1t_x2",
    "qa_teacher_fp32_1t_group",
    "qa_teacher_bf16_1t",
    "qa_teacher_bf16_2t",
    "qa_teacher_bf16_1t_x2",
    "qa_student_fp32",
    "qa_student_bf16",
    "sst2_kd",
    "sst2_kd_cache",
)


def default_rows() -> list[str]:
    """Every row, but the bf16 ones only where bf16 is native (emulated, they take many times longer)."""
    return [row for row in ROWS if "bf16" not in row or native_bf16()]


def threads_of(row: str) -> int:
    return 2 if "_2t" in row else 1


def per_step(short: dict, long: dict, short_steps: int, long_steps: int) -> float:
    """Seconds per step from two runs' ``train_runtime``: the difference removes set-up and warm-up."""
    return (long["train_runtime"] - short["train_runtime"]) / (long_steps - short_steps)


def _launch(row: str, work: Path, steps: int, evaluate: bool) -> subprocess.Popen:
    out = tempfile.mkdtemp(dir=work)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_of(row)), "MKL_NUM_THREADS": str(threads_of(row))}
    spec = json.dumps({"row": row, "work": str(work), "out": out, "steps": steps, "evaluate": evaluate})
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.speed.step_time", "--_worker", spec],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"step_time worker failed: {(stderr or stdout).strip().splitlines()[-3:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure(row: str, work: Path, short: int, long: int) -> dict:
    copies = 2 if row.endswith("_x2") else 1
    runs = {}
    for steps in (short, long):
        # x2: both at once, as two background runs; only the longer run evaluates (the shorter one's evaluation
        # would cost as much and tell nothing more)
        procs = [_launch(row, work, steps, evaluate=steps == long) for _ in range(copies)]
        runs[steps] = [_result(p) for p in procs]
    step_s = sum(per_step(a, b, short, long) for a, b in zip(runs[short], runs[long])) / copies
    eval_s = sum(r["eval_runtime"] for r in runs[long]) / copies
    return {"row": row, "threads": threads_of(row), "processes": copies, "step_s": step_s, "eval_s": eval_s}


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}  ",
        f"Steps: {result['short']} and {result['long']} per run "
        "(per-step time = difference of train_runtime / difference of steps)",
        "",
        "| row | threads | processes at once | s / step | s / evaluation |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['threads']} | {r['processes']} | {r['step_s']:.3f} | {r['eval_s']:.1f} |")
    plans = budget(result)
    if plans:
        lines += [
            "",
            "What the quality benchmarks' defaults cost on this machine, from the rows above: two 1-thread runs at "
            "once (the `_x2` step time; student steps and evaluations slowed by the same factor), hours of the "
            "whole 2-core machine; data preparation, model loading and sequence-KD translations not counted.",
            "",
            "| benchmark | teacher steps (cap) | teacher h | its wall h (one run) | student runs x steps | students h "
            "| total h |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in plans:
            lines.append(
                f"| {b['benchmark']} | {b['teacher_steps']:,}{' grouped by length' if b.get('teacher_grouped') else ''} | {b['teacher_h']:.1f} | {2 * b['teacher_h']:.1f} | "
                f"{b['student_runs']} x "
                f"{b['student_steps']:,} | {b['students_h']:.1f} | {b['teacher_h'] + b['students_h']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def tuning_runs(args) -> int:
    """Student runs a benchmark spends choosing its attention weight on val before the test runs."""
    from benchmarks.quality.translation import ATTENTION_VARIANTS

    grid = getattr(args, "attention_weight_grid", [])
    return len(grid) if grid and set(args.variants) & set(ATTENTION_VARIANTS) else 0


def budget(result: dict) -> list[dict]:
    """Hours of the whole 2-core machine that each quality benchmark's defaults take, from the measured rows (of the
    faster precision, where both were measured): the
    teacher to its step cap (every doubling round evaluated on dev), then every (variant, seed) student run and
    its evaluation (with the runs that tune the attention weight on val); two 1-thread processes run at once, so each is slowed by the ``_x2`` factor and two
    progress at a time. Tasks whose rows are missing are left out."""
    from benchmarks.quality.qa import QualityQAArguments
    from benchmarks.quality.translation import QualityTranslationArguments

    rows = {r["row"]: r for r in result["rows"]}
    plans = []
    for task, args, name in (
        ("mt", QualityTranslationArguments(), "quality_translation"),
        ("qa", QualityQAArguments(), "quality_qa"),
    ):
        measured = [
            [rows[n] for n in (f"{task}_teacher_{p}_1t", f"{task}_teacher_{p}_1t_x2", f"{task}_student_{p}")]
            for p in ("fp32", "bf16")
            if all(n in rows for n in (f"{task}_teacher_{p}_1t", f"{task}_teacher_{p}_1t_x2", f"{task}_student_{p}"))
        ]
        if not measured:
            continue
        # the faster precision where both were measured (bf16 where native, float32 where it is emulated)
        alone, shared, student = min(measured, key=lambda m: m[1]["step_s"])
        slowdown = shared["step_s"] / alone["step_s"]
        rounds, steps = 1, args.teacher_first_steps
        while steps * 2 <= args.teacher_max_steps:
            rounds, steps = rounds + 1, steps * 2
        step_s = shared["step_s"]
        grouped = rows.get(alone["row"] + "_group")
        if getattr(args, "group_by_length", False) and grouped:  # grouped teacher steps; students not measured so
            step_s = grouped["step_s"] * slowdown  # (their ungrouped step time is an upper bound)
        teacher_s = steps * step_s + rounds * alone["eval_s"] * slowdown
        runs = len(args.variants) * len(args.seeds) + tuning_runs(args)
        students_s = runs * (args.student_steps * student["step_s"] + student["eval_s"]) * slowdown
        plans.append(
            {
                "benchmark": name,
                "teacher_steps": steps,
                "teacher_grouped": bool(getattr(args, "group_by_length", False) and grouped),
                "teacher_h": teacher_s / 2 / 3600,
                "student_runs": runs,
                "student_steps": args.student_steps,
                "students_h": students_s / 2 / 3600,
            }
        )
    return plans


def updatable(path: Path, fresh: dict) -> dict:
    """The result file at ``path``, to have rows replaced: it must come from the same machine and steps as
    ``fresh`` (a new, empty result), else rows measured differently would share one table."""
    if not path.exists():
        raise SystemExit(f"--update: there is no {path} to update; measure without --update first.")
    old = json.loads(path.read_text())
    if [old[k] for k in ("machine", "short", "long")] != [fresh[k] for k in ("machine", "short", "long")]:
        raise SystemExit(f"--update: {path} was measured on another machine or with other steps; measure anew.")
    return old


def _worker(spec: dict) -> None:
    import importlib

    module, argv = recipe_argv(spec["row"], Path(spec["work"]), spec["out"], spec["steps"], spec["evaluate"])
    metrics = importlib.import_module(module).main(argv)
    print("RESULT " + json.dumps({k: metrics.get(k) for k in ("train_runtime", "eval_runtime")}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows",
        nargs="+",
        default=None,
        choices=list(ROWS),
        help="Rows to measure (default: every row, but the bf16 ones only where bf16 is native: emulated, they "
        "take many times longer and only show what bf16_check.py shows in seconds).",
    )
    parser.add_argument("--short", type=int, default=5, help="Steps of the first run of a row.")
    parser.add_argument("--long", type=int, default=25, help="Steps of the second run of a row.")
    parser.add_argument("--work_dir", default="outputs/step_time")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "step_time"))
    parser.add_argument(
        "--update",
        action="store_true",
        help="Measure only --rows and put them into the existing result file (same machine, steps), replacing "
        "rows of the same name: to remeasure a row another process disturbed.",
    )
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        _worker(json.loads(args._worker))
        return {}
    if args.rows is None:
        args.rows = default_rows()
    if args.long <= args.short:
        raise SystemExit("--long must be larger than --short.")
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "short": args.short, "long": args.long, "rows": []}
    if args.update:
        result = updatable(Path(args.results).with_suffix(".json"), result)
    for row in args.rows:
        measured = measure(row, work, args.short, args.long)
        result["rows"] = sorted(
            [r for r in result["rows"] if r["row"] != row] + [measured], key=lambda r: ROWS.index(r["row"])
        )
        print(f"{row}: {measured['step_s']:.3f} s/step", flush=True)
        write_results(Path(args.results), result, markdown)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
