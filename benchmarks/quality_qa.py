#!/usr/bin/env python
"""Quality benchmark on SQuAD v1.1: does distillation (and attention transfer) help a 3-layer QA student?

One teacher (all-MiniLM-L6-v2 fine-tuned for extractive QA on the first ``train_examples`` questions of
SQuAD v1.1 train), then student variants with the same initialisation (layers 1, 3, 5 of that
fine-tuned teacher, QA head included), data, steps and seeds:

- ``finetune``: fine-tuning without a teacher;
- ``kd``: start/end logit KD over the context positions (+ hard labels);
- ``kd_attn``: ``kd`` + MiniLM attention KL on every mapped layer.

EM and F1 (percent) on the first ``eval_examples`` questions of the SQuAD v1.1 dev set, scored against
all reference answers. Writes ``benchmarks/results/quality_qa.json`` and ``.md``, updated after every run.
The defaults take about 8 machine-hours on 2 CPU cores (`step_time.py`), so a rerun continues where the last one
stopped; CUDA is used when present.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from benchmarks.quality_runs import (
    RUN_SELECTION,
    check_variants,
    mean_std,
    portable_settings,
    readme_table,
    run_students,
    teacher_curve_line,
)
from benchmarks.teacher_training import fingerprint, last_round_metrics, train_teacher
from hf_attn_distill.hardware import bf16_pays
from hf_attn_distill.profiling import machine_info
from hf_attn_distill.recipes.distill_qa import main as run_recipe
from hf_attn_distill.recipes.sst2_demo import minilm_path

ROOT = Path(__file__).resolve().parent.parent

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
    train_examples: int = field(default=40000, metadata={"help": "First N training questions (teacher and students)."})
    eval_examples: int = field(default=2000, metadata={"help": "First N dev questions scored."})
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
            "help": "bf16 autocast; default: where it pays (hf_attn_distill.hardware.bf16_pays: CUDA with bf16; a "
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
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={"help": "Student seeds."})
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
        "--max_train_samples",
        str(args.train_examples),
        "--max_eval_samples",
        str(args.eval_examples),
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
        "--do_eval",
        *run_args(args),
    ]


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


def trained_teacher(args: QualityQAArguments) -> tuple[Path, dict]:
    """The converged (or budget-capped) teacher: its folder and ``{f1, exact_match, teacher_curve, ...}``."""
    key = fingerprint(teacher_settings(args), [Path(args.data_dir) / "train.json"])
    teacher_dir, summary = train_teacher(
        run_recipe,
        [
            "--training_mode",
            "finetune",
            "--teacher_model_name_or_path",
            minilm_path(),
            "--learning_rate",
            str(args.teacher_learning_rate),
            "--lr_scheduler_type",
            "inverse_sqrt",
            "--warmup_steps",
            str(args.teacher_warmup_steps),
            "--per_device_train_batch_size",
            str(args.batch_size),
            "--seed",
            "0",
            "--do_train",
            "--do_eval",
            *data_args(args),
            *run_args(args),
        ],
        work=Path(args.work_dir),
        key=key,
        metric="f1",
        first_steps=args.teacher_first_steps,
        max_steps=args.teacher_max_steps,
        save_steps=args.teacher_first_steps // 2,
        threshold=args.converged_gain,
        evaluate_checkpoint=lambda folder: run_recipe(
            [
                "--training_mode",
                "finetune",
                "--teacher_model_name_or_path",
                str(folder),
                "--output_dir",
                str(folder / "eval"),
                "--do_eval",
                *data_args(args),
                *run_args(args),
            ]
        ),
    )
    _, metrics = last_round_metrics(teacher_dir)
    return teacher_dir, {"f1": metrics["eval_f1"], "exact_match": metrics["eval_exact_match"], **summary}


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
        }
    return {
        "metric": "f1",
        "unit": "percent",
        "eval_set": f"SQuAD v1.1 dev, first {args.eval_examples} questions (shared/data/squad/validation.json)",
        "teacher": teacher["f1"],
        "teacher_em": teacher["exact_match"],
        "teacher_model": f"all-MiniLM-L6-v2 fine-tuned for QA, {teacher['teacher_curve'][-1][0]} steps on the first "
        f"{args.train_examples} SQuAD v1.1 training questions",
        **{k: teacher[k] for k in ("teacher_curve", "teacher_converged", "teacher_curve_note") if k in teacher},
        "student": f"3 layers (init: the fine-tuned teacher's layers {args.student_layers}), 384 hidden, 12 heads",
        "students": students,
        "machine": machine_info(),
        "train_examples": args.train_examples,
        "eval_examples": args.eval_examples,
        "teacher_steps": teacher["teacher_curve"][-1][0],
        "student_steps": args.student_steps,
        "settings": portable_settings(args, ROOT),
    }


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
        return {"f1": metrics["eval_f1"], "exact_match": metrics["eval_exact_match"]}

    return run_students(
        args.variants,
        args.seeds,
        work,
        run_one,
        lambda runs: summarize(teacher, runs, args),
        Path(args.results),
        markdown,
        done_dir=teacher_dir / "students",
        key=fingerprint({"teacher": teacher_dir.name, **student_settings(args)}, []),
        card_dir=Path(args.model_card_dir) if args.model_card_dir else None,
    )


if __name__ == "__main__":
    main()
