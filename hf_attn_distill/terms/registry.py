"""The registry of loss terms: everything the package needs to know about a term, declared once by its class.

A :class:`TermSpec` names a term (``loss_kd``), the :class:`~hf_attn_distill.DistillConfig` field of its weight
and the settings it reads, when it is on, whether the teacher-logit cache can stand in for the teacher's forward
for it, and what the model card says of it. Each term class of the package registers its specs where it is
defined (``register_term``); the config (validation: weights ``>= 0``, at least one term on, what ``schedules``
may move, the cache guard), the model card and ``docs/config.md`` read them from here. This module imports
nothing else of the package, so the config can read it.

From outside, ``register_term(MyTerm, config_class=MyConfig)`` adds a term in one call, checked against the
config's fields; ``DistillTrainer`` then builds it with the package's own terms (``docs/adding_a_term.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["TermSpec", "register_term", "registered_classes", "term_specs", "unregister_term"]


@dataclass(frozen=True)
class TermSpec:
    """One loss term as the configuration and the model card see it.

    Attributes:
        name: the logged name (``loss_kd``; ``eval_loss_kd`` in evaluation).
        weight_field: the config field of its weight (``>= 0``, schedulable; 0 switches the term off).
        map_field: a layer-map field that must also be set for the term to be on (attention sites), or ``None``.
        settings: the other config fields it reads, shown with it on the model card, in this order.
        shown: when the card shows its weight and settings: ``"always"``, ``"map"`` (its map is set) or ``"on"``.
        card: the card's phrase for it, formatted with the config's fields (``"hidden-state transfer
            ({hidden_loss})"``); ``""``: not named in the objective (the hard-label loss).
        card_group: terms of one group share one phrase, ``card`` then naming the member (``"encoder"``) and
            the group its template (:data:`CARD_GROUPS`).
        logits_only: it reads nothing of the teacher but its logits, so the teacher-logit cache can stand in.
        needs_teacher: it reads the teacher's forward at all.
    """

    name: str
    weight_field: str
    map_field: str | None = None
    settings: tuple[str, ...] = ()
    shown: str = "on"
    card: str = ""
    card_group: str | None = None
    logits_only: bool = False
    needs_teacher: bool = True

    def is_on(self, args: Any) -> bool:
        """Whether ``args`` switches the term on: its weight is above 0 and, for a mapped term, its map is set."""
        if not hasattr(args, self.weight_field):
            return False
        mapped = self.map_field is None or getattr(args, self.map_field, None) not in (None, "none")
        return mapped and getattr(args, self.weight_field) > 0

    def is_shown(self, args: Any) -> bool:
        """Whether the card shows the term's weight and settings for ``args``."""
        if self.shown == "always":
            return hasattr(args, self.weight_field)
        if self.shown == "map":
            return getattr(args, self.map_field, None) not in (None, "none")
        return self.is_on(args)


#: Templates of the card phrases of term groups, formatted with the config's fields and ``members``.
CARD_GROUPS = {"attention": "attention transfer ({attention_loss}; {members})"}

_SPECS: dict[str, TermSpec] = {}
_CLASSES: list[type] = []


def term_specs() -> tuple[TermSpec, ...]:
    """Every registered term, in registration order (the package's own first)."""
    return tuple(_SPECS.values())


def registered_classes() -> tuple[type, ...]:
    """Every registered term class, in registration order: what ``DistillTrainer`` builds its objectives from."""
    return tuple(_CLASSES)


def register_term(cls: type, config_class: type | None = None) -> type:
    """Register the term class ``cls`` (its ``specs``: one :class:`TermSpec` per term it makes) and return it.

    ``config_class`` (the config a term from outside brings its weight in) is checked: every weight, map and
    setting field the specs name must be one of its dataclass fields, else ``ValueError`` names what is missing.
    A name registered by another class is refused; registering the same class again changes nothing."""
    specs = getattr(cls, "specs", None)
    if not specs or not all(isinstance(s, TermSpec) for s in specs):
        raise ValueError(f"{cls.__name__} declares no specs: give it specs = (TermSpec(name, weight_field, ...),).")
    if config_class is not None:
        fields = {f.name for f in dataclasses.fields(config_class)}
        for spec in specs:
            named = [spec.weight_field, *([spec.map_field] if spec.map_field else []), *spec.settings]
            missing = [name for name in named if name not in fields]
            if missing:
                raise ValueError(
                    f"{cls.__name__} registers {spec.name} with config fields {missing} that {config_class.__name__} "
                    "does not have: add them to the config class (the weight a float field, default 0.0)."
                )
    for spec in specs:
        owner = next((c for c in _CLASSES if spec.name in {s.name for s in c.specs}), None)
        if owner is not None and owner is not cls:
            raise ValueError(f"The term {spec.name} is already registered by {owner.__name__}; name yours otherwise.")
    if cls not in _CLASSES:
        _CLASSES.append(cls)
        _SPECS.update({spec.name: spec for spec in specs})
    return cls


def unregister_term(cls: type) -> None:
    """Take a term class registered from outside out of the registry again (its specs with it)."""
    if cls in _CLASSES:
        _CLASSES.remove(cls)
        for spec in cls.specs:
            _SPECS.pop(spec.name, None)
