#!/usr/bin/env python
"""Quality benchmark on SQuAD v1.1: does distillation (and attention transfer) help a 3-layer QA student?

One teacher (all-MiniLM-L6-v2 fine-tuned for extractive QA on the first ``train_examples`` questions of
SQuAD v1.1 train), then student variants with the same initialisation (layers 1, 3, 5 of that
fine-tuned teacher, QA head included), data, steps and seeds:

- ``finetune``: fine-tuning without a teacher;
- ``kd``: start/end logit KD over the context positions (+ hard labels);
- ``kd_attn``: ``kd`` + MiniLM attention KL on every mapped layer.

The teacher is the trained one that ships in ``../shared/teachers/squad-minilm-l6`` (``--teacher_dir``; its
recorded settings must be this run's), or, with ``--teacher_dir ''``, one trained here in doubling rounds to a
plateau. EM and F1 (percent) on all ``test_examples`` questions of the SQuAD v1.1 dev set (default: all 10,570),
scored against every reference answer, and a learning curve per run on the first ``eval_examples`` of them.
Each finished (variant, seed) run is kept in ``runs_dir`` (committed), so a rerun of the same command continues
where the last one stopped and the table is merged from every kept run; CUDA is used when present. Writes
``benchmarks/results/quality_qa.json`` and ``.md``, updated after every run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from benchmarks.quality.runs import (
    RUN_SELECTION,
    check_variants,
    curve_points,
    learning_curve_lines,
    machines,
    mean_std,
    portable_settings,
    readme_table,
    run_students,
    runs_done,
    runs_planned,
    teacher_curve_line,
    term_curves,
)
from benchmarks.quality.teachers import (
    SHIPPED_TEACHERS,
    fingerprint,
    last_round_metrics,
    shipped_teacher,
    teacher_test_scores,
    train_benchmark_teacher,
)
from hf_attn_distill.recipes.distill_qa import main as run_recipe
from hf_attn_distill.utils.hardware import bf16_pays
from hf_attn_distill.utils.pretrained import minilm_path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TEACHER = SHIPPED_TEACHERS / "squad-minilm-l6"
#: Teacher settings that decide what the students see (windows and training questions): a shipped teacher must
#: have been trained with this run's.
STUDENT_FACING = ("train_examples", "max_seq_length", "doc_stride")

PLANNED_SEEDS = (1, 2, 3)  # the seeds every row gets
VARIANTS = {
    "finetune": ["--training_mode", "finetune"],
    "kd": ["--attention_weight", "0"],
    "kd_attn": ["--attention_loss", "kl", "--attention_weight", "1.0"],
    # TinyBERT-style: attention-score MSE (weight 0.2, as on SST-2) + hidden-state MSE, on top of kd
    "kd_attn_hidden": [
        "--attention_loss",
        "mse_scores",
        "--attention_weight",
        "0.2",
        "--hidden_weight",
        "1.0",
        "--hidden_loss",
        "mse",
    ],
}


@dataclass
class QualityQAArguments:
    """Budget and output of the QA quality benchmark."""

    work_dir: str = field(default="outputs/quality_qa", metadata={"help": "Scratch folder for models."})
    results: str = field(
        default=str(ROOT / "benchmarks" / "results" / "quality_qa"), metadata={"help": "JSON/MD path stem."}
    )
    model_card_dir: str = field(
        default=str(ROOT / "model_cards" / "squad"),
        metadata={"help": "Where the best student's model card goes, as its recipe wrote it ('' for nowhere)."},
    )
    data_dir: str = field(
        default=str(ROOT.parent / "shared" / "data" / "squad"), metadata={"help": "SQuAD v1.1 folder."}
    )
    teacher_dir: str = field(
        default=str(SHIPPED_TEACHER) if (SHIPPED_TEACHER / "config.json").exists() else "",
        metadata={
            "help": "A trained teacher taken as it is (a model folder with provenance.json and teacher_curve.json); "
            "default: the one shipped in ../shared/teachers when present. '' trains one here to a plateau."
        },
    )
    runs_dir: str = field(
        default=str(ROOT / "benchmarks" / "results" / "runs" / "quality_qa"),
        metadata={"help": "Where each finished (variant, seed) run and the teacher's test scores are kept."},
    )
    train_examples: int = field(default=40000, metadata={"help": "First N training questions (teacher and students)."})
    eval_examples: int = field(
        default=2000,
        metadata={"help": "First N dev questions of the teacher's curve and the students' learning curves."},
    )
    test_examples: int | None = field(
        default=None, metadata={"help": "First N dev questions of the final scores (default: all 10,570)."}
    )
    learning_curve_points: int = field(
        default=4, metadata={"help": "Evaluations on the first eval_examples questions during each student run."}
    )
    max_seq_length: int = field(default=256, metadata={"help": "Tokens per window."})
    doc_stride: int = field(default=128, metadata={"help": "Context overlap of consecutive windows."})
    teacher_first_steps: int = field(
        default=500, metadata={"help": "Steps of the teacher's first round; each further round doubles them."}
    )
    teacher_max_steps: int = field(
        default=8000, metadata={"help": "Most steps the teacher gets: the curve stops here if it has not converged."}
    )
    teacher_warmup_steps: int = field(default=300, metadata={"help": "Teacher warm-up steps (inverse_sqrt after)."})
    converged_gain: float = field(
        default=1.0,
        metadata={"help": "The teacher has converged when its last doubling of steps gained less F1 than this."},
    )
    student_steps: int = field(default=300, metadata={"help": "Steps per student run (same for every variant)."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size (features)."})
    teacher_learning_rate: float = field(default=1e-4, metadata={"help": "Teacher peak learning rate."})
    student_learning_rate: float = field(default=1e-4, metadata={"help": "Student learning rate."})
    student_layers: str = field(default="1,3,5", metadata={"help": "Teacher layers that initialise the student."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast; default: where it pays (hf_attn_distill.utils.hardware.bf16_pays: CUDA with bf16; a "
            "CPU with AVX512-BF16 or AMX where a one-second probe measures bf16 faster than float32), else float32."
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Pad each batch to its longest window (--pad_to_max_length false) and batch windows of similar "
            "length (train_sampling_strategy='group_by_length'), teacher and students; evaluation stays in dataset "
            "order. SQuAD windows average 159 of 256 tokens: grouped batches carry a third fewer tokens."
        },
    )
    teacher_only: bool = field(default=False, metadata={"help": "Train (or continue) the teacher, then stop."})
    seeds: list[int] = field(default_factory=lambda: list(PLANNED_SEEDS), metadata={"help": "Student seeds."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bf16_pays()


def data_args(args: QualityQAArguments) -> list[str]:
    data = Path(args.data_dir)
    for name in ("train.json", "validation.json"):
        if not (data / name).exists():
            raise SystemExit(f"{data / name} is missing: point --data_dir at the squad folder of shared/data.")
    return [
        "--card_dataset_id",  # the shared squad folder holds SQuAD v1.1 train and dev
        "rajpurkar/squad",
        "--train_file",
        str(data / "train.json"),
        "--validation_file",
        str(data / "validation.json"),
        "--test_file",  # the final scores: the same dev set, all of it (or test_examples)
        str(data / "validation.json"),
        "--max_train_samples",
        str(args.train_examples),
        "--max_eval_samples",
        str(args.eval_examples),
        *(["--max_predict_samples", str(args.test_examples)] if args.test_examples else []),
        "--max_seq_length",
        str(args.max_seq_length),
        "--doc_stride",
        str(args.doc_stride),
    ]


def run_args(args: QualityQAArguments) -> list[str]:
    import torch

    bf16 = ["--bf16", "true", "--use_cpu", str(not torch.cuda.is_available())] if args.bf16 else []
    return [
        "--per_device_eval_batch_size",
        "64",
        "--weight_decay",
        "0.01",
        "--logging_steps",
        "50",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        *bf16,
        *(
            ["--pad_to_max_length", "false", "--train_sampling_strategy", "group_by_length"]
            if args.group_by_length
            else []
        ),
    ]


def common_args(args: QualityQAArguments, output_dir: Path, seed: int) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--warmup_steps",
        "0.1",
        "--save_strategy",
        "no",
        "--seed",
        str(seed),
        "--eval_with_teacher",  # the scores are the student's alone: the teacher's eval losses would cost ~3x
        "false",
        "--do_train",
        *learning_curve_args(args),
        "--do_predict",
        *run_args(args),
    ]


def learning_curve_args(args: QualityQAArguments) -> list[str]:
    """Recipe flags that evaluate a student on the first ``eval_examples`` questions ``learning_curve_points``
    times during its training (the last at its final step)."""
    every = max(1, args.student_steps // max(1, args.learning_curve_points))
    return ["--eval_strategy", "steps", "--eval_steps", str(every)]


def student_settings(args) -> dict:
    """What makes student runs comparable, besides the teacher: every setting but which runs and where."""
    return {k: v for k, v in portable_settings(args, ROOT).items() if k not in RUN_SELECTION}


def teacher_settings(args: QualityQAArguments) -> dict:
    """What makes one teacher: the keys of its cache folder (with the training file's contents)."""
    keys = (
        "train_examples",
        "eval_examples",
        "max_seq_length",
        "doc_stride",
        "teacher_first_steps",
        "teacher_warmup_steps",
        "batch_size",
        "teacher_learning_rate",
        "bf16",
    )
    # group_by_length only when on, so that the keys of teachers trained before it existed stay the same
    keys += ("group_by_length",) if args.group_by_length else ()
    return {"recipe": "qa-teacher-v1", **{k: getattr(args, k) for k in keys}}


def shipped(args: QualityQAArguments) -> dict:
    """The teacher of ``--teacher_dir`` checked against this run's settings (a clear exit when they disagree), with
    its recorded curve: ``{cache_key, provenance, teacher_curve, teacher_converged, teacher_curve_note}``."""
    files = [Path(args.data_dir) / "train.json"]
    return shipped_teacher(args, teacher_settings, files, STUDENT_FACING, "eval_examples")


def given_teacher(args: QualityQAArguments) -> tuple[Path, dict]:
    """The trained teacher of ``--teacher_dir`` as it is: ``{f1, exact_match}`` on the final dev questions, computed
    here from its weights once (kept in ``runs_dir``), with its recorded curve."""
    folder = Path(args.teacher_dir)
    teacher = shipped(args)
    return folder, {**teacher_scores(args, folder, teacher["cache_key"]), **teacher}


def teacher_scores(args: QualityQAArguments, folder: Path, name: str) -> dict:
    """``{f1, exact_match}`` of the teacher in ``folder`` (called ``name``) on the final dev questions, computed once
    and kept in ``runs_dir`` (a rerun, or a later sitting, reads them back)."""
    scored = {"teacher": name, "test_examples": args.test_examples, "bf16": args.bf16}

    return teacher_test_scores(
        run_recipe, folder, [*data_args(args), *run_args(args)], args, scored, ("f1", "exact_match")
    )


def trained_teacher(args: QualityQAArguments) -> tuple[Path, dict]:
    """The converged (or budget-capped) teacher: its folder and ``{f1, exact_match, teacher_curve, ...}``."""
    if args.teacher_dir:
        return given_teacher(args)
    key = fingerprint(teacher_settings(args), [Path(args.data_dir) / "train.json"])
    teacher_dir, summary = train_benchmark_teacher(
        run_recipe,
        args,
        key,
        "f1",
        ["--teacher_model_name_or_path", minilm_path()],
        [*data_args(args), *run_args(args)],
    )
    last_round_metrics(teacher_dir)  # a finished round, or a clear error
    return teacher_dir, {**teacher_scores(args, teacher_dir, teacher_dir.name), **summary}


def summarize(teacher: dict, runs: dict[str, list[dict]], args: QualityQAArguments) -> dict:
    students = {}
    for name, items in runs.items():
        f1s = [r["f1"] for r in items]
        mean, std = mean_std(f1s)
        students[name] = {
            "mean": mean,
            "std": std,
            "runs": f1s,
            "em_mean": statistics.fmean(r["exact_match"] for r in items),
            "em_runs": [r["exact_match"] for r in items],
            "seeds": [r["seed"] for r in items],
            "retention": statistics.fmean(f1s) / teacher["f1"],
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in items),
            # per seed: F1 on the first eval_examples dev questions during training, [[step, F1], ...]
            "learning_curves": [r["learning_curve"] for r in items if r.get("learning_curve")],
        }
    scored = f"first {args.test_examples}" if args.test_examples else "all"
    return {
        "metric": "f1",
        "unit": "percent",
        "eval_set": f"SQuAD v1.1 dev, {scored} questions (shared/data/squad/validation.json); learning curves on "
        f"the first {args.eval_examples}",
        "teacher": teacher["f1"],
        "teacher_em": teacher["exact_match"],
        "teacher_model": f"all-MiniLM-L6-v2 fine-tuned for QA, {teacher['teacher_curve'][-1][0]} steps on the first "
        f"{args.train_examples} SQuAD v1.1 training questions"
        + (f" (shipped: {teacher['cache_key']})" if "cache_key" in teacher else ""),
        **{k: teacher[k] for k in ("teacher_curve", "teacher_converged", "teacher_curve_note") if k in teacher},
        "student": f"3 layers (init: the fine-tuned teacher's layers {args.student_layers}), 384 hidden, 12 heads",
        "students": students,
        "machine": machines(runs),
        "train_examples": args.train_examples,
        "eval_examples": args.eval_examples,
        "teacher_steps": teacher["teacher_curve"][-1][0],
        "student_steps": args.student_steps,
        "settings": portable_settings(args, ROOT),
    }


