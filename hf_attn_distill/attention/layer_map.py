"""Which student layer learns from which teacher layer."""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = ["LayerMapSpec", "parse_layer_map", "resolve_layer_map"]

LayerMapSpec = str | Sequence[Sequence[int]]


def parse_layer_map(spec: LayerMapSpec) -> str | tuple[tuple[int, int], ...]:
    """Normalise a layer-map spec to ``"uniform"``, ``"last"`` or a tuple of ``(student, teacher)`` pairs.

    Accepts the names, a list of pairs, a JSON list (``"[[0, 1], [1, 3]]"``) or the command-line
    form ``"0:1,1:3,2:5"``.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text in ("uniform", "last"):
            return text
        try:
            if text.startswith("["):
                pairs = json.loads(text)
            else:
                pairs = [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item.strip()]
        except (ValueError, json.JSONDecodeError) as err:
            raise ValueError(
                f"Cannot parse layer_map {spec!r}: use 'uniform', 'last', pairs like '0:1,1:3' "
                "or a JSON list like '[[0, 1], [1, 3]]'."
            ) from err
    else:
        pairs = spec
    out = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(
                f"Each layer_map entry must be a (student_layer, teacher_layer) pair of ints, got {pair!r}"
            )
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise ValueError("layer_map is empty: give at least one (student_layer, teacher_layer) pair.")
    students = [s for s, _ in out]
    if len(set(students)) != len(students):
        raise ValueError(f"layer_map {out} maps a student layer twice; each student layer may have one teacher layer.")
    return tuple(out)


def resolve_layer_map(spec: LayerMapSpec, num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """Turn a spec into explicit ``(student_layer, teacher_layer)`` pairs, 0-based, checked against the models.

    - ``"uniform"`` (TinyBERT): student layer ``i`` learns from teacher layer ``k * (i + 1) - 1`` with
      ``k = num_teacher_layers / num_student_layers`` (rounded when it is not an integer), so the last
      student layer always maps to the last teacher layer.
    - ``"last"`` (MiniLM): only the last student layer, from the last teacher layer.
    - explicit pairs: used as given.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError("Both models need at least one layer.")
    parsed = parse_layer_map(spec)
    if parsed == "last":
        return [(num_student_layers - 1, num_teacher_layers - 1)]
    if parsed == "uniform":
        if num_student_layers > num_teacher_layers:
            raise ValueError(
                f"layer_map='uniform' needs a student with at most as many layers as the teacher "
                f"({num_student_layers} > {num_teacher_layers}); give explicit pairs instead."
            )
        ratio = num_teacher_layers / num_student_layers
        return [(i, round(ratio * (i + 1)) - 1) for i in range(num_student_layers)]
    for s, t in parsed:
        if not 0 <= s < num_student_layers or not 0 <= t < num_teacher_layers:
            raise ValueError(
                f"layer_map pair ({s}, {t}) is out of range: the student has layers 0..{num_student_layers - 1} "
                f"and the teacher 0..{num_teacher_layers - 1}."
            )
    return list(parsed)
