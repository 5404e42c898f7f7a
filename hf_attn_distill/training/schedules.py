"""Schedules of the temperature and the loss weights over training.

A schedule moves a :class:`~hf_attn_distill.DistillConfig` value from its configured value (the start) to an
end value as training progresses (``progress = global_step / max_steps``, constant within an accumulation
window, so gradient accumulation stays exact):

- ``constant``: the configured value throughout;
- ``linear``: ``start + (end - start) * progress``;
- ``cosine``: ``end + (start - end) * (1 + cos(pi * progress)) / 2``.

Written ``{"temperature": "linear:1.0", "attention_weight": "cosine:0.0"}`` (a dict, its JSON, or
``"temperature=linear:1.0,attention_weight=cosine:0.0"`` on the command line).
"""

from __future__ import annotations

import json
import math

from hf_attn_distill.terms.registry import term_specs

__all__ = ["SCHEDULE_KINDS", "parse_schedules", "schedulable", "scheduled_value"]

SCHEDULE_KINDS = ("constant", "linear", "cosine")


def schedulable(term_weight_fields: dict[str, str] | None = None) -> tuple[str, ...]:
    """What ``schedules`` may move: the temperature and every term weight (of ``term_weight_fields``, default every
    registered term's)."""
    weights = term_weight_fields or {spec.name: spec.weight_field for spec in term_specs()}
    return ("temperature", *weights.values())


def parse_schedules(
    spec: dict | str | None, term_weight_fields: dict[str, str] | None = None
) -> dict[str, tuple[str, float]]:
    """``{name: (kind, end)}`` from a dict, a JSON object or ``"name=kind:end,..."``; checked (the names against
    :func:`schedulable`)."""
    if spec is None or spec == "" or spec == {}:
        return {}
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            spec = json.loads(text)
        else:
            items = [item for item in text.split(",") if item.strip()]
            bad = [item for item in items if "=" not in item]
            if bad:
                raise ValueError(
                    f"schedules items are 'name=kind:end' (e.g. 'temperature=linear:1.0'); got {bad[0]!r}."
                )
            spec = dict(item.split("=", 1) for item in items)
    names = schedulable(term_weight_fields)
    out = {}
    for name, value in spec.items():
        name = name.strip()
        if name not in names:
            raise ValueError(f"Cannot schedule {name!r}; schedulable values: {list(names)}.")
        kind, _, end = str(value).strip().partition(":")
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"Schedule of {name} must be one of {SCHEDULE_KINDS} (as 'kind:end'), got {value!r}.")
        if kind == "constant":
            out[name] = ("constant", math.nan)
            continue
        try:
            end_value = float(end)
        except ValueError:
            raise ValueError(f"Schedule of {name} needs an end value, e.g. '{kind}:0.5'; got {value!r}.") from None
        if not math.isfinite(end_value):
            raise ValueError(f"The {name} schedule must end at a finite value, got {end_value}.")
        if name == "temperature" and not end_value > 0:
            raise ValueError(f"The temperature schedule must end above 0, got {end_value}.")
        if end_value < 0:
            raise ValueError(f"The {name} schedule must end at a value >= 0, got {end_value}.")
        out[name] = (kind, end_value)
    return out


def scheduled_value(kind: str, start: float, end: float, progress: float) -> float:
    """Value of a schedule at ``progress`` in ``[0, 1]`` (clamped)."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0
    raise ValueError(f"Unknown schedule kind {kind!r}; choose from {SCHEDULE_KINDS}.")
