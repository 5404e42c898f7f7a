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

__all__ = [
    "RUN_SELECTION",
    "check_variants",
    "mean_std",
    "portable_settings",
    "read_runs",
    "run_students",
    "write_results",
]


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
) -> dict:
    """Run ``run_one(variant, seed, output_dir) -> metrics`` for every seed (outer loop: every variant gets a run
    before any gets its second) and variant; after each run record its wall time, delete its folder and
    rewrite the results. Returns the last summary.

    With ``done_dir``, each finished run is kept there as ``{variant}_seed{seed}.json`` together with ``key`` (what
    makes the runs comparable: teacher, settings; a function of the variant where variants depend on different
    settings); a rerun of the same command reuses the runs whose key matches instead of training them again, so a
    benchmark longer than one sitting is finished by running it again."""
    key_of = key if callable(key) else (lambda name: key)
    runs: dict[str, list[dict]] = {}
    result = summarize(runs)
    for seed in seeds:
        for name in variants:
            record = done_dir / f"{name}_seed{seed}.json" if done_dir is not None else None
            if record is not None and record.exists() and json.loads(record.read_text()).get("key") == key_of(name):
                kept = json.loads(record.read_text())
                runs.setdefault(name, []).append(kept["run"])
                print(f"{name} seed {seed}: kept from an earlier sitting", flush=True)
                result = summarize(runs)
                write_results(stem, result, markdown)
                continue
            output_dir = work / f"{name}_seed{seed}"
            start = time.perf_counter()
            metrics = run_one(name, seed, output_dir)
            wall = time.perf_counter() - start
            run = {**metrics, "seed": seed, "wall_s": wall}
            runs.setdefault(name, []).append(run)
            if record is not None:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"key": key_of(name), "run": run}))
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"{name} seed {seed}: {shown} ({wall:.0f} s)", flush=True)
            shutil.rmtree(output_dir, ignore_errors=True)
            result = summarize(runs)
            write_results(stem, result, markdown)
    print(markdown(result))
    return result


#: Settings that say which runs a result file holds or where files went, not how the runs were made.
RUN_SELECTION = (
    "seeds",
    "variants",
    "results",
    "work_dir",
    "data_dir",
    "reuse_teacher",
    "merge_results",
    "teacher_only",
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
