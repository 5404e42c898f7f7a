#!/usr/bin/env python
"""Does ``group_by_length`` batching cost the translation teacher quality?

``group_by_length`` (``train_sampling_strategy``) batches Multi30k sentences of similar length, so a batch
carries less padding and a teacher step takes fewer FLOPs (``speed/step_time.py`` row ``mt_teacher_fp32_1t_group``).
Before the translation benchmark may use it, its teacher must learn as well per step. This trains the benchmark's
own teacher twice, with the same seed, data and schedule, once with random batches and once grouped by length:
two 1-thread processes at once (what two background runs on 2 cores get), each through
``quality_translation --teacher_only`` (cached and resumable: a rerun continues). Then it reads both teachers'
val BLEU after every doubling round and their BLEU / chrF on ``test_2016_flickr``. Writes
``benchmarks/results/group_by_length_check.json`` and ``.md``. (Its first run found evaluation, not training,
broken: ``Trainer`` evaluated in length-grouped order; see :mod:`hf_attn_distill.training.eval_order`.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from benchmarks.quality.runs import write_results
from benchmarks.quality.translation import QualityTranslationArguments, trained_teacher
from hf_attn_distill.utils.profiling import machine_info

ROOT = Path(__file__).resolve().parents[2]
MODES = {"random": False, "group_by_length": True}


@dataclass
class GroupCheckArguments:
    """Budget and output of the check (every other setting is the translation benchmark's default)."""

    work_dir: str = field(default="outputs/group_by_length_check", metadata={"help": "One teacher folder per mode."})
    results: str = field(
        default=str(ROOT / "benchmarks" / "results" / "group_by_length_check"), metadata={"help": "JSON/MD stem."}
    )
    teacher_max_steps: int = field(default=2000, metadata={"help": "Steps of each teacher (rounds 500, 1000, ...)."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for both teachers."})
    modes: list[str] = field(
        default_factory=lambda: list(MODES),
        metadata={
            "help": "Modes to train now (random, group_by_length); the other mode's row is kept from the result "
            "file already there, marked as an earlier run."
        },
    )
    extra: str = field(
        default="",
        metadata={"help": "More quality_translation flags for both teachers, one string (e.g. a tiny budget)."},
    )


def teacher_argv(args: GroupCheckArguments, mode: str) -> list[str]:
    """The ``quality_translation`` command line of one mode's teacher."""
    return [
        "--teacher_only",
        "true",
        "--teacher_max_steps",
        str(args.teacher_max_steps),
        "--bf16",
        str(args.bf16),
        "--group_by_length",
        str(MODES[mode]),
        "--work_dir",
        str(Path(args.work_dir) / mode),
        "--model_card_dir",
        "",
        *shlex.split(args.extra),
    ]


def markdown(result: dict) -> str:
    steps = sorted({s for run in result["runs"].values() for s, _ in run["teacher_curve"]})
    curves = {mode: dict(run["teacher_curve"]) for mode, run in result["runs"].items()}
    lines = [
        f"Machine: {result['machine']}  ",
        f"Teacher: {result['teacher']}",
        "",
        "| batches | " + " | ".join(f"val BLEU @ {s:,}" for s in steps) + " | test BLEU | test chrF |",
        "|---|" + "---|" * (len(steps) + 2),
    ]
    for mode, run in result["runs"].items():
        cells = [f"{curves[mode][s]:.2f}" if s in curves[mode] else "" for s in steps]
        name = f"{mode} (earlier run)" if run.get("earlier_run") else mode
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {run['bleu']:.2f} | {run['chrf']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(GroupCheckArguments).parse_args_into_dataclasses(argv)
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown or not args.modes:
        raise ValueError(f"--modes {' '.join(args.modes)}: choose among {', '.join(MODES)}.")
    previous = Path(f"{args.results}.json") if args.results else None
    kept = {}
    if set(args.modes) != set(MODES):
        if previous is None or not previous.exists():
            raise FileNotFoundError(f"--modes {' '.join(args.modes)} keeps the other rows of {previous}: not found.")
        kept = {
            mode: {**run, "earlier_run": True}
            for mode, run in json.loads(previous.read_text())["runs"].items()
            if mode not in args.modes
        }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.quality.translation", *teacher_argv(args, mode)], cwd=ROOT, env=env
        )
        for mode in args.modes
    }
    failed = [mode for mode, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"group_by_length_check: the {', '.join(failed)} teacher failed; rerun to continue it.")
    runs = {}
    for mode in args.modes:
        (teacher_args,) = HfArgumentParser(QualityTranslationArguments).parse_args_into_dataclasses(
            teacher_argv(args, mode)
        )
        _, summary = trained_teacher(teacher_args)  # cached by the run above: reads its curve and test scores
        runs[mode] = {k: summary[k] for k in ("bleu", "chrf", "teacher_curve", "teacher_converged")}
    result = {
        "machine": machine_info(),
        "teacher": f"quality_translation's teacher, {args.teacher_max_steps} steps at most, "
        f"{'bf16 autocast' if args.bf16 else 'float32'}, one torch thread each, two at once"
        + (f"; also {args.extra}" if args.extra else ""),
        "runs": {mode: runs[mode] if mode in runs else kept[mode] for mode in MODES if mode in runs or mode in kept},
    }
    if args.results:
        write_results(Path(args.results), result, markdown)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
