"""The loss terms of :class:`~hf_attn_distill.DistillTrainer`, in one place.

:data:`OBJECTIVES` lists the package's term classes in the order terms are computed and logged, and registers them
in that order (:mod:`~hf_attn_distill.terms.registry`); :func:`build_objectives` asks every registered class for
the objects a (student, teacher, config) needs. A new term is one :class:`~hf_attn_distill.terms.base.Objective`
subclass with its ``specs`` and a ``build`` classmethod (``docs/adding_a_term.md``).
"""

from __future__ import annotations

from hf_attn_distill.attention.capture import Capture
from hf_attn_distill.terms.attention import SiteTransfer
from hf_attn_distill.terms.base import Objective
from hf_attn_distill.terms.hidden import HiddenTransfer
from hf_attn_distill.terms.logit import HardLabelLoss, LogitKD
from hf_attn_distill.terms.registry import register_term, registered_classes
from hf_attn_distill.terms.relation import RelationTransfer

__all__ = ["OBJECTIVES", "build_objectives"]

OBJECTIVES: tuple[type, ...] = (HardLabelLoss, LogitKD, SiteTransfer, HiddenTransfer, RelationTransfer)
"""The package's term classes, in the order terms are computed and logged. Each has
``build(student, teacher, args, capture) -> list[Objective]`` and ``specs`` (what the configuration and the card
know of its terms), registered here in this order (:mod:`~hf_attn_distill.terms.registry`)."""
for _cls in OBJECTIVES:
    register_term(_cls)


def build_objectives(
    student, teacher, args, capture: Capture, classes: tuple[type, ...] | None = None
) -> list[Objective]:
    """The objectives of ``classes`` (default: every registered term class) that ``args`` asks for, checked against
    both models; what they attach to the models goes through ``capture``. A class whose weight field ``args`` does
    not have (a term registered from outside with a config of its own) is left out."""
    classes = registered_classes() if classes is None else classes
    usable = [cls for cls in classes if all(hasattr(args, spec.weight_field) for spec in getattr(cls, "specs", ()))]
    if teacher is None:  # the teacher's outputs come from its cache: only terms that need no more than its logits
        usable = [
            cls
            for cls in usable
            if all(not s.needs_teacher or s.logits_only or not s.is_on(args) for s in cls.specs)
            and any(not s.needs_teacher or s.is_on(args) for s in cls.specs)
        ]
    objectives = [objective for cls in usable for objective in cls.build(student, teacher, args, capture)]
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise ValueError(f"Two objectives share a name: {names}.")
    return objectives
