"""Teachers trained to a plateau, cached by settings and data, resumable across stops.

A quality benchmark is only as good as its teacher: a teacher still far from trained makes every teacher signal
pull the students towards a worse model. :func:`train_teacher` trains in rounds whose step counts double
(``first_steps``, 2x, 4x, ... up to ``max_steps``), evaluates on dev after each round and stops once the last
doubling gained less than ``threshold`` points. The learning-rate schedule must not depend on the total step
count (``constant_with_warmup`` or ``inverse_sqrt`` with an absolute ``--warmup_steps``), so a round simply
continues the previous one from its checkpoint.

Everything survives a stop: the teacher lives in ``work/teacher-<key>`` where ``key`` hashes the settings and
the training files' contents; each round saves checkpoints every ``save_steps`` and a rerun resumes from the
last complete one; finished rounds are kept in ``teacher_curve.json`` and not run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CURVE_FILE",
    "PROVENANCE_FILE",
    "SHIPPED_TEACHERS",
    "fingerprint",
    "last_checkpoint",
    "last_round_metrics",
    "scored_once",
    "shipped_teacher",
    "teacher_summary",
    "teacher_test_scores",
    "train_benchmark_teacher",
    "train_teacher",
]

CURVE_FILE = "teacher_curve.json"
STEP_INDEPENDENT_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt")


def fingerprint(settings: dict, files: Iterable[str | Path]) -> str:
    """12 hex digits naming ``settings`` (JSON-serialisable) and the contents of ``files``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(str(f) for f in files):
        digest.update(Path(path).name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def last_checkpoint(folder: Path) -> Path | None:
    """The ``checkpoint-N`` of ``folder`` with the highest N whose save finished (``trainer_state.json`` readable)."""
    found = []
    for path in folder.glob("checkpoint-*"):
        try:
            step = int(path.name.split("-")[1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, IndexError, OSError, json.JSONDecodeError):
            continue
        found.append((step, path))
    return max(found)[1] if found else None


def _curve_state(teacher_dir: Path) -> dict:
    path = teacher_dir / CURVE_FILE
    return json.loads(path.read_text()) if path.exists() else {"curve": []}


def teacher_summary(state: dict, threshold: float, max_steps: int) -> dict:
    """``teacher_curve`` / ``teacher_converged`` and a sentence saying what the curve shows."""
    curve = state["curve"]
    converged = len(curve) >= 2 and curve[-1][1] - curve[-2][1] < threshold
    gain = curve[-1][1] - curve[-2][1] if len(curve) >= 2 else None
    if converged:
        note = (
            f"converged: the last doubling ({curve[-2][0]} -> {curve[-1][0]} steps) gained {gain:.2f} (< {threshold})"
        )
    elif curve and curve[-1][0] * 2 > max_steps:
        note = (
            f"NOT converged: the budget ({max_steps} steps) ran out while the last doubling still gained {gain:.2f}"
            if gain is not None
            else f"NOT converged: one round only ({curve[-1][0]} steps)"
        )
    else:
        note = "in progress: rerun the same command to continue"
    return {"teacher_curve": curve, "teacher_converged": converged, "teacher_curve_note": note}


def last_round_metrics(teacher_dir: Path) -> tuple[int, dict]:
    """``(steps, eval metrics)`` of the teacher's last round: what the saved model scores on dev."""
    state = _curve_state(teacher_dir)
    if not state["curve"]:
        raise FileNotFoundError(f"{teacher_dir / CURVE_FILE} holds no round: train the teacher first.")
    steps = state["curve"][-1][0]
    if str(steps) not in state.get("metrics", {}):
        raise KeyError(
            f"{teacher_dir / CURVE_FILE} has no metrics for its last round ({steps} steps; recorded by an older "
            "version): remove that round from 'curve' and rerun to evaluate it again."
        )
    return steps, state["metrics"][str(steps)]


def _install(checkpoint: Path, teacher_dir: Path) -> None:
    """Make ``teacher_dir``'s saved model the one of ``checkpoint`` (a run stopped before saving its model)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json"):
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, teacher_dir / name)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def train_teacher(
    run_recipe: Callable[[list[str]], dict],
    recipe_args: list[str],
    *,
    work: Path,
    key: str,
    metric: str,
    first_steps: int,
    max_steps: int,
    save_steps: int,
    evaluate_checkpoint: Callable[[Path], dict],
    threshold: float = 1.0,
    keep_checkpoints: bool = False,
) -> tuple[Path, dict]:
    """Train (or continue) the teacher of ``recipe_args`` to a plateau; returns ``(teacher_dir, summary)``.

    ``evaluate_checkpoint(folder) -> metrics`` evaluates a checkpoint without training (for a run stopped after a
    round's training but before its evaluation). ``recipe_args`` are the recipe's flags without ``--output_dir``,
    ``--max_steps``, the save flags and ``--resume_from_checkpoint``; they must ask for ``--do_eval`` so each round reports ``eval_{metric}``, and
    for a learning-rate schedule that does not depend on the total step count. When the curve ends the
    checkpoints are deleted unless ``keep_checkpoints``; the saved model in ``teacher_dir`` is the last round's.
    """
    joined = " ".join(recipe_args)
    if "--lr_scheduler_type" not in recipe_args or not any(s in joined for s in STEP_INDEPENDENT_SCHEDULES):
        raise ValueError(
            f"Teacher rounds resume with a larger --max_steps: use --lr_scheduler_type one of "
            f"{STEP_INDEPENDENT_SCHEDULES} (with an absolute --warmup_steps)."
        )
    if save_steps <= 0 or first_steps % save_steps:
        raise ValueError(f"save_steps={save_steps} must divide first_steps={first_steps}.")
    teacher_dir = work / f"teacher-{key}"
    teacher_dir.mkdir(parents=True, exist_ok=True)
    state = _curve_state(teacher_dir)
    steps = first_steps
    while True:
        done = {s for s, _ in state["curve"]}
        if steps not in done:
            checkpoint = last_checkpoint(teacher_dir)
            if checkpoint is not None and _step_of(checkpoint) >= steps:
                # stopped after this round's training, before its evaluation: evaluate that checkpoint (resuming a
                # Trainer at exactly max_steps would train one step more)
                metrics = evaluate_checkpoint(checkpoint)
                _install(checkpoint, teacher_dir)
            else:
                resume = ["--resume_from_checkpoint", str(checkpoint)] if checkpoint is not None else []
                metrics = run_recipe(
                    [
                        *recipe_args,
                        "--output_dir",
                        str(teacher_dir),
                        "--max_steps",
                        str(steps),
                        "--save_strategy",
                        "steps",
                        "--save_steps",
                        str(save_steps),
                        "--save_total_limit",
                        "2",
                        *resume,
                    ]
                )
            state["curve"].append([steps, metrics[f"eval_{metric}"]])
            state["curve"].sort()
            state.setdefault("metrics", {})[str(steps)] = {
                k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))
            }
            (teacher_dir / CURVE_FILE).write_text(json.dumps(state, indent=2))
            print(f"teacher after {steps} steps: {metric} {metrics[f'eval_{metric}']:.2f}", flush=True)
        summary = teacher_summary(state, threshold, max_steps)
        if summary["teacher_converged"] or steps * 2 > max_steps:
            break
        steps *= 2
    last = last_checkpoint(teacher_dir)
    for path in teacher_dir.glob("checkpoint-*"):  # an unconverged curve keeps its last one, to be continued
        if not keep_checkpoints and (summary["teacher_converged"] or path != last):
            shutil.rmtree(path, ignore_errors=True)
    state.update(summary)
    (teacher_dir / CURVE_FILE).write_text(json.dumps(state, indent=2))
    return teacher_dir, summary


PROVENANCE_FILE = "provenance.json"
#: Where trained teachers ship, beside the data (``../shared/teachers`` from the project root).
SHIPPED_TEACHERS = Path(__file__).resolve().parents[3] / "shared" / "teachers"


def shipped_teacher(
    args,
    teacher_settings: Callable[[Any], dict],
    files: list[Path],
    student_facing: tuple[str, ...],
    curve_eval_field: str,
) -> dict:
    """The teacher of ``args.teacher_dir``, trained elsewhere and shipped as a model folder with ``provenance.json``
    (the benchmark's cache key of its teacher settings and data) and ``teacher_curve.json`` (its dev curve), taken
    as it is.

    ``args`` is the benchmark's arguments dataclass; ``teacher_settings(args)`` its teacher cache settings, hashed
    with ``files`` (:func:`fingerprint`). The recorded key is recomputed from the teacher's recorded training
    (``provenance["training"]``, its first round, the default ``curve_eval_field``) and this run's
    ``student_facing`` settings (what decides the students' inputs); the teacher is refused unless they give the
    recorded key. When the benchmark's defaults of those settings give it, the error names each differing setting;
    otherwise the data it was trained on differs. Returns ``cache_key``, ``provenance`` and :func:`teacher_summary`
    of its curve (the budget being the steps it was trained for)."""
    folder = Path(args.teacher_dir)
    for name in (PROVENANCE_FILE, CURVE_FILE, "config.json"):
        if not (folder / name).exists():
            raise SystemExit(
                f"--teacher_dir {folder} is not a shipped teacher: {name} is missing (a model folder with "
                f"{PROVENANCE_FILE} and {CURVE_FILE}, as in ../shared/teachers). Pass --teacher_dir '' to train one."
            )
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    defaults = type(args)

    def key_with(settings: dict) -> str:
        training = provenance["training"]
        recorded = dataclasses.replace(
            args,
            teacher_learning_rate=training["learning_rate"],
            batch_size=training["per_device_train_batch_size"],
            teacher_warmup_steps=int(training["warmup_steps"]),
            bf16=training["bf16_autocast"],
            group_by_length=training.get("train_sampling_strategy") == "group_by_length",
            teacher_first_steps=provenance["rounds"][0][0],
            **{curve_eval_field: getattr(defaults, curve_eval_field)},
            **settings,
        )
        return "teacher-" + fingerprint(teacher_settings(recorded), files)

    asked = {k: getattr(args, k) for k in student_facing}
    default = {k: getattr(defaults, k) for k in student_facing}
    recorded = provenance["cache_key"]
    if key_with(asked) != recorded:
        if key_with(default) == recorded:
            differ = ", ".join(f"{k}={default[k]} (this run: {asked[k]})" for k in asked if asked[k] != default[k])
            raise SystemExit(
                f"The teacher in {folder} was trained with {differ}; the students would see other inputs than their "
                "teacher did. Run with the teacher's settings, or pass --teacher_dir '' to train a teacher of your own."
            )
        raise SystemExit(
            f"The teacher in {folder} was trained on other data or settings than this run's ({recorded} recorded in "
            f"its {PROVENANCE_FILE}, {key_with(asked)} here): check --data_dir, or pass --teacher_dir '' "
            "to train a teacher of your own."
        )
    state = json.loads((folder / CURVE_FILE).read_text())
    if not state.get("curve"):
        raise SystemExit(f"{folder / CURVE_FILE} holds no curve: the teacher's training is not recorded.")
    summary = teacher_summary(state, args.converged_gain, state["curve"][-1][0])
    return {"cache_key": recorded, "provenance": provenance, **summary}


def scored_once(record: Path, key: dict, score: Callable[[], dict]) -> dict:
    """``score()`` (a teacher's test metrics, say), computed once for ``key`` and kept in the JSON file ``record``:
    a rerun, or a later sitting, reads it back while the key is the same."""
    kept = json.loads(record.read_text()) if record.exists() else {}
    if kept.get("key") != key:
        kept = {"key": key, **score()}
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(kept, indent=2))
    return kept


def teacher_test_scores(
    run_recipe: Callable[[list[str]], dict],
    folder: Path,
    recipe_args: list[str],
    args,
    key: dict,
    names: tuple[str, ...],
) -> dict:
    """``{name: test_<name>}`` of the teacher in ``folder``, scored by its recipe without training (``--do_predict``
    with ``recipe_args``, in ``args.work_dir``), once for ``key``: kept in ``args.runs_dir/teacher_test.json``."""

    def score() -> dict:
        output_dir = Path(args.work_dir) / "teacher_test"
        metrics = run_recipe(
            ["--training_mode", "finetune", "--teacher_model_name_or_path", str(folder), "--output_dir", str(output_dir),
             "--do_predict", *recipe_args]
        )  # fmt: skip
        shutil.rmtree(output_dir, ignore_errors=True)
        return {name: metrics[f"test_{name}"] for name in names}

    kept = scored_once(Path(args.runs_dir) / "teacher_test.json", key, score)
    return {name: kept[name] for name in names}


def train_benchmark_teacher(
    run_recipe: Callable[[list[str]], dict], args, key: str, metric: str, model_args: list[str], data_args: list[str]
) -> tuple[Path, dict]:
    """The teacher of a quality benchmark trained by its recipe in doubling rounds (:func:`train_teacher`), the one
    flow of every task: ``model_args`` name the model (and recipe-specific flags), ``data_args`` the data and run
    flags shared by training and the evaluation of a checkpoint; ``args`` gives the schedule (``teacher_*``,
    ``batch_size``, ``converged_gain``, ``work_dir``): inverse-sqrt after an absolute warm-up, seed 0."""
    return train_teacher(
        run_recipe,
        [
            "--training_mode", "finetune", *model_args, "--learning_rate", str(args.teacher_learning_rate),
            "--lr_scheduler_type", "inverse_sqrt", "--warmup_steps", str(args.teacher_warmup_steps),
            "--per_device_train_batch_size", str(args.batch_size), "--seed", "0", "--do_train", "--do_eval", *data_args,
        ],
        work=Path(args.work_dir),
        key=key,
        metric=metric,
        first_steps=args.teacher_first_steps,
        max_steps=args.teacher_max_steps,
        save_steps=args.teacher_first_steps // 2,
        threshold=args.converged_gain,
        evaluate_checkpoint=lambda folder: run_recipe(
            ["--training_mode", "finetune", "--teacher_model_name_or_path", str(folder), "--output_dir",
             str(folder / "eval"), "--do_eval", *data_args]
        ),
    )  # fmt: skip
