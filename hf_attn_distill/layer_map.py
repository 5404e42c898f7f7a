"""Which student layer learns from which teacher layer."""

from __future__ import annotations

from .config import LayerMapSpec, parse_layer_map

__all__ = ["parse_layer_map", "resolve_layer_map"]


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
