#!/usr/bin/env python
"""All three quality benchmarks at full scale on one CUDA GPU, in one command.

    python -m benchmarks.quality.run_gpu                                   # full scale: needs CUDA
    python -m benchmarks.quality.run_gpu --scale tiny --work_dir outputs/gpu_tiny  # the same plan on CPU, a few steps each

Full scale uses the whole training sets (SST-2 train, SQuAD v1.1 train, all 29k Multi30k pairs), the whole
evaluation sets, bf16 autocast and larger batches, one seed per row; results go to ``benchmarks/results/gpu/``
beside the CPU tables (``quality_sst2.json``, ``quality_qa.json``, ``quality_translation.json``). The plan was
sized for about 9 minutes on one H200 from step-time estimates, not from a run: the first run on a GPU writes the
real wall time of each part into ``benchmarks/results/gpu/run_gpu.json``. ``--scale tiny`` runs every part with a
few steps and examples, which is how its logic is tested on CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("sst2", "qa", "translation")

# per task: the benchmark's own flags at each scale (everything else keeps the benchmark's defaults)
PLANS = {
    "full": {
        "sst2": ["--teacher_steps", "2000", "--student_steps", "1000", "--batch_size", "64", "--seeds", "1"],
        "qa": [
            "--train_examples",
            "87599",
            "--eval_examples",
            "10570",
            "--teacher_first_steps",
            "1000",
            "--teacher_max_steps",
            "4000",
            "--student_steps",
            "1500",
            "--batch_size",
            "64",
            "--teacher_learning_rate",
            "2e-4",
            "--student_learning_rate",
            "2e-4",
            "--seeds",
            "1",
        ],
        "translation": [
            "--teacher_first_steps",
            "2000",
            "--teacher_max_steps",
            "8000",
            # the six rows of #18 (not the two cross-attention variants) after the three val runs that tune the
            # attention weight: 9 runs of 1,400 steps, the student steps the plan had before tuning (6 x 2,000)
            "--variants",
            "finetune",
            "kd",
            "seq_kd",
            "kd_attn",
            "kd_attn_self",
            "seq_kd_attn",
            "--student_steps",
            "1400",
            "--batch_size",
            "128",
            "--teacher_learning_rate",
            "3e-4",
            "--seeds",
            "1",
        ],
    },
    "tiny": {
        "sst2": ["--teacher_steps", "2", "--student_steps", "2", "--batch_size", "4", "--seeds", "1"],
        "qa": [
            "--train_examples",
            "16",
            "--eval_examples",
            "8",
            "--teacher_first_steps",
            "2",
            "--teacher_max_steps",
            "2",
            "--student_steps",
            "2",
            "--batch_size",
            "4",
            "--seeds",
            "1",
        ],
        "translation": [
            "--teacher_train_examples",
            "16",
            "--train_examples",
            "16",
            "--val_examples",
            "8",
            "--test_examples",
            "8",
            "--teacher_first_steps",
            "2",
            "--teacher_max_steps",
            "2",
            "--student_steps",
            "2",
            "--batch_size",
            "4",
            "--seeds",
            "1",
        ],
    },
}
TINY_VARIANTS = {"sst2": ["kd"], "qa": ["kd"], "translation": ["kd"]}


def plan(
    scale: str, work_dir: Path, results_dir: Path, tasks=TASKS, teacher_dirs: dict[str, str] | None = None
) -> list[tuple[str, list[str]]]:
    """``[(task, argv of its benchmark's main)]`` for ``scale``. The QA and translation teachers are trained at
    that scale unless ``teacher_dirs`` names a trained one for the task (``--teacher_dir`` of its benchmark); the
    finished runs are kept under ``results_dir/runs``, apart from the CPU runs."""
    out = []
    for task in tasks:
        own = []
        if task in ("qa", "translation"):
            own = ["--teacher_dir", (teacher_dirs or {}).get(task, ""), "--runs_dir", str(results_dir / "runs" / task)]
        argv = [
            *own,
            *PLANS[scale][task],
            "--work_dir",
            str(work_dir / task),
            "--results",
            str(results_dir / f"quality_{task}"),
            # the best student's card goes beside these results, not over the CPU runs' model_cards/
            "--model_card_dir",
            str(results_dir / "cards" / task),
        ]
        if scale == "tiny":
            argv += ["--variants", *TINY_VARIANTS[task]]
        out.append((task, argv))
    return out


def benchmark(task: str):
    """The ``main`` of a task's benchmark module."""
    from benchmarks.quality import qa as quality_qa
    from benchmarks.quality import sst2 as quality_sst2
    from benchmarks.quality import translation as quality_translation

    return {"sst2": quality_sst2.main, "qa": quality_qa.main, "translation": quality_translation.main}[task]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=list(PLANS), default="full")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--work_dir", default="outputs/gpu")
    parser.add_argument("--results_dir", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    parser.add_argument(
        "--qa_teacher_dir", default="", help="A trained QA teacher to take as it is (default: train one at this scale)."
    )
    parser.add_argument(
        "--translation_teacher_dir",
        default="",
        help="A trained translation teacher to take as it is (default: train one at this scale).",
    )
    args = parser.parse_args(argv)
    import torch

    if args.scale == "full" and not torch.cuda.is_available():
        raise SystemExit("--scale full needs a CUDA GPU; --scale tiny runs the same plan on CPU in a few minutes.")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    teachers = {"qa": args.qa_teacher_dir, "translation": args.translation_teacher_dir}
    for task, task_argv in plan(args.scale, Path(args.work_dir), results_dir, args.tasks, teachers):
        started = time.perf_counter()
        benchmark(task)(task_argv)
        timings[task] = time.perf_counter() - started
        print(f"{task}: {timings[task]:.0f} s", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    summary = {"scale": args.scale, "device": device, "wall_s": timings, "total_s": sum(timings.values())}
    (results_dir / "run_gpu.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
