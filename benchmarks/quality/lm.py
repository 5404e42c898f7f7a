#!/usr/bin/env python
"""Quality benchmark for causal LMs: does logit KD (and attention transfer) give a half-depth Llama student a lower
held-out perplexity than plain LM training?

Everything is built here, deterministically, so any sitting can rebuild it:

- **Corpus**: English Wikipedia paragraphs from the shared SQuAD v1.1 files: the unique paragraphs of the 442
  train articles for training, of the 48 disjoint dev articles for held-out perplexity (one paragraph a line).
- **Tokenizer**: byte-level BPE of ``vocab_size`` tokens trained on the training paragraphs; the teacher's
  embedding is padded past it to a multiple of 64 (rows no token reaches, as large LMs pad theirs).
- **Teacher**: a Llama with grouped-query attention (``teacher_layers`` layers, ``teacher_heads`` query and
  ``teacher_kv_heads`` key/value heads), trained from scratch by ``hf-attn-distill lm --training_mode finetune``
  for ``teacher_steps`` steps; its held-out perplexity curve is recorded (converged or not, said).
- **Students**: half its depth, initialised from teacher layers ``student_layers``; rows ``ce`` (plain LM
  training), ``fkl`` / ``rkl`` / ``jsd`` (logit KD with that divergence, + hard labels), ``fkl_attn`` (``fkl`` +
  causal attention KL on every student layer), ``fkl_attn_hidden`` (+ hidden-state MSE) and ``fkl_top64`` /
  ``fkl_top64_uniform`` (``fkl`` from an offline cache of the teacher's top-64 log-probabilities, built once and
  shared by their runs, the tail renormalised or spread: the gap a top-k cache costs); the same steps, data order
  and seeds for every row. The top-k rows also record on the held-out tokens how much of the teacher's
  probability its top-k holds, the forward KL of their trained student against the top-k teacher next to the KL
  against the dense one, and the cache's bytes per token.

Perplexity on every held-out block (``eval_blocks`` for the learning curves). Each finished (variant, seed) run is
kept in ``runs_dir`` (committed), so a rerun of the same command continues where the last stopped; the teacher is
retrained when its folder is gone (its curve and perplexity are kept in ``runs_dir/teacher.json``) and linked as
``work_dir/teacher`` (``--teacher_only true`` stops there: the teacher of ``recipes/configs/wiki_student.yaml``).
Writes ``benchmarks/results/quality_lm.json`` and ``.md``, updated after every run.
"""

from __future__ import annotations

import json
import math
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
    run_students,
    runs_done,
    runs_planned,
    term_curves,
)
from benchmarks.quality.teachers import fingerprint
from hf_attn_distill.recipes.distill_lm import main as run_recipe
from hf_attn_distill.utils.profiling import machine_info

ROOT = Path(__file__).resolve().parents[2]
TOP_K = 64
"""Teacher tokens per position the ``fkl_top64*`` rows keep (an offline top-k cache shared by their runs)."""

PLANNED_SEEDS = (1, 2, 3)  # the seeds every row gets
VARIANTS = {
    "ce": ["--training_mode", "finetune"],
    "fkl": ["--divergence", "forward_kl", "--layer_map", "none"],
    "rkl": ["--divergence", "reverse_kl", "--layer_map", "none"],
    "jsd": ["--divergence", "jsd", "--jsd_beta", "0.5", "--layer_map", "none"],
    "fkl_attn": ["--divergence", "forward_kl", "--layer_map", "uniform", "--attention_weight", "1.0"],
    "fkl_attn_hidden": [
        "--divergence", "forward_kl", "--layer_map", "uniform", "--attention_weight", "1.0",
        "--hidden_weight", "1.0", "--hidden_layer_map", "uniform",
    ],
    "fkl_top64": ["--divergence", "forward_kl", "--layer_map", "none", "--teacher_logits_top_k", str(TOP_K)],
    "fkl_top64_uniform": [
        "--divergence", "forward_kl", "--layer_map", "none", "--teacher_logits_top_k", str(TOP_K),
        "--teacher_logits_tail", "uniform",
    ],
}  # fmt: skip

