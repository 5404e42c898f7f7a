#!/usr/bin/env python
"""Quality benchmark on Multi30k de->en: which distillation helps a smaller encoder-decoder student?

One teacher: an ``EncoderDecoderModel`` whose encoder and decoder start from all-MiniLM-L6-v2 (6 + 6 layers,
cross-attention new), trained on the first ``teacher_train_examples`` pairs of Multi30k train. Then students
with 3 encoder and 3 decoder layers taken from the teacher (layers 1, 3, 5 of each), all with the same data
(the first ``train_examples`` pairs), steps and seeds:

- ``finetune``: fine-tuning without a teacher;
- ``kd``: word-level (token) KD + references;
- ``seq_kd``: sequence-level KD (Kim & Rush 2016) combined with ``kd``: the references are replaced by the
  teacher's translations of the training sources (``sequence_kd_num_beams``; greedy by default, to fit the CPU
  budget);
- ``kd_attn``: ``kd`` + attention KL at every site (encoder self, decoder self, cross);
- ``kd_attn_self``: ``kd`` + encoder and decoder self-attention only (does cross-attention add anything?);
- ``seq_kd_attn``: ``seq_kd`` + attention KL at every site;
- ``kd_attn_cross_last``: ``kd_attn`` with cross-attention transferred at the last decoder layer only (where
  cross-attention is closest to a word alignment), self-attention at every mapped layer;
- ``kd_attn_cross_decay``: ``kd_attn`` with the cross-attention weight decaying linearly to 0 over training (the
  teacher's alignment as a guide early, the student's own later).

Before the test runs, one attention weight (every attention term of every attention variant) is chosen on
``val``: ``kd_attn`` with each weight of ``attention_weight_grid`` (first seed), best val BLEU wins; the test set
is never seen while tuning.

BLEU and chrF (sacrebleu, lower-cased: the MiniLM vocabulary is uncased) of greedy translations of
``test_2016_flickr``. Writes ``benchmarks/results/quality_translation.json`` and ``.md`` after every run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections.abc import Callable
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
    read_runs,
    readme_table,
    run_students,
    runs_done,
    teacher_curve_line,
    term_curves,
    write_results,
)
from benchmarks.quality.teachers import (
    SHIPPED_TEACHERS,
    fingerprint,
    last_round_metrics,
    shipped_teacher,
    teacher_test_scores,
    train_benchmark_teacher,
)
from hf_attn_distill.recipes.distill_translation import main as run_recipe
from hf_attn_distill.utils.hardware import bf16_pays
from hf_attn_distill.utils.pretrained import minilm_path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TEACHER = SHIPPED_TEACHERS / "multi30k-de-en-minilm"
#: Teacher settings that decide what the students see and learn from (token lengths, the teacher's data): a shipped
#: teacher must have been trained with this run's.
STUDENT_FACING = ("teacher_train_examples", "max_source_length", "max_length")

SITES_ALL = ["--layer_map", "uniform", "--decoder_layer_map", "uniform", "--cross_layer_map", "uniform"]
VARIANTS = {
    "finetune": ["--training_mode", "finetune"],
    "kd": ["--layer_map", "none"],
    "seq_kd": ["--layer_map", "none", "--sequence_kd"],
    "kd_attn": SITES_ALL,
    "kd_attn_self": ["--layer_map", "uniform", "--decoder_layer_map", "uniform"],
    "seq_kd_attn": ["--sequence_kd", *SITES_ALL],  # sequence-level KD + attention transfer at every site
    "kd_attn_cross_last": ["--layer_map", "uniform", "--decoder_layer_map", "uniform", "--cross_layer_map", "last"],
    "kd_attn_cross_decay": [*SITES_ALL, "--schedules", "cross_attention_weight=linear:0.0"],
}
#: Variants with an attention term: their attention weight is the one tuned on val.
ATTENTION_VARIANTS = ("kd_attn", "kd_attn_self", "seq_kd_attn", "kd_attn_cross_last", "kd_attn_cross_decay")
#: The variant the attention weight is tuned with.
TUNED_VARIANT = "kd_attn"


@dataclass
class QualityTranslationArguments:
    """Budget and output of the translation quality benchmark."""

    work_dir: str = field(default="outputs/quality_translation", metadata={"help": "Scratch folder for models."})
    results: str = field(
        default=str(ROOT / "benchmarks" / "results" / "quality_translation"), metadata={"help": "JSON/MD path stem."}
    )
    model_card_dir: str = field(
        default=str(ROOT / "model_cards" / "multi30k"),
        metadata={"help": "Where the best student's model card goes, as its recipe wrote it ('' for nowhere)."},
    )
    data_dir: str = field(
        default=str(ROOT.parent / "shared" / "data" / "multi30k"), metadata={"help": "Multi30k folder."}
    )
    teacher_dir: str = field(
        default=str(SHIPPED_TEACHER) if (SHIPPED_TEACHER / "config.json").exists() else "",
        metadata={
            "help": "A trained teacher taken as it is (a model folder with provenance.json and teacher_curve.json); "
            "default: the one shipped in ../shared/teachers when present. '' trains one here to a plateau."
        },
    )
    runs_dir: str = field(
        default=str(ROOT / "benchmarks" / "results" / "runs" / "quality_translation"),
        metadata={
            "help": "Where each finished (variant, seed) run, the attention-weight tuning scores, the teacher's test "
            "scores and its seq_kd translations (compressed) are kept."
        },
    )
    teacher_train_examples: int = field(default=29000, metadata={"help": "First N training pairs of the teacher."})
    train_examples: int = field(
        default=29000,
        metadata={"help": "First N training pairs of every student (and of the teacher's translations for seq_kd)."},
    )
    val_examples: int = field(default=1014, metadata={"help": "First N val pairs: the teacher's curve, weight tuning."})
    test_examples: int = field(default=1000, metadata={"help": "First N test_2016_flickr pairs scored."})
    teacher_first_steps: int = field(
        default=500, metadata={"help": "Steps of the teacher's first round; each further round doubles them."}
    )
    teacher_max_steps: int = field(
        default=16000, metadata={"help": "Most steps the teacher gets: the curve stops here if it has not converged."}
    )
    teacher_warmup_steps: int = field(default=500, metadata={"help": "Teacher warm-up steps (inverse_sqrt after)."})
    converged_gain: float = field(
        default=1.0,
        metadata={"help": "The teacher has converged when its last doubling of steps gained less BLEU than this."},
    )
    student_steps: int = field(default=250, metadata={"help": "Steps per student run (same for every variant)."})
    learning_curve_variants: list[str] = field(
        default_factory=lambda: ["finetune", "kd", "kd_attn", "kd_attn_cross_decay"],
        metadata={
            "help": "Variants whose students are also evaluated on val during training (a learning curve; evaluation "
            "leaves the training unchanged, so a run with a curve is the run without one)."
        },
    )
    learning_curve_points: int = field(
        default=4, metadata={"help": "Evaluations on val during a learning-curve run (every student_steps / N)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Training batch size (sentence pairs)."})
    teacher_learning_rate: float = field(default=1.5e-4, metadata={"help": "Teacher peak learning rate."})
    student_learning_rate: float = field(default=2e-4, metadata={"help": "Student learning rate."})
    encoder_layers: str = field(default="1,3,5", metadata={"help": "Teacher encoder layers kept by the student."})
    decoder_layers: str = field(default="1,3,5", metadata={"help": "Teacher decoder layers kept by the student."})
    max_source_length: int = field(
        default=64,
        metadata={
            "help": "Source tokens (all but 0.1 percent of Multi30k's German sentences fit 65 MiniLM tokens; 5 percent exceed 40)."
        },
    )
    max_length: int = field(
        default=48, metadata={"help": "Target tokens and generation length (every English sentence fits)."}
    )
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
            "help": "Batch sentences of similar length (train_sampling_strategy='group_by_length'), teacher and "
            "students; evaluation stays in dataset order. 1.46x faster teacher steps at the same val BLEU (23.96 vs "
            "24.06 after 1,000 steps; benchmarks/checks/group_by_length.py)."
        },
    )
    attention_weight_grid: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0],
        metadata={
            "help": "Attention weights tried on val before the test runs (kd_attn, first seed, student_steps each); "
            "the best val BLEU sets every attention term's weight in every attention variant. Empty: 1.0, untuned."
        },
    )
    sequence_kd_num_beams: int = field(
        default=1,
        metadata={
            "help": "Beams of the teacher's seq_kd translations of the training sources (greedy by default: 29,000 "
            "beam-4 translations take hours on 2 CPU cores; they are generated once and kept in runs_dir)."
        },
    )
    seeds: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "Student seeds."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run."})

    teacher_only: bool = field(default=False, metadata={"help": "Train (or continue) the teacher, then stop."})
    merge_results: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Instead of training: combine result JSONs of runs with the same teacher and budget that "
            "covered different seeds or variants (e.g. one process per seed); each variant and seed once."
        },
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bf16_pays()


def data_args(args: QualityTranslationArguments, train_examples: int) -> list[str]:
    return [
        "--data_dir",
        args.data_dir,
        "--source_lang",
        "de",
        "--target_lang",
        "en",
        "--evaluate_teacher",
        "false",
        "--max_train_samples",
        str(train_examples),
        "--max_eval_samples",
        str(args.val_examples),
        "--max_predict_samples",
        str(args.test_examples),
        "--max_source_length",
        str(args.max_source_length),
        "--max_target_length",
        str(args.max_length),
        "--per_device_eval_batch_size",
        "64",
        "--predict_with_generate",
        "--generation_max_length",
        str(args.max_length),
        "--generation_num_beams",
        "1",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "true",
        *(["--bf16", "true", "--use_cpu", str(not _cuda())] if args.bf16 else []),
        *(["--train_sampling_strategy", "group_by_length"] if args.group_by_length else []),
    ]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def common_args(
    args: QualityTranslationArguments, output_dir: Path, seed: int, train_examples: int, predict: bool = True
) -> list[str]:
    """Flags of one student (or teacher) training run; ``predict``: score it on the test set at the end."""
    return [
        *data_args(args, train_examples),
        "--output_dir",
        str(output_dir),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--warmup_steps",
        "0.06",
        "--weight_decay",
        "0.01",
        "--logging_steps",
        "50",
        "--save_strategy",
        "no",
        "--seed",
        str(seed),
        "--eval_with_teacher",  # the scores are the student's alone: the teacher's eval losses would cost ~3x
        "false",
        "--do_train",
        *(["--do_predict"] if predict else []),
    ]


def attention_weight_args(weight: float) -> list[str]:
    """Recipe flags giving every attention term (encoder, decoder self, cross) the weight ``weight``."""
    return [item for site in ("", "decoder_", "cross_") for item in (f"--{site}attention_weight", str(weight))]


def tuned_attention_weight(
    args: QualityTranslationArguments, record: Path, tune_one: Callable[[float], float]
) -> tuple[float, dict]:
    """The attention weight of ``args.attention_weight_grid`` whose ``tune_one(weight) -> val BLEU`` is highest
    (ties: the first), and ``{"variant", "seed", "val_bleu": {weight: BLEU}}``. Each weight's score is kept in the
    JSON file ``record`` as soon as it is measured, with the seed it was trained with (``args.seeds[0]`` of the run
    that measured it), so a rerun tunes only the weights it has not scored and reports the seed the scores came
    from, not its own; ``seed`` is a list when they came from several. A run with no attention variant reads a
    finished record (the kept attention runs' key and the table need the weight) and tunes nothing; without a grid,
    or with neither an attention variant nor a finished record: 1.0, untuned."""
    if not args.attention_weight_grid:
        return 1.0, {}
    scores = json.loads(record.read_text()) if record.exists() else {}
    finished = all(str(weight) in scores for weight in args.attention_weight_grid)
    if not set(args.variants) & set(ATTENTION_VARIANTS) and not finished:
        return 1.0, {}
    for weight in args.attention_weight_grid:
        if str(weight) not in scores:
            scores[str(weight)] = {"val_bleu": tune_one(weight), "seed": args.seeds[0]}
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(scores, indent=2))
    tried = {str(w): scores[str(w)] for w in args.attention_weight_grid}
    best = max(args.attention_weight_grid, key=lambda w: tried[str(w)]["val_bleu"])
    seeds = sorted({score["seed"] for score in tried.values()})
    return best, {
        "variant": TUNED_VARIANT,
        "seed": seeds[0] if len(seeds) == 1 else seeds,
        "val_bleu": {w: score["val_bleu"] for w, score in tried.items()},
    }


def learning_curve_args(args: QualityTranslationArguments) -> list[str]:
    """Recipe flags that evaluate a student on val ``learning_curve_points`` times during its training."""
    every = max(1, args.student_steps // max(1, args.learning_curve_points))
    return ["--do_eval", "--eval_strategy", "steps", "--eval_steps", str(every)]


#: Settings that say which runs are also evaluated during training: evaluation leaves training unchanged
#: (:mod:`hf_attn_distill.training.eval_rng`), so they are not part of what a run is.
EVALUATION_ONLY = ("learning_curve_variants", "learning_curve_points")


def student_settings(args) -> dict:
    """What makes student runs comparable, besides the teacher: every setting but which runs, where, and which are
    also evaluated during training."""
    return {
        k: v for k, v in portable_settings(args, ROOT).items() if k not in RUN_SELECTION and k not in EVALUATION_ONLY
    }


def teacher_settings(args: QualityTranslationArguments) -> dict:
    """What makes one teacher: the keys of its cache folder (with the training data's contents)."""
    keys = (
        "teacher_train_examples",
        "val_examples",
        "teacher_first_steps",
        "teacher_warmup_steps",
        "batch_size",
        "teacher_learning_rate",
        "max_source_length",
        "max_length",
        "bf16",
    )
    # group_by_length only when on, so that the keys of teachers trained before it existed stay the same
    keys += ("group_by_length",) if args.group_by_length else ()
    return {"recipe": "translation-teacher-v1", **{k: getattr(args, k) for k in keys}}


def shipped(args: QualityTranslationArguments) -> dict:
    """The teacher of ``--teacher_dir`` checked against this run's settings (a clear exit when they disagree), with
    its recorded curve: ``{cache_key, provenance, teacher_curve, teacher_converged, teacher_curve_note}``."""
    files = [Path(args.data_dir) / f"train.{lang}" for lang in ("de", "en")]
    return shipped_teacher(args, teacher_settings, files, STUDENT_FACING, "val_examples")


def teacher_scores(args: QualityTranslationArguments, folder: Path, name: str) -> dict:
    """``{bleu, chrf}`` of the teacher in ``folder`` (called ``name``) on the test pairs, greedy as the students,
    computed once and kept in ``runs_dir`` (a rerun, or a later sitting, reads them back)."""
    scored = {"teacher": name, "test_examples": args.test_examples, "max_length": args.max_length, "bf16": args.bf16}

    return teacher_test_scores(
        run_recipe, folder, data_args(args, args.teacher_train_examples), args, scored, ("bleu", "chrf")
    )


def trained_teacher(args: QualityTranslationArguments) -> tuple[Path, dict]:
    """The teacher and ``{bleu, chrf, teacher_curve, ...}`` (test scores): the trained one of ``--teacher_dir`` as it
    is, or, without one, a teacher trained here to a plateau (or its step budget)."""
    if args.teacher_dir:
        folder = Path(args.teacher_dir)
        teacher = shipped(args)
        return folder, {**teacher_scores(args, folder, teacher["cache_key"]), **teacher}
    files = [Path(args.data_dir) / f"train.{lang}" for lang in ("de", "en")]
    key = fingerprint(teacher_settings(args), files)
    model_args = ["--teacher_model_name_or_path", minilm_path(), "--build_encoder_decoder"]
    model_args += ["--weight_decay", "0.01", "--logging_steps", "50"]
    teacher_dir, summary = train_benchmark_teacher(
        run_recipe, args, key, "bleu", model_args, data_args(args, args.teacher_train_examples)
    )
    steps, _ = last_round_metrics(teacher_dir)  # a teacher continued later is scored again
    return teacher_dir, {**teacher_scores(args, teacher_dir, f"{teacher_dir.name}-{steps}"), **summary}


def summarize(teacher: dict, runs: dict[str, list[dict]], args: QualityTranslationArguments) -> dict:
    students = {}
    for name, items in runs.items():
        bleus = [r["bleu"] for r in items]
        mean, std = mean_std(bleus)
        students[name] = {
            "mean": mean,
            "std": std,
            "runs": bleus,
            "chrf_mean": statistics.fmean(r["chrf"] for r in items),
            "seeds": [r["seed"] for r in items],
            "retention": mean / teacher["bleu"] if teacher["bleu"] else None,
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in items),
            # per seed: each logged term's training loss, [[step, value], ...] (not kept by --merge_results)
            "term_curves": [r["term_curves"] for r in items if "term_curves" in r],
            # per seed: val BLEU during training, [[step, BLEU], ...] (learning_curve_variants only)
            "learning_curves": [r["learning_curve"] for r in items if "learning_curve" in r],
            "learning_curve_seeds": [r["seed"] for r in items if "learning_curve" in r],
        }
    return {
        "metric": "bleu",
        "unit": "BLEU (sacrebleu 13a)",
        "casing": "lower-cased (the MiniLM vocabulary is uncased)",
        "eval_set": f"Multi30k test_2016_flickr, first {args.test_examples} pairs, greedy decoding",
        "teacher": teacher["bleu"],
        "teacher_chrf": teacher["chrf"],
        "teacher_model": f"EncoderDecoderModel from all-MiniLM-L6-v2 (6+6 layers), "
        f"{teacher['teacher_curve'][-1][0] if teacher.get('teacher_curve') else '?'} steps on "
        f"the first {args.teacher_train_examples} training pairs"
        + (f" (shipped: {teacher['cache_key']})" if "cache_key" in teacher else ""),
        **{k: teacher[k] for k in ("teacher_curve", "teacher_converged", "teacher_curve_note") if k in teacher},
        "student": f"3+3 layers (encoder {args.encoder_layers}, decoder {args.decoder_layers} of the teacher), "
        f"{args.student_steps} steps of {args.batch_size} on the first {args.train_examples} pairs",
        "students": students,
        "machine": machines(runs),
        "settings": portable_settings(args, ROOT),
    }


def attention_site_lines(result: dict) -> list[str]:
    """One line per variant with attention terms: each site's logged training loss, first -> last value, averaged
    over the seeds that logged it (how far transfer got at each site: encoder, decoder self, cross)."""
    lines = []
    for name, s in result["students"].items():
        per_site: dict[str, list[tuple[float, float]]] = {}
        for curves in s.get("term_curves", []):
            for term, points in curves.items():
                if term.startswith("loss_attn") and points:
                    per_site.setdefault(term, []).append((points[0][1], points[-1][1]))
        if per_site:
            shown = "; ".join(
                f"{term.removeprefix('loss_attn_')} {statistics.fmean(a for a, _ in v):.4g} -> "
                f"{statistics.fmean(b for _, b in v):.4g}"
                for term, v in sorted(per_site.items())
            )
            lines.append(f"- {name}: {shown}")
    return lines


def attention_weight_line(result: dict) -> str:
    """How the attention variants' weight was chosen: on val, by weight, or not at all."""
    tuning = result.get("attention_weight_tuning")
    if not tuning:
        return f"Attention weight: {result.get('attention_weight', 1.0)} (not tuned)"
    tried = ", ".join(f"{w}: {b:.2f}" for w, b in tuning["val_bleu"].items())
    return (
        f"Attention weight: {result['attention_weight']} for every attention term, chosen on val "
        f"({tuning['variant']}, seed{'s' if isinstance(tuning['seed'], list) else ''} "
        f"{', '.join(map(str, tuning['seed'])) if isinstance(tuning['seed'], list) else tuning['seed']}; "
        f"val BLEU by weight: {tried})"
    )


LABELS = {
    "finetune": "`finetune` (no teacher)",
    "kd": "`kd` (word-level KD)",
    "seq_kd": "`seq_kd` (+ the teacher's translations as targets)",
    "kd_attn": "`kd_attn` (+ attention KL at every site)",
    "kd_attn_self": "`kd_attn_self` (+ encoder and decoder self-attention only)",
    "seq_kd_attn": "`seq_kd_attn` (`seq_kd` + attention at every site)",
    "kd_attn_cross_last": "`kd_attn_cross_last` (cross-attention at the last layer only)",
    "kd_attn_cross_decay": "`kd_attn_cross_decay` (cross-attention weight decaying to 0)",
}


def readme(result: dict) -> str:
    """The README's translation section of ``result``: teacher and budget in one line, the table, the runs so far."""
    settings = result["settings"]
    curve, runs = curve_points(result["teacher_curve"]), runs_done(result)
    lines = [
        "### Multi30k de→en: 3+3-layer student of the shipped MiniLM encoder-decoder",
        "",
        f"Teacher: `EncoderDecoderModel` of two all-MiniLM-L6-v2, {result['teacher_curve'][-1][0]:,} steps x 32 pairs "
        f"on the {settings['teacher_train_examples']:,} training pairs; val BLEU by step {curve} "
        f"({result['teacher_curve_note']}). Students: encoder layers {settings['encoder_layers']} and decoder "
        f"layers {settings['decoder_layers']} of the teacher, {settings['student_steps']} steps x "
        f"{settings['batch_size']} pairs, the same data and seeds for every row; {attention_weight_line(result)[0].lower() + attention_weight_line(result)[1:]}. "
        f"Lower-cased BLEU of greedy translations of all {settings['test_examples']:,} `test_2016_flickr` pairs "
        f"(teacher: {result['teacher']:.2f} BLEU, {result['teacher_chrf']:.2f} chrF).",
        "",
        readme_table({**result, "metric": "BLEU"}, labels=LABELS).rstrip("\n"),
        "",
        f"Runs so far: {runs}; machine: {result['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    lines = [
        f"Teacher: BLEU {result['teacher']:.2f}, chrF {result['teacher_chrf']:.2f} ({result['casing']})  ",
        f"Teacher model: {result['teacher_model']}  ",
        f"Students: {result['student']}  ",
        f"Eval set: {result['eval_set']}  ",
        f"{teacher_curve_line(result)}  ",
        f"{attention_weight_line(result)}  ",
        f"Machine: {result['machine']}",
        "",
        "| student variant | BLEU mean | std | BLEU runs | chrF mean | retention | wall time / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in result["students"].items():
        runs = ", ".join(f"{b:.2f}" for b in s["runs"])
        retention = "-" if s["retention"] is None else f"{s['retention'] * 100:.1f}%"
        lines.append(
            f"| {name} | {s['mean']:.2f} | {s['std']:.2f} | {runs} | {s['chrf_mean']:.2f} | {retention} | "
            f"{s['wall_s_mean']:.0f} s |"
        )
    lines += ["", "Against the teacher and the baselines:", "", readme_table(result).rstrip("\n")]
    curves = learning_curve_lines(result)
    if curves:
        lines += ["", "Student learning curves (val BLEU during training, mean over seeds, step: BLEU):", ""]
        lines += curves
    sites = attention_site_lines(result)
    if sites:
        lines += ["", "Attention loss per site during training (first -> last logged value, mean over seeds):", ""]
        lines += sites
    return "\n".join(lines) + "\n"


def merge(args: QualityTranslationArguments) -> dict:
    """Combine result files of the same teacher and settings that cover different seeds or variants into
    ``args.results`` (only the variants in ``args.variants``)."""
    parts, runs = read_runs(args.merge_results, "bleu", args, ("chrf_mean",))
    for items in runs.values():
        for r in items:
            r["chrf"] = r.pop("chrf_mean")
    teacher = {"bleu": parts[0]["teacher"], "chrf": parts[0]["teacher_chrf"]}
    result = summarize(teacher, runs, args)
    result["machine"] = parts[0]["machine"]
    result["merged_from"] = [os.path.relpath(p, Path(args.results).parent) for p in args.merge_results]
    write_results(Path(args.results), result, markdown)
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(QualityTranslationArguments).parse_args_into_dataclasses(argv)
    check_variants(args.variants, VARIANTS)
    check_variants(args.learning_curve_variants, VARIANTS)
    if args.merge_results:
        return merge(args)
    work = Path(args.work_dir)
    teacher_dir, teacher = trained_teacher(args)
    print(
        f"teacher BLEU {teacher['bleu']:.2f} chrF {teacher['chrf']:.2f} ({teacher['teacher_curve_note']})", flush=True
    )
    if args.teacher_only:
        return teacher

    def student_argv(name: str, seed: int, output_dir: Path, weight: float, predict: bool = True) -> list[str]:
        return [
            "--training_mode",
            "distill",
            "--teacher_model_name_or_path",
            str(teacher_dir),
            "--student_teacher_layers",
            args.encoder_layers,
            "--student_decoder_layers",
            args.decoder_layers,
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
            "--sequence_kd_cache_dir",
            str(Path(args.runs_dir) / "seq_kd_translations"),
            "--sequence_kd_num_beams",
            str(args.sequence_kd_num_beams),
            *common_args(args, output_dir, seed, args.train_examples, predict=predict),
            *VARIANTS[name],
            *(attention_weight_args(weight) if name in ATTENTION_VARIANTS else []),
        ]

    def tune_one(weight: float) -> float:
        output_dir = work / f"tune_{TUNED_VARIANT}_w{weight}"
        metrics = run_recipe([*student_argv(TUNED_VARIANT, args.seeds[0], output_dir, weight, False), "--do_eval"])
        shutil.rmtree(output_dir, ignore_errors=True)
        return metrics["eval_bleu"]

    settings_key = {"teacher": teacher.get("cache_key", teacher_dir.name), **student_settings(args)}
    tuning_key = fingerprint({k: v for k, v in settings_key.items() if k != "attention_weight_grid"}, [])
    weight, tuning = tuned_attention_weight(args, Path(args.runs_dir) / "tuning" / f"{tuning_key}.json", tune_one)
    if tuning:
        print(f"attention weight {weight} (val BLEU by weight: {tuning['val_bleu']})", flush=True)

    def run_one(name: str, seed: int, output_dir: Path) -> dict:
        argv = student_argv(name, seed, output_dir, weight)
        metrics = run_recipe([*argv, *(learning_curve_args(args) if name in args.learning_curve_variants else [])])
        run = {"bleu": metrics["test_bleu"], "chrf": metrics["test_chrf"], "term_curves": term_curves(output_dir)}
        if name in args.learning_curve_variants:
            run["learning_curve"] = term_curves(output_dir, "eval_bleu").get("eval_bleu", [])
        return run

    def key(name: str) -> str:  # attention runs depend on the tuned weight too
        return fingerprint({**settings_key, **({"attention_weight": weight} if name in ATTENTION_VARIANTS else {})}, [])

    return run_students(
        args.variants,
        args.seeds,
        work,
        run_one,
        lambda runs: {
            **summarize(teacher, runs, args),
            "attention_weight": weight,
            **({"attention_weight_tuning": tuning} if tuning else {}),
        },
        Path(args.results),
        markdown,
        done_dir=Path(args.runs_dir),
        key=key,
        card_dir=Path(args.model_card_dir) if args.model_card_dir else None,
        table_variants=list(VARIANTS),
    )


if __name__ == "__main__":
    main()
