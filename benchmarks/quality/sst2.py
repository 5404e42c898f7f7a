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
- ``small_general_kd``: the same narrow student, first general-distilled (task-agnostic, MiniLMv2 relations)
  from the pretrained all-MiniLM-L6-v2 on unlabeled text we have (SST-2 train sentences, SQuAD train contexts,
  Multi30k train English; never the evaluation sentences), then trained as ``small_kd``;
- not run by default: ``small_kd_hidden`` (the narrow student with hidden-state MSE through the projection) and
  ``small_minilmv2_h16`` / ``_decay`` / ``_mid`` (other MiniLMv2 settings for it).

Accuracy is measured on the 872-sentence GLUE dev set (``test.tsv``). Writes
``benchmarks/results/quality_sst2.json`` and ``.md``, updated after every run; ``--merge_results`` combines
files of separate runs. CPU by default (a student run takes 6-10 minutes on one core of a 2-core AMD EPYC, so
the defaults take several hours); CUDA is used when present.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from benchmarks.quality.runs import (
    RUN_SELECTION,
    check_variants,
    mean_std,
    portable_settings,
    read_runs,
    readme_table,
    run_students,
    write_results,
)
from hf_attn_distill.recipes.distill_classification import main as run_recipe
from hf_attn_distill.recipes.distill_general import main as run_general
from hf_attn_distill.recipes.sst2_setup import DemoArguments, student_recipe_args, teacher_recipe_args
from hf_attn_distill.training.checkpoints import last_complete_checkpoint
from hf_attn_distill.utils.pretrained import minilm_path
from hf_attn_distill.utils.profiling import machine_info

ROOT = Path(__file__).resolve().parents[2]

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
    # small_kd's objective, starting from the general-distilled narrow student
    "small_general_kd": ["--attention_weight", "0"],
}
GENERAL_VARIANTS = ("small_general_kd",)  # start from the general-distilled student (general_* settings)
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
    model_card_dir: str = field(
        default=str(ROOT / "model_cards" / "sst2"),
        metadata={"help": "Where the best student's model card goes, as its recipe wrote it ('' for nowhere)."},
    )
    data_dir: str = field(default=str(ROOT.parent / "shared" / "data" / "sst2"), metadata={"help": "SST-2 folder."})
    teacher_steps: int = field(default=1000, metadata={"help": "Teacher fine-tuning steps."})
    student_steps: int = field(default=500, metadata={"help": "Steps per student run (same for every variant)."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3], metadata={"help": "Student seeds."})
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS), metadata={"help": "Variants to run."})
    attention_weight_kl: float = field(default=1.0, metadata={"help": "Attention weight of kd_attn_kl."})
    attention_weight_mse: float = field(
        default=0.2, metadata={"help": "Attention weight of kd_attn_mse (score MSE starts ~5x the KL; 0.2 evens them)."}
    )
    reuse_teacher: bool = field(
        default=True, metadata={"help": "Reuse work_dir/teacher if it exists and its test accuracy was recorded."}
    )
    general_steps: int = field(default=1200, metadata={"help": "Steps of general distillation (small_general_*)."})
    general_batch_size: int = field(default=32, metadata={"help": "Batch of general distillation (128-token blocks)."})
    general_learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of general distillation."})
    general_max_seq_length: int = field(default=128, metadata={"help": "Tokens per packed general-distillation block."})
    general_relation_heads: int = field(
        default=16, metadata={"help": "Relation heads of general distillation (MiniLMv2 uses more than the model's)."}
    )
    merge_results: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instead of training: combine result JSONs of runs with the same teacher and budget that "
            "covered different seeds or variants (e.g. one process per seed); each variant and seed once."
        },
    )


GENERAL_FIELDS = (
    "general_steps",
    "general_batch_size",
    "general_learning_rate",
    "general_max_seq_length",
    "general_relation_heads",
)


def general_corpus(data_root: Path, out: Path) -> Path:
    """One document per line: SST-2 train sentences, SQuAD train contexts (each once), Multi30k train English.
    Written under ``out`` (the work folder), never into the repository."""
    path = out / "corpus.txt"
    if path.exists():
        return path
    with open(data_root / "sst2" / "train.tsv", newline="") as f:
        lines = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    squad = json.loads((data_root / "squad" / "train.json").read_text())
    contexts = [p["context"] for article in squad["data"] for p in article["paragraphs"]]
    lines += list(dict.fromkeys(contexts))
    lines += (data_root / "multi30k" / "train.en").read_text().splitlines()
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(line.split()) for line in lines if line.strip()) + "\n")
    return path


