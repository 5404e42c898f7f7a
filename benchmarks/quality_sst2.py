#!/usr/bin/env python
"""Quality benchmark on SST-2: does attention transfer help a 3-layer student?

One fine-tuned teacher (all-MiniLM-L6-v2), then student variants with the same initialisation
(layers 1,3,5 of the pretrained MiniLM), data, steps and seeds:

- ``finetune``: fine-tuning without a teacher;
- ``kd``: logit KD (+ hard labels);
- ``kd_attn_kl``: KD + MiniLM attention KL on every mapped layer;
- ``kd_attn_mse``: KD + TinyBERT attention MSE on pre-softmax scores;
- ``kd_hidden`` / ``kd_attn_hidden``: KD (+ attention KL) + TinyBERT hidden-state MSE (embeddings and mapped layers);
- ``kd_value_relation``: KD + MiniLM's value relation (last layer);
- ``kd_minilmv2``: KD + MiniLMv2's query/key/value relations (last layer);
- ``kd_tinybert``: TinyBERT's task distillation, KD + attention-score MSE + hidden-state MSE;
- ``small_kd`` / ``small_minilmv2``: a narrower random-init student (4 layers x 256 hidden x 4 heads), where
  attention transfer cannot apply (12 teacher heads, 384 wide): logit KD alone, or + MiniLMv2 relations;
- not run by default: ``small_kd_hidden`` (the narrow student with hidden-state MSE through the projection) and
  ``small_minilmv2_h16`` / ``_decay`` / ``_mid`` (other MiniLMv2 settings for it).

Accuracy is measured on the 872-sentence GLUE dev set (``test.tsv``). Writes
``benchmarks/results/quality_sst2.json`` and ``.md``, updated after every run; ``--merge_results`` combines
files of separate runs. CPU by default (a student run takes 6-10 minutes on one core of a 2-core AMD EPYC, so
the defaults take several hours); CUDA is used when present.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from benchmarks.quality_runs import (
    RUN_SELECTION,
    check_variants,
    mean_std,
    portable_settings,
    read_runs,
    run_students,
    write_results,
)
from hf_attn_distill.profiling import machine_info
from hf_attn_distill.recipes.distill_classification import main as run_recipe
from hf_attn_distill.recipes.sst2_demo import DemoArguments, student_recipe_args, teacher_recipe_args

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "finetune": ["--training_mode", "finetune"],
    "kd": ["--attention_weight", "0"],
    "kd_attn_kl": ["--attention_loss", "kl"],
    "kd_attn_mse": ["--attention_loss", "mse_scores"],
    # more objectives (hidden states, MiniLM value relation, MiniLMv2 relations)
    "kd_hidden": ["--attention_weight", "0", "--hidden_weight", "1.0", "--hidden_loss", "mse"],
    "kd_attn_hidden": ["--attention_loss", "kl", "--hidden_weight", "1.0", "--hidden_loss", "mse"],
    "kd_value_relation": ["--attention_weight", "0", "--relation_weight", "1.0", "--relation_kinds", "vv"],
    "kd_minilmv2": ["--attention_weight", "0", "--relation_weight", "1.0", "--relation_kinds", "qq,kk,vv"],
    # TinyBERT's task-distillation objective: attention-score MSE + hidden-state MSE (embeddings too) + logit KD
    "kd_tinybert": ["--attention_loss", "mse_scores", "--hidden_weight", "1.0", "--hidden_loss", "mse"],
    # a narrower student (4 layers x 256 hidden x 4 heads, random init): only relation transfer applies
    "small_kd": ["--attention_weight", "0"],
    "small_minilmv2": ["--attention_weight", "0", "--relation_weight", "1.0", "--relation_kinds", "qq,kk,vv"],
    # MiniLMv2 settings for the narrow student: 16 relation heads (24 / 16 wide), the relation weight decayed to 0
    # over training (structure first, task last), an upper-middle teacher layer
    "small_minilmv2_h16": ["--attention_weight", "0", "--relation_weight", "1.0", "--relation_heads", "16"],
    "small_minilmv2_decay": [
        "--attention_weight",
        "0",
        "--relation_weight",
        "1.0",
        "--schedules",
        "relation_weight=cosine:0.0",
    ],
    "small_minilmv2_mid": ["--attention_weight", "0", "--relation_weight", "1.0", "--relation_teacher_layer", "3"],
    # TinyBERT's hidden-state MSE also serves the narrow student, through the learned 256 -> 384 projection
    "small_kd_hidden": ["--attention_weight", "0", "--hidden_weight", "1.0", "--hidden_loss", "mse"],
}
# the explorations of the narrow student (one seed each in the committed results) run only when named
EXPLORATIONS = ("small_kd_hidden", "small_minilmv2_h16", "small_minilmv2_decay", "small_minilmv2_mid")
DEFAULT_VARIANTS = [name for name in VARIANTS if name not in EXPLORATIONS]
SMALL_STUDENT = "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024"


@dataclass
class QualityArguments:
    """Budget and output of the quality benchmark."""

    work_dir: str = field(default="outputs/quality_sst2", metadata={"help": "Scratch folder for models."})
    results: str = field(
        default=str(ROOT / "benchmarks" / "results" / "quality_sst2"), metadata={"help": "JSON/MD path stem."}
    )
    data_dir: str = field(default=DemoArguments.data_dir, metadata={"help": "SST-2 folder."})
    teacher_steps: int = field(default=1000, metadata={"help": "Teacher fine-tuning steps."})
    student_steps: int = field(default=500, metadata={"help": "Steps per student run (same for every variant)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={"help": "Student seeds."})
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS), metadata={"help": "Variants to run."})
    attention_weight_kl: float = field(default=1.0, metadata={"help": "Attention weight of kd_attn_kl."})
    attention_weight_mse: float = field(
        default=0.2, metadata={"help": "Attention weight of kd_attn_mse (score MSE starts ~5x the KL; 0.2 evens them)."}
    )
    reuse_teacher: bool = field(default=True, metadata={"help": "Reuse work_dir/teacher if it exists."})
    merge_results: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instead of training: combine result JSONs of runs with the same teacher and budget that "
            "covered different seeds or variants (e.g. one process per seed); each variant and seed once."
        },
    )


def summarize(teacher_acc: float, runs: dict[str, list[dict]], args: QualityArguments) -> dict:
    students = {}
    for name, items in runs.items():
        accs = [r["accuracy"] for r in items]
        mean, std = mean_std(accs)
        students[name] = {
            "mean": mean,
            "std": std,
            "runs": accs,
            "seeds": [r["seed"] for r in items],
            "retention": mean / teacher_acc,
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in items),
        }
    return {
        "metric": "accuracy",
        "unit": "fraction",
        "eval_set": "GLUE SST-2 dev (872 sentences, shared/data/sst2/test.tsv)",
        "teacher": teacher_acc,
        "teacher_model": "all-MiniLM-L6-v2 fine-tuned on SST-2 train",
        "students": students,
        "student": "3 layers (init: pretrained all-MiniLM-L6-v2 layers 1,3,5), 384 hidden, 12 heads",
        "small_student": f"small_* variants: random init, {SMALL_STUDENT.replace(',', ', ')}",
        "machine": machine_info(),
        "settings": portable_settings(args, ROOT),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Teacher accuracy: {result['teacher'] * 100:.2f}%  ",
        f"Machine: {result['machine']}",
        "",
        "| student variant | accuracy mean | std | runs | retention | wall time / run |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in result["students"].items():
        runs = ", ".join(f"{a * 100:.2f}" for a in s["runs"])
        lines.append(
            f"| {name} | {s['mean'] * 100:.2f}% | {s['std'] * 100:.2f} | {runs} | {s['retention'] * 100:.1f}% | "
            f"{s['wall_s_mean']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def merge(args: QualityArguments) -> dict:
    """Combine result files of the same teacher and budget that cover different seeds or variants into
    ``args.results`` (only the variants in ``args.variants``)."""
    parts, runs = read_runs(args.merge_results, "accuracy", args)
    result = summarize(parts[0]["teacher"], runs, args)
    result["machine"] = parts[0]["machine"]
    result["merged_from"] = [os.path.relpath(p, Path(args.results).parent) for p in args.merge_results]
    write_results(Path(args.results), result, markdown)
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(QualityArguments).parse_args_into_dataclasses(argv)
    check_variants(args.variants, VARIANTS)
    if args.merge_results:
        return merge(args)
    work = Path(args.work_dir)
    teacher_dir = work / "teacher"
    demo = DemoArguments(
        output_dir=str(work),
        data_dir=args.data_dir,
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        batch_size=args.batch_size,
    )
    if args.reuse_teacher and (teacher_dir / "all_results.json").exists():
        teacher_acc = json.loads((teacher_dir / "all_results.json").read_text())["test_accuracy"]
    else:
        teacher_acc = run_recipe(teacher_recipe_args(demo, teacher_dir))["test_accuracy"]
    print(f"teacher accuracy {teacher_acc:.4f}")

    def run_one(name: str, seed: int, output_dir: Path) -> dict:
        demo.seed = seed
        extra = list(VARIANTS[name])
        if name == "kd_attn_kl":
            extra += ["--attention_weight", str(args.attention_weight_kl)]
        if name in ("kd_attn_mse", "kd_tinybert"):
            extra += ["--attention_weight", str(args.attention_weight_mse)]
        # every variant starts from the same student (pretrained MiniLM layers), only the loss differs;
        # small_* variants start from the same random 4 x 256 x 4 student instead
        recipe_args = student_recipe_args(demo, teacher_dir, output_dir) + ["--evaluate_teacher", "false"] + extra
        if name.startswith("small_"):
            start = recipe_args.index("--student_teacher_layers")
            recipe_args[start : start + 4] = ["--student_config_overrides", SMALL_STUDENT]
        return {"accuracy": run_recipe(recipe_args)["test_accuracy"]}

    return run_students(
        args.variants,
        args.seeds,
        work,
        run_one,
        lambda runs: summarize(teacher_acc, runs, args),
        Path(args.results),
        markdown,
        done_dir=work / "students",
        key=json.dumps(
            {
                "teacher": teacher_acc,
                **{k: v for k, v in portable_settings(args, ROOT).items() if k not in RUN_SELECTION},
            },
            sort_keys=True,
        ),
    )


if __name__ == "__main__":
    main()
