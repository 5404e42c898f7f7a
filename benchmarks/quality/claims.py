#!/usr/bin/env python
"""The project's founding claims (+5% accuracy, +8% QA F1, +10% BLEU over plain training) against the committed
quality results: for each task the best distilled row against ``finetune`` (same student, no teacher), in points
and relative to ``finetune``, and whether the task's teacher makes the comparison meaningful (trained to a
plateau, and above every student).

    python -m benchmarks.quality.claims      # prints the README's table from benchmarks/results/quality_*.json
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: task -> (result file, claimed relative gain over plain training in percent, what the claim says)
CLAIMS = {
    "SST-2": ("quality_sst2.json", 5.0, "+5% accuracy"),
    "SQuAD v1.1": ("quality_qa.json", 8.0, "+8% F1"),
    "Multi30k de-en": ("quality_translation.json", 10.0, "+10% BLEU"),
}


def teacher_state(result: dict) -> str:
    """What the result's teacher allows: is it above every student, and was it trained to a plateau?"""
    above = [n for n, s in result["students"].items() if s["mean"] >= result["teacher"]]
    if above:
        return f"students at or above it ({', '.join(above)}): says nothing"
    if "teacher_curve" not in result:
        return "fixed steps, no dev curve; above every student"
    if not result.get("teacher_converged"):
        return f"not converged ({result.get('teacher_curve_note', 'curve incomplete')})"
    return "converged, above every student"


def claim_rows(results: dict[str, dict]) -> list[dict]:
    """One row per task in ``results`` (task -> result): the best non-``finetune`` row, its gain over
    ``finetune`` in points and percent, the claim, met or not, and whether the teacher allows the comparison.
    Student rows of another architecture (``small_*``) are not compared with the 3-layer ``finetune``."""
    rows = []
    for task, (_, claimed, words) in CLAIMS.items():
        if task not in results:
            continue
        result = results[task]
        students = {n: s for n, s in result["students"].items() if not n.startswith("small_")}
        distilled = [n for n in students if n != "finetune"]
        if "finetune" not in students or not distilled:  # a table still being run: nothing to compare yet
            done = ", ".join(f"`{n}`" for n in students) or "none"
            rows.append({"task": task, "claim": words, "best": None, "rows_so_far": done})
            continue
        best = max(distilled, key=lambda n: students[n]["mean"])
        scale = 100.0 if result["metric"] == "accuracy" else 1.0
        gain = (students[best]["mean"] - students["finetune"]["mean"]) * scale
        relative = (students[best]["mean"] / students["finetune"]["mean"] - 1) * 100
        rows.append(
            {
                "task": task,
                "claim": words,
                "best": best,
                "seeds": min(len(students[n].get("seeds", [])) for n in (best, "finetune")),
                "gain_points": gain,
                "gain_percent": relative,
                "met": relative >= claimed,
                "meaningful": teacher_state(result),
            }
        )
    return rows


def table(results: dict[str, dict]) -> str:
    lines = [
        "| task | claim | best distilled row | vs `finetune` (points) | vs `finetune` (relative) | met | teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in claim_rows(results):
        if r["best"] is None:
            lines.append(f"| {r['task']} | {r['claim']} | not measured yet (rows so far: {r['rows_so_far']}) | | | | |")
            continue
        seeds = r.get("seeds") or 0
        verdict = ("yes" if r["met"] else "no") + (
            f" ({seeds} seed{'s' if seeds > 1 else ''}: provisional)" if 0 < seeds < 3 else ""
        )
        lines.append(
            f"| {r['task']} | {r['claim']} | `{r['best']}` | {r['gain_points']:+.2f} | {r['gain_percent']:+.1f}% | "
            f"{verdict} | {r['meaningful']} |"
        )
    return "\n".join(lines) + "\n"


def committed_results() -> dict[str, dict]:
    return {
        task: json.loads((ROOT / "benchmarks" / "results" / name).read_text()) for task, (name, _, _) in CLAIMS.items()
    }


if __name__ == "__main__":
    print(table(committed_results()))