def general_student(args: QualityArguments, work: Path) -> tuple[Path, dict]:
    """The general-distilled narrow student (trained once, resumed across sittings) and what it cost."""
    settings = {k: getattr(args, k) for k in GENERAL_FIELDS}
    folder = work / ("general-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12])
    cost_file = folder / "general_cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.exists() else {"wall_s": 0.0}
    if not (folder / "all_results.json").exists():
        corpus = general_corpus(Path(args.data_dir).resolve().parent, work)
        started = time.perf_counter()
        run_general(
            [
                "--teacher_model_name_or_path",
                minilm_path(),
                "--student_config_overrides",
                SMALL_STUDENT,
                "--train_file",
                str(corpus),
                "--max_seq_length",
                str(args.general_max_seq_length),
                "--relation_weight",
                "1.0",
                "--relation_kinds",
                "qq,kk,vv",
                "--relation_heads",
                str(args.general_relation_heads),
                "--max_steps",
                str(args.general_steps),
                "--per_device_train_batch_size",
                str(args.general_batch_size),
                "--learning_rate",
                str(args.general_learning_rate),
                "--warmup_steps",
                str(max(1, args.general_steps // 20)),
                "--weight_decay",
                "0.01",
                "--bf16",
                str(not torch.cuda.is_available()).lower(),
                "--use_cpu",
                str(not torch.cuda.is_available()).lower(),
                "--logging_steps",
                "50",
                "--save_steps",
                "250",
                "--save_total_limit",
                "2",
                "--seed",
                "0",
                "--report_to",
                "none",
                "--disable_tqdm",
                "true",
                "--output_dir",
                str(folder),
                "--resume_from_checkpoint",
                "true" if last_complete_checkpoint(folder) is not None else "false",
                "--do_train",
                "--print_summary",
                "false",
            ]
        )
        cost["wall_s"] += time.perf_counter() - started
        cost_file.write_text(json.dumps(cost))
    blocks = json.loads((folder / "trainer_state.json").read_text())
    cost.update(
        steps=args.general_steps,
        batch=args.general_batch_size,
        tokens_per_block=args.general_max_seq_length,
        text="SST-2 train sentences, SQuAD v1.1 train contexts, Multi30k train English (shared/data)",
        objective="MiniLMv2 q/k/v relations, last layers, "
        f"{args.general_relation_heads} relation heads; teacher all-MiniLM-L6-v2 (pretrained, not fine-tuned)",
        final_train_loss=blocks["log_history"][-1].get("train_loss"),
    )
    return folder, cost


def summarize(teacher_acc: float, runs: dict[str, list[dict]], args: QualityArguments, general=None) -> dict:
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
        **({"general_distillation": general} if general else {}),
    }


#: How the README names each variant, in the README's order.
LABELS = {
    "finetune": "`finetune` (no teacher)",
    "kd": "`kd` (logit KD)",
    "kd_attn_kl": "`kd_attn_kl` (+ MiniLM attention KL)",
    "kd_attn_mse": "`kd_attn_mse` (+ TinyBERT attention-score MSE, weight 0.2)",
    "kd_hidden": "`kd_hidden` (+ hidden-state MSE)",
    "kd_attn_hidden": "`kd_attn_hidden` (+ attention KL + hidden-state MSE)",
    "kd_tinybert": "`kd_tinybert` (+ attention-score MSE + hidden-state MSE)",
    "kd_value_relation": "`kd_value_relation` (+ MiniLM value relation)",
    "kd_minilmv2": "`kd_minilmv2` (+ MiniLMv2 Q/K/V relations)",
    "small_kd": "`small_kd`",
    "small_minilmv2": "`small_minilmv2`",
    "small_general_kd": "`small_general_kd` (general-distilled first, then `small_kd`)",
}


def readme(result: dict) -> str:
    """The README's SST-2 section of ``result``: the teacher and students as trained, the table (``small_*`` rows
    are another student: no gains over the 3-layer ``finetune``/``kd``) and what attention transfer adds over logit
    KD, against the larger seed std of the two rows."""
    settings, students = result["settings"], result["students"]
    head = (
        f"Teacher {result['teacher'] * 100:.2f}% ({settings['teacher_steps']} steps, {result['teacher_model']}). "
        f"Students: {settings['student_steps']} steps at batch {settings['batch_size']}, accuracy on "
        f"{result['eval_set'].split(',')[0]}); {result['student']}; {result['small_student']}.\n\n"
    )
    table = readme_table(result, 100, "%", LABELS, compared=lambda name: not name.startswith("small_"))
    rows = {"KL": "kd_attn_kl", "MSE": "kd_attn_mse"}
    if "kd" not in students or any(name not in students for name in rows.values()):
        return head + table
    kd = students["kd"]
    gains = {kind: (students[name]["mean"] - kd["mean"]) * 100 for kind, name in rows.items()}
    stds = [max(students[name]["std"], kd["std"]) * 100 for name in rows.values()]
    times = sorted(gain / std for gain, std in zip(gains.values(), stds))
    best = max((n for n in students if not n.startswith("small_")), key=lambda n: students[n]["mean"])
    reading = (
        f"\nAttention transfer adds {gains['KL']:.1f} (KL) to {gains['MSE']:.1f} (MSE) points over logit KD, "
        f"{times[0]:.1f}-{times[-1]:.1f} times the larger seed std; the best row, `{best}`, keeps "
        f"{students[best]['mean'] / result['teacher'] * 100:.1f}% of the teacher.\n"
    )
    return head + table + reading


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
    general = result.get("general_distillation")
    if general:
        lines += [
            "",
            f"small_general_* students were first general-distilled once: {general['steps']} steps of "
            f"{general['batch']} blocks x {general['tokens_per_block']} tokens ({general['objective']}; text: "
            f"{general['text']}), {general['wall_s'] / 60:.0f} min on this machine, not counted in the wall time "
            "per run above.",
        ]
    return "\n".join(lines) + "\n"


def merge(args: QualityArguments) -> dict:
    """Combine result files of the same teacher and budget that cover different seeds or variants into
    ``args.results`` (only the variants in ``args.variants``)."""
    parts, runs = read_runs(args.merge_results, "accuracy", args, own_settings=GENERAL_FIELDS)
    general = next((p["general_distillation"] for p in parts if "general_distillation" in p), None)
    general = general if any(name in GENERAL_VARIANTS for name in runs) else None
    result = summarize(parts[0]["teacher"], runs, args, general)
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
    teacher_acc = None
    if args.reuse_teacher and (teacher_dir / "all_results.json").exists():
        # the recipe writes all_results.json after training and again after the test evaluation: a teacher stopped
        # in between has no accuracy yet and is trained again
        teacher_acc = json.loads((teacher_dir / "all_results.json").read_text()).get("test_accuracy")
    if teacher_acc is None:
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
        if name in GENERAL_VARIANTS:
            start = recipe_args.index("--student_teacher_layers")
            recipe_args[start : start + 4] = ["--student_model_name_or_path", str(general_dir)]
        elif name.startswith("small_"):
            start = recipe_args.index("--student_teacher_layers")
            recipe_args[start : start + 4] = ["--student_config_overrides", SMALL_STUDENT]
        return {"accuracy": run_recipe(recipe_args)["test_accuracy"]}

    general_dir, general = None, None
    if any(name in GENERAL_VARIANTS for name in args.variants):
        general_dir, general = general_student(args, work)

    def key(name: str) -> str:
        settings = portable_settings(args, ROOT)
        own = {k: v for k, v in settings.items() if k not in RUN_SELECTION and k not in GENERAL_FIELDS}
        if name in GENERAL_VARIANTS:
            own.update({k: settings[k] for k in GENERAL_FIELDS})
        return json.dumps({"teacher": teacher_acc, **own}, sort_keys=True)

    return run_students(
        args.variants,
        args.seeds,
        work,
        run_one,
        lambda runs: summarize(teacher_acc, runs, args, general),
        Path(args.results),
        markdown,
        done_dir=work / "students",
        key=key,
        card_dir=Path(args.model_card_dir) if args.model_card_dir else None,
    )


if __name__ == "__main__":
    main()
