"""What the quality benchmarks share: checking variant names, the seed-major loop over student runs, mean/std
summaries, writing the JSON + markdown results after every run, and reading result files back to merge runs that
went to different files (one process per seed, variants added later)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from hf_attn_distill.utils.profiling import machine_info

__all__ = [
    "CARD_NAME",
    "RUN_SELECTION",
    "best_run",
    "check_variants",
    "curve_points",
    "runs_done",
    "runs_planned",
    "learning_curve_lines",
    "machines",
    "mean_std",
    "portable_settings",
    "read_runs",
    "readme_table",
    "teacher_curve_line",
    "term_curves",
    "run_students",
    "write_results",
]


def project_commit() -> str | None:
    """The commit of this checkout (``+dirty`` with uncommitted changes to tracked files outside
    ``benchmarks/results``, which the benchmarks themselves rewrite as runs land), ``None`` outside git: recorded
    with each run, so a result says which code made it."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=ROOT)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


ROOT = Path(__file__).resolve().parents[2]


def check_variants(asked: Iterable[str], known: Iterable[str]) -> None:
    """Exit with the choices when a variant name is unknown."""
    unknown = set(asked) - set(known)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {list(known)}.")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def portable_settings(args, root: Path) -> dict:
    """The settings of ``args`` (a dataclass or an ``argparse.Namespace``) with paths under ``root``'s parent
    written relative to ``root``, so committed results hold no machine-specific paths."""

    def portable(value):
        if isinstance(value, list):
            return [portable(v) for v in value]
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(root.parent):
            return os.path.relpath(value, root)
        return value

    settings = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    return {key: portable(value) for key, value in settings.items()}


