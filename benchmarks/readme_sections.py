#!/usr/bin/env python
"""The README's result sections, generated from the committed result files, so no table can drift from its run.

Each section sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md;
``python -m benchmarks.readme_sections`` rewrites them all from ``benchmarks/results/*.json`` (and the test suite
checks that README.md is what it writes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

__all__ = ["SECTIONS", "best_reading", "curve_reading", "render", "sections"]


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def best_reading(result: dict, scale: float = 1.0, unit: str = "") -> str:
    """One line of facts about a quality table: the best row and its gains over ``finetune`` and ``kd``, with the
    seed std that says whether they mean anything."""
    students = {n: s for n, s in result["students"].items() if not n.startswith("small_")}
    if not students:
        return "No run has finished yet."
    best = max(students, key=lambda n: students[n]["mean"])
    parts = [
        f"Best so far: `{best}`, {students[best]['mean'] * scale:.2f}{unit} ({len(students[best]['seeds'])} seed{'s' if len(students[best]['seeds']) > 1 else ''})"
    ]
    for base in ("finetune", "kd"):
        if base in students and base != best:
            gain = (students[best]["mean"] - students[base]["mean"]) * scale
            larger = max(students[best]["std"], students[base]["std"]) * scale
            single = len(students[best]["seeds"]) < 2 or len(students[base]["seeds"]) < 2
            parts.append(
                f"{gain:+.2f} over `{base}`"
                + (" (one seed: no std yet)" if single else f" (larger seed std {larger:.2f})")
            )
    retention = students[best]["mean"] / result["teacher"] * 100
    return ", ".join(parts) + f"; it keeps {retention:.1f}% of the teacher."


def curve_reading(result: dict, name: str = "finetune", on: str = "the dev subset") -> str:
    """Whether ``name``'s learning curve (mean over its seeds) has flattened at the budget: its points and what it
    still gained over its last doubling of steps (last step against the step nearest half of it)."""
    curves = result["students"].get(name, {}).get("learning_curves") or []
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(int(step), []).append(value)
    if len(by_step) < 2:
        return ""
    mean = {step: sum(v) / len(v) for step, v in sorted(by_step.items())}
    last = max(mean)
    half = min((step for step in mean if step < last), key=lambda step: abs(step - last / 2))
    points = ", ".join(f"{step}: {value:.2f}" for step, value in mean.items())
    return (
        f" `{name}`'s learning curve on {on} (step: value, mean over its seeds): {points}; it still rose "
        f"{mean[last] - mean[half]:+.2f} from step {half} to {last}."
    )


def _not_rerun(task: str, name: str) -> str:
    return (
        f"### {task}\n\nNo run with the trained teacher of ../shared/teachers has finished yet "
        f"(`python -m benchmarks.{name}`); the earlier table, from a teacher far from trained, is in "
        "[benchmarks/README.md](benchmarks/README.md) with that warning.\n"
    )


def sst2() -> str:
    from benchmarks.quality import sst2 as quality_sst2

    return quality_sst2.readme(_load("quality_sst2.json"))


def qa() -> str:
    from benchmarks.quality import qa as quality_qa

    result = _load("quality_qa.json")
    if "teacher_dir" not in result["settings"]:
        return _not_rerun("SQuAD v1.1", "quality.qa")
    return quality_qa.readme(result) + "\n" + best_reading(result) + curve_reading(result) + "\n"


def translation() -> str:
    from benchmarks.quality import translation as quality_translation

    result = _load("quality_translation.json")
    if "teacher_dir" not in result["settings"]:
        return _not_rerun("Multi30k de→en", "quality.translation")
    return quality_translation.readme(result) + "\n" + best_reading(result) + curve_reading(result, on="val") + "\n"


def lm() -> str:
    from benchmarks.quality import lm as quality_lm

    path = ROOT / "benchmarks" / "results" / "quality_lm.json"
    if not path.exists():
        return (
            "### Causal LM\n\nNo run of `python -m benchmarks.quality.lm` has finished yet (its design and plan: "
            "[benchmarks/README.md](benchmarks/README.md)).\n"
        )
    return quality_lm.readme(json.loads(path.read_text()))


def claims() -> str:
    from benchmarks.quality import claims as claims_module

    results = claims_module.committed_results()
    for task in ("SQuAD v1.1", "Multi30k de-en"):
        if "teacher_dir" not in results[task]["settings"]:  # the weak-teacher table: superseded, not a claim
            results[task] = {**results[task], "students": {}}
    lines = []
    for row in claims_module.claim_rows(results):
        if row["best"] is None:
            lines.append(f"{row['task']}: not measured yet.")
        else:
            verdict = "meets" if row["met"] else "misses"
            seeds = row.get("seeds") or 0
            so_far = f" on {seeds} seed{'s' if seeds > 1 else ''} so far" if 0 < seeds < 3 else ""
            lines.append(
                f"{row['task']}: `{row['best']}` {verdict} {row['claim']}{so_far} ({row['gain_percent']:+.1f}% relative, "
                f"{row['gain_points']:+.2f} points; teacher: {row['meaningful']})."
            )
    return claims_module.table(results) + "\n" + " ".join(lines) + "\n"


def speed() -> str:
    from benchmarks.speed import step as speed_module

    return speed_module.summary_table(_load("speed.json"), batch=8)  # the batch sweep: benchmarks/README.md


SECTIONS: dict[str, Callable[[], str]] = {
    "sst2": sst2,
    "qa": qa,
    "translation": translation,
    "lm": lm,
    "claims": claims,
    "speed": speed,
}


def sections() -> dict[str, str]:
    """Every section's text, from the committed results."""
    return {name: make() for name, make in SECTIONS.items()}


def render(readme: str) -> str:
    """``readme`` with every marked section replaced by its current text; raises when a marker is missing."""
    for name, text in sections().items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.DOTALL)
        if not pattern.search(readme):
            raise ValueError(f"README.md has no <!-- results:{name} --> ... <!-- /results:{name} --> section.")
        readme = pattern.sub(lambda m, text=text: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), readme)
    return readme


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
    print(f"{path.relative_to(ROOT)}: {len(SECTIONS)} result sections rewritten")
