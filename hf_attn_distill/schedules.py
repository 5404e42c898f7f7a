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

import math

from .config import SCHEDULE_KINDS, parse_schedules, schedulable

__all__ = ["SCHEDULE_KINDS", "parse_schedules", "schedulable", "scheduled_value"]


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