LABELS = {
    "finetune": "`finetune` (no teacher)",
    "kd": "`kd` (start/end logit KD)",
    "kd_attn": "`kd_attn` (+ MiniLM attention KL)",
    "kd_attn_hidden": "`kd_attn_hidden` (+ attention-score MSE + hidden-state MSE)",
}


def readme(result: dict) -> str:
    """The README's QA section of ``result``: teacher and budget in one line, the table, the runs done so far."""
    settings = result["settings"]
    curve, runs = curve_points(result["teacher_curve"]), runs_done(result)
    scored = f"the first {settings['test_examples']:,}" if settings.get("test_examples") else "all 10,570"
    lines = [
        "### SQuAD v1.1: 3-layer QA student of the shipped MiniLM QA teacher",
        "",
        f"Teacher: all-MiniLM-L6-v2 with a QA head, {result['teacher_steps']:,} steps x {settings['batch_size']} "
        f"windows on the first {result['train_examples']:,} training questions ({settings['max_seq_length']} tokens, "
        f"stride {settings['doc_stride']}); F1 on {result['eval_examples']:,} dev questions by step {curve} "
        f"({result['teacher_curve_note']}). Students: {result['student_steps']} steps x {settings['batch_size']} "
        f"windows from teacher layers {settings['student_layers']} (QA head included), the same data and seeds for "
        f"every row; F1 (EM: [benchmarks/results/quality_qa.md](benchmarks/results/quality_qa.md)) on {scored} dev questions, teacher included: F1 "
        f"{result['teacher']:.2f}, EM {result['teacher_em']:.2f}.",
        "",
        readme_table({**result, "metric": "F1"}, labels=LABELS).rstrip("\n"),
        "",
        f"Runs so far: {runs} of the {runs_planned(result, VARIANTS, PLANNED_SEEDS)}; machine: {result['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    lines = [
        f"Teacher: F1 {result['teacher']:.2f}, EM {result['teacher_em']:.2f}  ",
        f"Eval set: {result['eval_set']}  ",
        f"{teacher_curve_line(result)}  ",
        f"Machine: {result['machine']}",
        "",
        "| student variant | F1 mean | std | F1 runs | EM mean | retention (F1) | wall time / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["students"].items():
        runs = ", ".join(f"{a:.2f}" for a in s["runs"])
        lines.append(
            f"| {name} | {s['mean']:.2f} | {s['std']:.2f} | {runs} | {s['em_mean']:.2f} | {s['retention'] * 100:.1f}% "
            f"| {s['wall_s_mean']:.0f} s |"
        )
    lines += ["", "Against the teacher and the baselines:", "", readme_table(result).rstrip("\n")]
    curves = learning_curve_lines(result)
    if curves:
        lines += ["", f"Student learning curves (F1 on {result['eval_examples']} dev questions, mean over seeds):", ""]
        lines += curves
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(QualityQAArguments).parse_args_into_dataclasses(argv)
    check_variants(args.variants, VARIANTS)
    work = Path(args.work_dir)
    teacher_dir, teacher = trained_teacher(args)
    print(
        f"teacher F1 {teacher['f1']:.2f} EM {teacher['exact_match']:.2f} ({teacher['teacher_curve_note']})", flush=True
    )
    if args.teacher_only:
        return teacher

    def run_one(name: str, seed: int, output_dir: Path) -> dict:
        metrics = run_recipe(
            [
                "--training_mode",
                "distill",
                "--teacher_model_name_or_path",
                str(teacher_dir),
                "--student_teacher_layers",
                args.student_layers,
                "--learning_rate",
                str(args.student_learning_rate),
                "--max_steps",
                str(args.student_steps),
                "--temperature",
                "2.0",
                "--alpha_ce",
                "0.5",
                "--alpha_kd",
                "0.5",
                "--evaluate_teacher",
                "false",
                *data_args(args),
                *common_args(args, output_dir, seed),
                *VARIANTS[name],
            ]
        )
        curve = term_curves(output_dir, "eval_f1").get("eval_f1", [])
        return {"f1": metrics["test_f1"], "exact_match": metrics["test_exact_match"], "learning_curve": curve}

    return run_students(
        args.variants,
        args.seeds,
        work,
        run_one,
        lambda runs: summarize(teacher, runs, args),
        Path(args.results),
        markdown,
        done_dir=Path(args.runs_dir),
        key=fingerprint({"teacher": teacher.get("cache_key", teacher_dir.name), **student_settings(args)}, []),
        card_dir=Path(args.model_card_dir) if args.model_card_dir else None,
        table_variants=list(VARIANTS),
    )


if __name__ == "__main__":
    main()
