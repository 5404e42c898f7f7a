"""What the quality benchmarks share: checking variant names, the seed-major loop over student runs, mean/std
summaries and writing the JSON + markdown results after every run."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["check_variants", "mean_std", "run_students", "write_results"]


def check_variants(asked: Iterable[str], known: Iterable[str]) -> None:
    """Exit with the choices when a variant name is unknown."""
    unknown = set(asked) - set(known)
    if unknown:
        raise SystemExit(f"Unknown variants {sorted(unknown)}; choose from {list(known)}.")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_results(stem: Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """``stem.json`` and ``stem.md`` of ``result``."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))


def run_students(variants: list[str], seeds: list[int], work: Path, run_one: Callable[[str, int, Path], dict],
                 summarize: Callable[[dict[str, list[dict]]], dict], stem: Path,
                 markdown: Callable[[dict], str]) -> dict:
    """Run ``run_one(variant, seed, output_dir) -> metrics`` for every seed (outer loop: every variant gets a run
    before any gets its second) and variant; after each run record its wall time, delete its folder and
    rewrite the results. Returns the last summary."""
    runs: dict[str, list[dict]] = {}
    result = summarize(runs)
    for seed in seeds:
        for name in variants:
            output_dir = work / f"{name}_seed{seed}"
            start = time.perf_counter()
            metrics = run_one(name, seed, output_dir)
            wall = time.perf_counter() - start
            runs.setdefault(name, []).append({**metrics, "seed": seed, "wall_s": wall})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"{name} seed {seed}: {shown} ({wall:.0f} s)", flush=True)
            shutil.rmtree(output_dir, ignore_errors=True)
            result = summarize(runs)
            write_results(stem, result, markdown)
    print(markdown(result))
    return result