def write_results(stem: Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """``stem.json`` and ``stem.md`` of ``result``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))


def run_students(
    variants: list[str],
    seeds: list[int],
    work: Path,
    run_one: Callable[[str, int, Path], dict],
    summarize: Callable[[dict[str, list[dict]]], dict],
    stem: Path,
    markdown: Callable[[dict], str],
    done_dir: Path | None = None,
    key: str | Callable[[str], str] = "",
    card_dir: Path | None = None,
    table_variants: Iterable[str] | None = None,
) -> dict:
    """Run ``run_one(variant, seed, output_dir) -> metrics`` for every seed (outer loop: every variant gets a run
    before any gets its second) and variant; after each run record its wall time, machine and commit, delete its
    folder and rewrite the results. Returns the last summary.

    With ``done_dir``, each finished run is kept there as ``{variant}_seed{seed}.json`` together with ``key`` (what
    makes the runs comparable: teacher, settings; a function of the variant where variants depend on different
    settings); a rerun of the same command reuses the runs whose key matches instead of training them again, so a
    benchmark longer than one sitting is finished by running it again. The summary holds every kept run whose key
    matches of the asked variants and of ``table_variants`` (the benchmark's every row), also of seeds this command
    does not ask for: a later ``--seeds 3`` adds to the table of ``--seeds 1 2``, and ``--variants a`` keeps the
    rows of ``b`` in it.

    With ``card_dir``, the model card each run's recipe wrote (``README.md`` of its output folder) is kept with
    its record, and ``card_dir/README.md`` is, after every run, the card of the best run (:func:`best_run`) of the
    results so far, exactly as its recipe wrote it; ``result["card"]`` says which run that is."""
    key_of = key if callable(key) else (lambda name: key)
    runs: dict[str, list[dict]] = {}
    cards: dict[tuple[str, int], str] = {}
    commit = project_commit()  # the code this process runs, recorded with each of its runs

    def read_kept() -> None:
        """Every kept run of the table's variants, whatever seeds this command asks for, read again before each
        table is written: another process of the same benchmark may have kept rows since."""
        for name in dict.fromkeys([*(table_variants or []), *variants]):
            for record in sorted(done_dir.glob(f"{name}_seed*.json")):
                kept = json.loads(record.read_text())
                if record.stem.removeprefix(f"{name}_seed").isdigit() and kept.get("key") == key_of(name):
                    seed = kept["run"]["seed"]
                    if not any(run["seed"] == seed for run in runs.get(name, [])):
                        runs.setdefault(name, []).append(kept["run"])
                    if kept.get("card") is not None:
                        cards.setdefault((name, seed), kept["card"])

    if done_dir is not None:
        read_kept()
    result = summarize(_by_seed(runs))

    def publish() -> None:
        best = best_run(result, set(cards)) if card_dir is not None else None
        if best is not None:
            card_dir.mkdir(parents=True, exist_ok=True)
            (card_dir / CARD_NAME).write_text(cards[best])
            result["card"] = {"variant": best[0], "seed": best[1]}
        write_results(stem, result, markdown)

    for seed in seeds:
        for name in variants:
            if any(run["seed"] == seed for run in runs.get(name, [])):
                print(f"{name} seed {seed}: kept from an earlier sitting", flush=True)
                continue
            output_dir = work / f"{name}_seed{seed}"
            start = time.perf_counter()
            metrics = run_one(name, seed, output_dir)
            wall = time.perf_counter() - start
            run = {**metrics, "seed": seed, "wall_s": wall, "machine": machine_info(), "commit": commit}
            runs.setdefault(name, []).append(run)
            card = output_dir / CARD_NAME
            if card_dir is not None and card.exists():
                cards[name, seed] = card.read_text()
            if done_dir is not None:
                done_dir.mkdir(parents=True, exist_ok=True)
                (done_dir / f"{name}_seed{seed}.json").write_text(
                    json.dumps({"key": key_of(name), "run": run, "card": cards.get((name, seed))}, indent=1)
                )
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            print(f"{name} seed {seed}: {shown} ({wall:.0f} s)", flush=True)
            shutil.rmtree(output_dir, ignore_errors=True)
            if done_dir is not None:
                read_kept()
            result = summarize(_by_seed(runs))
            publish()
    publish()
    print(markdown(result))
    return result


def _by_seed(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    return {name: sorted(items, key=lambda run: run["seed"]) for name, items in runs.items()}


#: The file a recipe writes its model card to, in the student's folder (and in a ``card_dir``).
CARD_NAME = "README.md"


def best_run(result: dict, among: set[tuple[str, int]] | None = None) -> tuple[str, int] | None:
    """``(variant, seed)`` of the best student: the variant with the highest mean and, of its runs (only those in
    ``among``, the runs with a kept card, when given), the one with the highest value (the first seed on a tie).
    ``None`` when there are no students, or none of the best variant's runs is in ``among``."""
    if not result["students"]:
        return None
    name, s = max(result["students"].items(), key=lambda item: item[1]["mean"])
    runs = [(value, -seed) for seed, value in zip(s["seeds"], s["runs"]) if among is None or (name, seed) in among]
    return (name, -max(runs)[1]) if runs else None


#: Settings that say which runs a result file holds or where files went, not how the runs were made.
RUN_SELECTION = (
    "seeds",
    "variants",
    "results",
    "model_card_dir",
    "work_dir",
    "data_dir",
    "reuse_teacher",
    "merge_results",
    "teacher_only",
    "teacher_dir",
    "runs_dir",
)


def read_runs(
    paths: list[str], metric: str, args, mean_keys: tuple[str, ...] = (), own_settings: tuple[str, ...] = ()
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Result files of one benchmark setup back as ``(parts, runs)``; ``runs`` maps each variant to one record
    per seed, ``{"seed", metric, "wall_s", *mean_keys}``, sorted by seed.

    The files must agree on the teacher, student, eval set, machine and every setting but ``RUN_SELECTION``;
    those settings are copied into ``args`` so the merged summary describes the runs, not the merge command.
    Only the variants in ``args.variants`` are kept; ``args.variants`` and ``args.seeds`` become what was read. A
    file keeps only per-variant means of the wall time and of ``mean_keys`` (e.g. ``chrf_mean``); each of its
    runs gets those means, so means over the merged runs are exact. ``own_settings`` are settings that only some
    variants depend on (the general-distillation budget of ``small_general_*``): they are not compared, and are
    taken from the files that have them. Exits when the files disagree or two files hold the same variant and
    seed."""
    parts = [json.loads(Path(p).read_text()) for p in paths]

    def setup(part: dict) -> str:
        settings = {k: v for k, v in part["settings"].items() if k not in RUN_SELECTION + own_settings}
        return json.dumps(
            [part["teacher"], part["student"], part["eval_set"], part["machine"], settings], sort_keys=True
        )

    if len({setup(p) for p in parts}) != 1:
        raise SystemExit(
            "The result files come from different teachers, students, eval sets, machines or settings; "
            "they cannot be merged."
        )
    for part in reversed(parts):  # the first file wins; settings only later files have are taken from them
        for key, value in part["settings"].items():
            if key not in RUN_SELECTION:
                setattr(args, key, value)
    runs: dict[str, list[dict]] = {}
    for path, part in zip(paths, parts):
        for name, s in part["students"].items():
            have = {r["seed"] for r in runs.get(name, [])}
            for seed, value in zip(s["seeds"], s["runs"]):
                if seed in have:
                    raise SystemExit(
                        f"{name} seed {seed} is in more than one file (again in {path}); merge each run once."
                    )
                runs.setdefault(name, []).append(
                    {"seed": seed, metric: value, "wall_s": s["wall_s_mean"], **{k: s[k] for k in mean_keys}}
                )
    runs = {name: sorted(items, key=lambda r: r["seed"]) for name, items in runs.items() if name in args.variants}
    args.variants = list(runs)
    args.seeds = sorted({r["seed"] for items in runs.values() for r in items})
    return parts, runs


def readme_table(
    result: dict,
    scale: float = 1.0,
    unit: str = "",
    labels: dict[str, str] | None = None,
    compared: Callable[[str], bool] = lambda name: True,
) -> str:
    """The README's table of a quality result: the teacher, then every student with its mean, std, seeds,
    retention and gain (points) over ``finetune`` and over ``kd``, the best mean in bold. Values are multiplied by
    ``scale`` (100 for accuracies kept as fractions) and shown with ``unit``; ``labels`` names the variants, in
    the order of the rows (variants it does not name follow);
    variants for which ``compared(name)`` is false (another student architecture) get no gains. A student at or
    above its teacher is flagged: the teacher is then too weak for that row to say anything."""
    labels = labels or {}
    students = result["students"]
    teacher = result["teacher"] * scale
    best = max(students, key=lambda n: students[n]["mean"]) if students else None

    def value(v: float) -> str:
        return f"{v:.2f}{unit}"

    def gain(name: str, base: str) -> str:
        if not compared(name) or base not in students or not compared(base):
            return ""
        return "-" if name == base else f"{(students[name]['mean'] - students[base]['mean']) * scale:+.2f}"

    lines = [
        "| student variant | " + result["metric"] + " | std | seeds | retention | vs `finetune` | vs `kd` |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | {value(teacher)} | | | | | |",
    ]
    flagged = []
    order = [n for n in labels if n in students] + [n for n in students if n not in labels]
    for name in order:
        s = students[name]
        mean = s["mean"] * scale
        shown, retention = value(mean), f"{mean / teacher * 100:.2f}%" if teacher else "-"
        if name == best:
            shown, retention = f"**{shown}**", f"**{retention}**"
        label = labels.get(name, f"`{name}`")
        if mean >= teacher:
            flagged.append(name)
            label += " (at or above the teacher!)"
        seeds = ", ".join(str(seed) for seed in s["seeds"])
        lines.append(
            f"| {label} | {shown} | {s['std'] * scale:.2f} | {seeds} | {retention} | {gain(name, 'finetune')} "
            f"| {gain(name, 'kd')} |"
        )
    if flagged:
        lines += [
            "",
            f"Flagged: {', '.join(f'`{n}`' for n in flagged)} at or above the teacher, so the teacher is too weak "
            "for these rows to show what its signal does.",
        ]
    return "\n".join(lines) + "\n"


def learning_curve_lines(result: dict) -> list[str]:
    """One line per variant with learning curves (``learning_curves``: ``[[step, value], ...]`` per seed): the value
    at each evaluated step, averaged over the seeds; the seeds are named when only some of the variant's runs have a
    curve (``learning_curve_seeds`` against ``seeds``)."""
    lines = []
    for name, s in result["students"].items():
        by_step: dict[int, list[float]] = {}
        for curve in s.get("learning_curves", []):
            for step, bleu in curve:
                by_step.setdefault(step, []).append(bleu)
        if by_step:
            points = ", ".join(f"{step}: {statistics.fmean(v):.2f}" for step, v in sorted(by_step.items()))
            some = s.get("learning_curve_seeds")
            if some is not None and sorted(some) != sorted(s.get("seeds", some)):
                name = f"{name} (seed{'s' if len(some) > 1 else ''} {', '.join(map(str, some))} only)"
            lines.append(f"- {name}: {points}")
    return lines


def machines(runs: dict[str, list[dict]]) -> str:
    """The machines the runs were made on (each run records its own), one per line part; this machine when none
    is recorded yet."""
    found = sorted({r["machine"] for items in runs.values() for r in items if r.get("machine")})
    return "; ".join(found) if found else machine_info()


def curve_points(curve: list) -> str:
    """``[[step, value], ...]`` as ``"500: 63.37, 1,000: 68.38"``."""
    return ", ".join(f"{step:,}: {value:.2f}" for step, value in curve)


def runs_done(result: dict) -> str:
    """The (variant, seed) runs a quality result holds, as ``"3 (`finetune` seeds 1, 2; `kd` seed 1)"``."""
    students = result["students"]
    listed = "; ".join(
        f"`{name}` seed{'s' if len(s['seeds']) > 1 else ''} {', '.join(str(seed) for seed in s['seeds'])}"
        for name, s in students.items()
    )
    return f"{sum(len(s['seeds']) for s in students.values())} ({listed})"


def runs_planned(result: dict, variants: Iterable[str], seeds: Iterable[int]) -> str:
    """The (variant, seed) runs a benchmark plans, as ``"12 planned (4 rows x seeds 1, 2, 3)"``: every row it defines
    (``variants``) or the result holds, times every seed of its plan (``seeds``, its default) or the result holds,
    whatever seeds and rows the command that wrote the result asked for."""
    names = dict.fromkeys([*variants, *result["students"]])
    planned = sorted({*seeds, *(seed for student in result["students"].values() for seed in student["seeds"])})
    listed = ", ".join(str(seed) for seed in planned)
    return f"{len(names) * len(planned)} planned ({len(names)} rows x seeds {listed})"


def teacher_curve_line(result: dict) -> str:
    """One line for a result's markdown: the teacher's dev curve (``step: metric``) and whether it converged."""
    curve = result.get("teacher_curve")
    if not curve:
        return "Teacher curve: none recorded (a fixed-step teacher)"
    points = ", ".join(f"{step}: {value:.2f}" for step, value in curve)
    return f"Teacher curve (dev, steps: {result['metric']}): {points}; {result.get('teacher_curve_note', '')}"


def term_curves(output_dir: Path, prefix: str = "loss_") -> dict[str, list[list[float]]]:
    """What a run logged under names starting with ``prefix``, each as ``[[step, value], ...]``, read from its
    ``trainer_state.json``: by default the per-term training losses (``loss_ce``, ``loss_kd``, ``loss_attn_enc``,
    ...); ``"eval_bleu"`` gives a learning curve. Empty when the run saved no state."""
    path = Path(output_dir) / "trainer_state.json"
    if not path.exists():
        return {}
    curves: dict[str, list[list[float]]] = {}
    for entry in json.loads(path.read_text())["log_history"]:
        for key, value in entry.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                curves.setdefault(key, []).append([entry["step"], value])
    return curves