LABELS = {
    "ce": "`ce` (plain LM training)",
    "fkl": "`fkl` (forward-KL logit KD)",
    "rkl": "`rkl` (reverse KL)",
    "jsd": "`jsd` (generalized JSD, beta 0.5)",
    "fkl_attn": "`fkl_attn` (+ causal attention KL)",
    "fkl_attn_hidden": "`fkl_attn_hidden` (+ hidden-state MSE)",
    "fkl_top64": f"`fkl_top64` (`fkl` from a top-{TOP_K} teacher cache, tail renormalised)",
    "fkl_top64_uniform": f"`fkl_top64_uniform` (`fkl` from a top-{TOP_K} cache, tail spread uniformly)",
}


@dataclass
class QualityLMArguments:
    data_dir: str = field(default="../shared/data/squad", metadata={"help": "SQuAD v1.1 train.json / validation.json."})
    work_dir: str = field(default="outputs/quality_lm", metadata={"help": "Corpus, tokenizer, teacher, run folders."})
    results: str = field(default="benchmarks/results/quality_lm", metadata={"help": "Result stem (.json, .md)."})
    runs_dir: str = field(
        default="benchmarks/results/runs/quality_lm", metadata={"help": "Kept (variant, seed) runs and the teacher."}
    )
    max_paragraphs: int | None = field(
        default=None, metadata={"help": "Use only the first N paragraphs of each split."}
    )
    vocab_size: int = field(default=8100, metadata={"help": "BPE vocabulary size (tokens)."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed block."})
    teacher_layers: int = field(default=6, metadata={"help": "Teacher depth."})
    hidden_size: int = field(default=256, metadata={"help": "Width of teacher and students."})
    intermediate_size: int = field(default=704, metadata={"help": "MLP width."})
    teacher_heads: int = field(default=8, metadata={"help": "Query heads."})
    teacher_kv_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    teacher_steps: int = field(default=1500, metadata={"help": "Teacher training steps."})
    teacher_batch_size: int = field(default=32, metadata={"help": "Teacher blocks per step."})
    teacher_learning_rate: float = field(default=1e-3, metadata={"help": "Teacher peak learning rate."})
    teacher_eval_steps: int = field(default=250, metadata={"help": "Teacher curve: evaluate every N steps."})
    student_layers: str = field(default="1,3,5", metadata={"help": "Teacher layers that initialise the student."})
    student_steps: int = field(default=400, metadata={"help": "Student training steps (every row)."})
    student_batch_size: int = field(default=16, metadata={"help": "Student blocks per step."})
    student_learning_rate: float = field(default=5e-4, metadata={"help": "Student peak learning rate."})
    student_eval_steps: int = field(default=100, metadata={"help": "Student curves: evaluate every N steps."})
    eval_blocks: int = field(default=200, metadata={"help": "Held-out blocks of the learning curves."})
    test_blocks: int | None = field(
        default=None, metadata={"help": "Held-out blocks of the final perplexities (default: all)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Logit-KD temperature."})
    seeds: list[int] = field(default_factory=lambda: list(PLANNED_SEEDS), metadata={"help": "Student seeds."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={"help": "Variants to run."})
    teacher_only: bool = field(
        default=False,
        metadata={
            "help": "Build the corpus, tokenizer and teacher (or find them built), link the teacher as "
            "work_dir/teacher, then stop: what recipes/configs/wiki_student.yaml reads."
        },
    )


def paragraphs(path: Path, limit: int | None) -> list[str]:
    """The unique paragraphs of a SQuAD file, in file order (whitespace collapsed: one paragraph a line)."""
    seen: dict[str, None] = {}
    for article in json.loads(path.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            seen.setdefault(" ".join(paragraph["context"].split()), None)
    return list(seen)[:limit]


def build_corpus(args: QualityLMArguments, work: Path) -> tuple[Path, Path]:
    """``work/data/{train,validation}.txt`` (written once)."""
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in ("train", "validation"):
        target = folder / f"{name}.txt"
        if not target.exists():
            text = "\n".join(paragraphs(Path(args.data_dir) / f"{name}.json", args.max_paragraphs)) + "\n"
            target.with_suffix(".part").write_text(text)
            target.with_suffix(".part").rename(target)
        files.append(target)
    return files[0], files[1]


def build_tokenizer(args: QualityLMArguments, train_file: Path):
    """Byte-level BPE trained on the training paragraphs, ``<|endoftext|>`` its end-of-sequence and padding."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(train_file)], vocab_size=args.vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def teacher_settings(args: QualityLMArguments) -> dict:
    keys = [
        "max_paragraphs", "vocab_size", "block_size", "teacher_layers", "hidden_size", "intermediate_size",
        "teacher_heads", "teacher_kv_heads", "teacher_steps", "teacher_batch_size", "teacher_learning_rate",
        "teacher_eval_steps", "eval_blocks",
    ]  # fmt: skip
    return {"recipe": "lm-teacher-v1", **{k: getattr(args, k) for k in keys}}


def common_args(args: QualityLMArguments, output_dir: Path, seed: int, train: Path, val: Path) -> list[str]:
    return [
        "--train_file", str(train), "--validation_file", str(val), "--block_size", str(args.block_size),
        "--output_dir", str(output_dir), "--seed", str(seed), "--do_train", "--do_eval",
        "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "25", "--print_summary", "false",
        "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05", "--weight_decay", "0.01",
    ]  # fmt: skip


def perplexity_curve(output_dir: Path) -> list[list[float]]:
    """``[[step, held-out perplexity], ...]`` from a run's logged ``eval_loss`` (the model's own cross-entropy:
    students are evaluated without the teacher)."""
    curve = term_curves(output_dir, "eval_loss").get("eval_loss", [])
    return [[step, math.exp(value)] for step, value in curve]


def held_out_metrics(args: QualityLMArguments, model_dir: Path, teacher_dir: Path | None, val: Path) -> dict:
    """:func:`~hf_attn_distill.tasks.lm.lm_metrics` of the model in ``model_dir`` (and the teacher) on the first
    ``test_blocks`` held-out blocks (all by default)."""
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_distill.tasks.lm import LMCollator, lm_metrics, pack_texts

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir or model_dir)
    blocks = pack_texts(val.read_text().splitlines(), tokenizer, args.block_size)[: args.test_blocks]
    examples = [{"input_ids": b, "labels": b} for b in blocks]
    loader = DataLoader(examples, batch_size=16, collate_fn=LMCollator(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir) if teacher_dir is not None else None
    return lm_metrics(model, teacher, loader)


def top_k_fidelity(args: QualityLMArguments, model_dir: Path, teacher_dir: Path, val: Path, k: int) -> dict:
    """On the first ``test_blocks`` held-out blocks, per labelled token: ``teacher_top_k_mass`` (the teacher's
    probability on its ``k`` most likely tokens), ``kl_dense`` (``KL(p_teacher || p_student)``, what a top-k cache
    stands for) and ``kl_top_k_{tail}`` (the loss a top-k cache trains on, :func:`top_k_forward_kl`, each tail), all
    at temperature 1 over the tokenizer's rows."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_distill.tasks.lm import pack_texts
    from hf_attn_distill.terms.divergences import TOP_K_TAILS, top_k_forward_kl

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = len(tokenizer)
    blocks = pack_texts(val.read_text().splitlines(), tokenizer, args.block_size)[: args.test_blocks]
    student = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    sums = {"teacher_top_k_mass": 0.0, "kl_dense": 0.0, **{f"kl_top_k_{tail}": 0.0 for tail in TOP_K_TAILS}}
    tokens = 0
    with torch.inference_mode():
        for block in blocks:
            ids = torch.tensor([block])
            # the last position has no next token in the block: it is no labelled token
            s = student(input_ids=ids).logits[0, :-1, :rows].float()
            t = teacher(input_ids=ids).logits[0, :-1, :rows].float()
            log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
            top = log_t.topk(k, dim=-1)
            sums["teacher_top_k_mass"] += top.values.exp().sum().item()
            sums["kl_dense"] += (log_t.exp() * (log_t - log_s)).sum().item()
            for tail in TOP_K_TAILS:
                sums[f"kl_top_k_{tail}"] += top_k_forward_kl(s, top.indices, top.values, 1.0, tail).sum().item()
            tokens += s.shape[0]
    return {"k": k, "tokens": tokens, **{name: value / tokens for name, value in sums.items()}}


def cache_bytes_per_token(folder: Path) -> float:
    """Bytes on disk of a finished top-k cache (its ``.npy`` arrays) per cached position."""
    import numpy as np

    ids = np.load(folder / "ids.npy", mmap_mode="r")
    return sum(f.stat().st_size for f in folder.glob("*.npy")) / ids.shape[0]


def trained_teacher(args: QualityLMArguments, work: Path, train: Path, val: Path) -> tuple[Path, dict]:
    """The benchmark's teacher: trained here (resuming its checkpoints) unless its folder holds a finished one of
    the same key; ``{perplexity, teacher_curve, teacher_converged, teacher_curve_note, key}``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    key = fingerprint(teacher_settings(args), [train, val])
    folder = work / f"teacher-{key}"
    record = Path(args.runs_dir) / "teacher.json"
    done = folder / "eval_results.json"
    if done.exists() and (folder / "teacher_key.txt").read_text() == key:
        kept = json.loads(record.read_text()) if record.exists() else {}
        return folder, kept if kept.get("key") == key else _teacher_record(args, folder, key, val)
    init = work / f"teacher-init-{key}"
    if not (init / "config.json").exists():
        tokenizer = build_tokenizer(args, train)
        torch.manual_seed(0)
        padded = -(-(len(tokenizer) + 1) // 64) * 64  # past the tokenizer, to a multiple of 64
        eos = tokenizer.eos_token_id
        config = LlamaConfig(
            vocab_size=padded,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_hidden_layers=args.teacher_layers,
            num_attention_heads=args.teacher_heads,
            num_key_value_heads=args.teacher_kv_heads,
            max_position_embeddings=args.block_size,
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=eos,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(init)
        tokenizer.save_pretrained(init)
    resume = any(folder.glob("checkpoint-*"))
    run_recipe(
        [
            "--teacher_model_name_or_path", str(init), "--training_mode", "finetune",
            "--max_steps", str(args.teacher_steps), "--per_device_train_batch_size", str(args.teacher_batch_size),
            "--learning_rate", str(args.teacher_learning_rate), "--eval_strategy", "steps",
            "--eval_steps", str(args.teacher_eval_steps), "--save_strategy", "steps",
            "--save_steps", str(args.teacher_eval_steps), "--save_total_limit", "1",
            "--max_eval_samples", str(args.eval_blocks), "--resume_from_checkpoint", "true" if resume else "false",
            *common_args(args, folder, 0, train, val),
        ]
    )  # fmt: skip
    (folder / "teacher_key.txt").write_text(key)
    summary = _teacher_record(args, folder, key, val)
    kept = json.loads(record.read_text()) if record.exists() else {}
    if kept.get("key") == key:  # retrained in a later sitting: the kept rows were trained against the first one
        summary = same_teacher(kept, summary, record)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(summary, indent=2))
    return folder, summary


TEACHER_RETRAIN_RTOL = 1e-3
"""How far (relative) a retrained teacher's held-out perplexity may be from the recorded one's."""


def same_teacher(kept: dict, retrained: dict, record: Path) -> dict:
    """The kept teacher record, with ``retrained`` (the perplexity and machine of this sitting's retraining) added to
    its ``retrained`` list, when the retraining gave the same teacher (perplexity within
    :data:`TEACHER_RETRAIN_RTOL`; bit-equal on the same kind of CPU); a ``RuntimeError`` naming the fix otherwise,
    since the kept student rows would then have been trained against another teacher."""
    ppl, recorded = retrained["perplexity"], kept["perplexity"]
    if abs(ppl - recorded) > TEACHER_RETRAIN_RTOL * recorded:
        raise RuntimeError(
            f"The teacher retrained in this sitting has held-out perplexity {ppl:.4f}, the one the kept rows were "
            f"trained against {recorded:.4f} (machine: {kept.get('machine')}; this one: {retrained['machine']}): "
            f"the rows would mix teachers. Run on that kind of machine, or move {record.parent} aside to start the "
            "table again with this teacher."
        )
    return {**kept, "retrained": [*kept.get("retrained", []), {k: retrained[k] for k in ("perplexity", "machine")}]}


def _teacher_record(args: QualityLMArguments, folder: Path, key: str, val: Path) -> dict:
    final = held_out_metrics(args, folder, None, val)
    curve = perplexity_curve(folder)
    half = [p for s, p in curve if s <= curve[-1][0] // 2] if curve else []
    drop = (half[-1] - curve[-1][1]) / half[-1] if half else None
    converged = drop is not None and drop < 0.02
    return {
        "key": key,
        "perplexity": final["eval_perplexity"],
        "eval_tokens": final["eval_tokens"],
        "steps": args.teacher_steps,
        "teacher_curve": curve,
        "teacher_converged": converged,
        "teacher_curve_note": (
            f"held-out perplexity on {args.eval_blocks} blocks fell {drop * 100:.1f}% over the last doubling of "
            f"steps: {'converged' if converged else 'not converged'} by the 2% rule"
            if drop is not None
            else "no curve"
        ),
        "machine": machine_info(),
    }


def summarize(teacher: dict, runs: dict[str, list[dict]], args: QualityLMArguments) -> dict:
    students = {}
    for name, items in runs.items():
        values = [r["perplexity"] for r in items]
        mean, std = mean_std(values)
        students[name] = {
            "mean": mean,
            "std": std,
            "runs": values,
            "seeds": [r["seed"] for r in items],
            "kl_to_teacher": statistics.fmean(r["kl_to_teacher"] for r in items if "kl_to_teacher" in r)
            if any("kl_to_teacher" in r for r in items)
            else None,
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in items),
            **(
                {
                    "top_k_fidelity": {
                        key: value
                        if key in ("k", "tokens")
                        else statistics.fmean(r["top_k_fidelity"][key] for r in items)
                        for key, value in items[0]["top_k_fidelity"].items()
                    },
                    "cache_bytes_per_token": items[0]["cache_bytes_per_token"],
                }
                if all("top_k_fidelity" in r for r in items)
                else {}
            ),
            "learning_curves": [r["learning_curve"] for r in items if r.get("learning_curve")],
        }
    return {
        "metric": "perplexity",
        "unit": "held-out perplexity (lower is better)",
        "teacher": teacher["perplexity"],
        **{k: teacher[k] for k in ("teacher_curve", "teacher_converged", "teacher_curve_note", "key") if k in teacher},
        "teacher_retrained": teacher.get("retrained", []),
        "students": students,
        "machine": machines(runs),
        "settings": portable_settings(args, ROOT),
    }


def markdown(result: dict) -> str:
    """The table: teacher, then each row's perplexity, std, seeds and its gain over ``ce`` and ``fkl`` (in
    perplexity points: positive is better)."""
    students = result["students"]
    lines = [
        f"Teacher: held-out perplexity {result['teacher']:.2f} ({result.get('teacher_curve_note', '')})  ",
        f"Machine: {result['machine']}",
        "",
        "| row | perplexity | std | seeds | better than `ce` by | better than `fkl` by | KL to teacher |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {result['teacher']:.2f} | | | | | |",
    ]

    def gain(name: str, base: str) -> str:
        if base not in students or name == base:
            return "-"
        return f"{students[base]['mean'] - students[name]['mean']:+.2f}"

    flagged = []
    for name, s in students.items():
        kl = f"{s['kl_to_teacher']:.4f}" if s.get("kl_to_teacher") is not None else "-"
        seeds = ", ".join(str(x) for x in s["seeds"])
        lines.append(
            f"| {LABELS.get(name, name)} | {s['mean']:.2f} | {s['std']:.2f} | {seeds} | {gain(name, 'ce')} "
            f"| {gain(name, 'fkl')} | {kl} |"
        )
        if s["mean"] <= result["teacher"]:
            flagged.append(name)
    if flagged:
        lines += ["", f"The teacher is not better than {', '.join(flagged)}: these rows measure nothing."]
    top_k = {name: s for name, s in students.items() if "top_k_fidelity" in s}
    if top_k:
        lines += ["", "Top-k teacher caches, on the held-out tokens (per token, mean over seeds):", ""]
        for name, s in top_k.items():
            f = s["top_k_fidelity"]
            tail = "uniform" if name.endswith("uniform") else "renormalize"
            lines.append(
                f"- `{name}`: the teacher's top {f['k']} tokens hold {f['teacher_top_k_mass'] * 100:.2f}% of its "
                f"probability; the trained student's KL to the top-k teacher ({tail} tail) "
                f"{f[f'kl_top_k_{tail}']:.4f} against {f['kl_dense']:.4f} to the dense teacher; cache "
                f"{s['cache_bytes_per_token']:.0f} bytes per token."
            )
    retrained = result.get("teacher_retrained") or []
    if retrained:
        again = ", ".join(f"{r['perplexity']:.4f}" for r in retrained)
        lines += ["", f"The teacher was retrained in later sittings (held-out perplexity {again}): the same teacher."]
    curves = learning_curve_lines(result)
    if curves:
        lines += ["", "Student learning curves (held-out perplexity, mean over seeds):", "", *curves]
    lines += ["", f"Runs: {runs_done(result)}."]
    return "\n".join(lines) + "\n"


KD_ROWS = ("fkl", "rkl", "jsd")  # the logit-only KD rows, whose best the attention rows are set against
ATTENTION_ROWS = ("fkl_attn", "fkl_attn_hidden")


def reading(result: dict) -> str:
    """The targets of the README's LM section in one sentence: the best logit-KD row against ``ce`` and each attention
    row against that best KD row, in perplexity points, each set against the larger of the two seed stds (or "one
    seed" while a side has one run)."""
    students = result["students"]
    kd = [name for name in KD_ROWS if name in students]
    if "ce" not in students or not kd:
        return ""
    best = min(kd, key=lambda name: students[name]["mean"])

    def against(name: str, base: str) -> str:
        gain = students[base]["mean"] - students[name]["mean"]
        if min(len(students[name]["seeds"]), len(students[base]["seeds"])) < 2:
            return f"{gain:+.2f} (one seed on a side: no std yet)"
        std = max(students[name]["std"], students[base]["std"])
        verdict = "more" if abs(gain) > std else "not more"
        return f"{gain:+.2f}, {verdict} than the larger seed std ({std:.2f})"

    parts = [f"the best logit-KD row, `{best}`, against `ce`: {against(best, 'ce')}"]
    parts += [f"`{name}` against `{best}`: {against(name, best)}" for name in ATTENTION_ROWS if name in students]
    return "Targets (gains in perplexity points, positive is better): " + "; ".join(parts) + "."


def readme(result: dict) -> str:
    """The README's LM section of ``result``: corpus, teacher and budget in one paragraph, the table (perplexity:
    lower is better; gains in perplexity points); the runs done so far and the top-k cache's cost in the paragraph."""
    settings, students = result["settings"], result["students"]
    lines = [
        "### Causal LM: half-depth Llama student of a Llama teacher (English Wikipedia paragraphs)",
        "",
        f"Built by the benchmark, deterministically: a byte-level BPE of {settings['vocab_size']:,} tokens on the SQuAD "
        f"train paragraphs (embeddings padded to a multiple of 64, students' as the teacher's: KD over every row), a {settings['teacher_layers']}-layer Llama "
        f"teacher ({settings['hidden_size']} wide, {settings['teacher_heads']} query / {settings['teacher_kv_heads']} "
        f"key-value heads) trained from scratch for {settings['teacher_steps']:,} steps x "
        f"{settings['teacher_batch_size']} blocks of {settings['block_size']} tokens (held-out perplexity by step "
        f"{curve_points(result.get('teacher_curve') or [])}; {result.get('teacher_curve_note', 'no curve')}). "
        f"Students: teacher layers {settings['student_layers']}, {settings['student_steps']} steps x "
        f"{settings['student_batch_size']} blocks, the same data and seeds for every row; perplexity on every "
        "block of the 48 held-out dev articles (lower is better; gains in perplexity points). Rows: "
        + "; ".join(f"{LABELS.get(name, name)}" for name in students)
        + "".join(
            f"; not run yet: {'; '.join(LABELS.get(name, name) for name in waiting)}"
            for waiting in [[name for name in VARIANTS if name not in students]]
            if waiting
        )
        + f". Runs so far: {runs_done(result)} of the {runs_planned(result, VARIANTS, PLANNED_SEEDS)}; machine: "
        f"{result['machine']}. {reading(result)}".rstrip(),
        "",
    ]

    def gain(name: str, base: str) -> str:
        if base not in students or name == base:
            return "-"
        return f"{students[base]['mean'] - students[name]['mean']:+.2f}"

    names = list(students)  # one column a row: the table keeps 5 lines however many rows land
    lines += [
        "| | teacher | " + " | ".join(f"`{name}`" for name in names) + " |",
        "|---|---|" + "---|" * len(names),
        f"| perplexity ± std (seeds) | {result['teacher']:.2f} | "
        + " | ".join(
            f"{students[n]['mean']:.2f} ± {students[n]['std']:.2f} ({', '.join(str(x) for x in students[n]['seeds'])})"
            for n in names
        )
        + " |",
        "| better than `ce` by | | " + " | ".join(gain(n, "ce") for n in names) + " |",
        "| better than `fkl` by | | " + " | ".join(gain(n, "fkl") for n in names) + " |",
    ]
    fidelity = next((st for st in students.values() if "top_k_fidelity" in st), None)
    if fidelity is not None:
        f = fidelity["top_k_fidelity"]
        lines[2] += (
            f" The top-{f['k']} cache: {fidelity['cache_bytes_per_token']:.0f} bytes a token; the teacher's top "
            f"{f['k']} hold {f['teacher_top_k_mass'] * 100:.2f}% of its probability."
        )
        tails = {"fkl_top64": "renormalize", "fkl_top64_uniform": "uniform"}
        gaps = [
            f"`{name}` {students[name]['top_k_fidelity']['kl_dense']:.3f} (its top-{f['k']} loss: "
            f"{students[name]['top_k_fidelity'][f'kl_top_k_{tail}']:.3f})"
            for name, tail in tails.items()
            if "top_k_fidelity" in students.get(name, {})
        ]
        lines[2] += (
            " Loss gap on held-out tokens, KL(dense teacher ‖ student) in nats a token: "
            + "; ".join(gaps)
            + "; in perplexity: the table's last row, against `fkl`, KD from the dense teacher."
        )
    flagged = [name for name, st in students.items() if st["mean"] <= result["teacher"]]
    if flagged:
        lines += ["", f"The teacher is not better than {', '.join(flagged)}: these rows measure nothing."]
    return "\n".join(lines) + "\n"


def student_settings(args: QualityLMArguments) -> dict:
    from benchmarks.quality.runs import portable_settings as settings_of

    return {k: v for k, v in settings_of(args, ROOT).items() if k not in RUN_SELECTION}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(QualityLMArguments).parse_args_into_dataclasses(argv)
    check_variants(args.variants, VARIANTS)
    work = Path(args.work_dir)
    train, val = build_corpus(args, work)
    teacher_dir, teacher = trained_teacher(args, work, train, val)
    print(f"teacher perplexity {teacher['perplexity']:.2f} ({teacher['teacher_curve_note']})", flush=True)
    link = work / "teacher"  # a stable name for the recipe configs: the folder itself is named by its settings
    if link.is_symlink() or not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(teacher_dir.name, target_is_directory=True)
    if args.teacher_only:
        return teacher

    top_k_cache = work / f"teacher-top{TOP_K}-cache-{teacher['key']}"

    def run_one(name: str, seed: int, output_dir: Path) -> dict:
        distill = name != "ce"
        top_k = "--teacher_logits_top_k" in VARIANTS[name]
        run_recipe(
            [
                "--teacher_model_name_or_path", str(teacher_dir), "--student_teacher_layers", args.student_layers,
                "--max_steps", str(args.student_steps), "--per_device_train_batch_size", str(args.student_batch_size),
                "--learning_rate", str(args.student_learning_rate), "--eval_strategy", "steps",
                "--eval_steps", str(args.student_eval_steps), "--save_strategy", "no",
                "--temperature", str(args.temperature),
                *(["--alpha_ce", "0.5", "--alpha_kd", "0.5", "--eval_with_teacher", "false"] if distill else []),
                *common_args(args, output_dir, seed, train, val),
                "--max_eval_samples", str(args.eval_blocks), "--evaluate_teacher", "false",
                *VARIANTS[name],
                *(["--teacher_logits_cache", str(top_k_cache)] if top_k else []),
            ]
        )  # fmt: skip
        final = held_out_metrics(args, output_dir, teacher_dir, val)
        extra = {}
        if top_k:
            extra["top_k_fidelity"] = top_k_fidelity(args, output_dir, teacher_dir, val, TOP_K)
            extra["cache_bytes_per_token"] = cache_bytes_per_token(top_k_cache)
        return {
            "perplexity": final["eval_perplexity"],
            "kl_to_teacher": final["eval_kl_to_teacher"],
            "top1_agreement": final["eval_top1_agreement"],
            "eval_tokens": final["eval_tokens"],
            "learning_curve": perplexity_curve(output_dir),
            **extra,
        }

    return run_students(
        args.variants,
        args.seeds,
        work,
        run_one,
        lambda runs: summarize(teacher, runs, args),
        Path(args.results),
        markdown,
        done_dir=Path(args.runs_dir),
        key=fingerprint({"teacher": teacher["key"], **student_settings(args)}, []),
        table_variants=list(VARIANTS),
    )


if __name__ == "__main__":
    main()
