"""The shape every loss term of :class:`~hf_attn_distill.DistillTrainer` has.

An :class:`Objective` is one term of the loss: a name (``loss_kd``, ``loss_attn_enc``, ...), the
:class:`~hf_attn_distill.DistillConfig` field of its weight, what it asks of the teacher's and the student's
forward, its loss, and the count it averages over. ``DistillTrainer.compute_loss`` runs one step as

1. ``start_teacher(inputs)`` for every objective, the teacher's forward (in inference mode, with the merged
   ``teacher_forward_kwargs``), ``read_teacher(step)``;
2. ``start_student(step)``, the student's forward (``student_forward_kwargs``), ``read_student(step)``;
3. ``loss(step)`` of each objective (``None``: the term has nothing to say on this batch), weighted by the
   (scheduled) value of ``weight_field`` and scaled by ``count(inputs)`` over the accumulation window;
4. after backward, ``stop()`` (gradient checkpointing re-runs layers during backward, so whatever an objective
   armed in step 2 stays armed until then).

Everything but ``loss`` and ``count`` has a do-nothing default. See ``docs/adding_a_term.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

__all__ = ["KD_MASK_COLUMN", "Objective", "Step", "label_items"]

KD_MASK_COLUMN = "kd_mask"
"""Optional dataset column ``[seq_len]`` of 0/1: the positions token-position logits (extractive-QA
``start_logits``/``end_logits``) are distilled over. The trainer keeps it and never passes it to a model."""


@dataclass
class Step:
    """What one training or evaluation step knows, filled as it runs.

    Attributes:
        inputs: the batch the models see (decoder inputs already built, trainer-only columns removed).
        value: the current value of a :class:`~hf_attn_distill.DistillConfig` field, schedules applied
            (``step.value("temperature")``).
        kd_mask: the dataset's ``kd_mask`` column, if any (positions QA logits are distilled over).
        teacher_outputs: the teacher's outputs (``{}`` before its forward; logits only with the logit cache).
        outputs: the student's outputs (``None`` before its forward).
        training: whether the student is training (a backward follows).
    """

    inputs: dict[str, Any]
    value: Callable[[str], float]
    kd_mask: torch.Tensor | None = None
    teacher_outputs: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] | None = None
    training: bool = False


class Objective:
    """One loss term. Subclasses set :attr:`name` and :attr:`weight_field` and define :meth:`loss` and
    :meth:`count`; the other hooks are optional."""

    name: ClassVar[str] | str = ""
    """The term's name in logs (``loss_ce``, ``eval_loss_ce``) and in the result of ``compute_loss``."""
    weight_field: ClassVar[str] | str = ""
    """The :class:`~hf_attn_distill.DistillConfig` field holding its weight (what ``schedules`` can move)."""
    specs: ClassVar[tuple] = ()
    """What the configuration and the model card know of the terms this class makes, one
    :class:`~hf_attn_distill.terms.registry.TermSpec` each (``register_term`` reads them)."""
    needs_teacher: ClassVar[bool] = True
    """Whether the term reads anything of the teacher's forward."""
    teacher_forward_kwargs: ClassVar[dict[str, Any]] = {}
    student_forward_kwargs: ClassVar[dict[str, Any]] = {}

    def start_teacher(self, inputs: Mapping[str, Any]) -> None:
        """Arm what the teacher's forward must hand over (e.g. attention capture)."""

    def read_teacher(self, step: Step) -> None:
        """Read what the teacher's forward handed over; runs in inference mode, before the teacher's capture is
        disarmed."""

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs of the student's forward, from those it would get (e.g. without the labels of a loss the
        objective computes itself); the default changes nothing."""
        return inputs

    def start_student(self, step: Step) -> None:
        """Arm what the student's forward must hand over (or compute inside its layers)."""

    def read_student(self, step: Step) -> None:
        """Read what the student's forward handed over (its outputs are in ``step.outputs``)."""

    def loss(self, step: Step) -> torch.Tensor | None:
        """The term: a float32 scalar, the mean over :meth:`count` items; ``None`` when absent on this batch."""
        raise NotImplementedError

    def count(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """How many items :meth:`loss` averages over in ``inputs``: what gradient accumulation and the logged
        means weight this batch by."""
        raise NotImplementedError

    def stop(self) -> None:
        """Disarm everything the step armed, drop references to its tensors."""


def label_items(inputs: Mapping[str, Any]) -> torch.Tensor:
    """What the hard-label and logit-KD terms average over: ``labels != -100`` tokens for token-level and
    sequence-to-sequence labels, else examples."""
    labels = inputs.get("labels")
    if torch.is_tensor(labels) and labels.dim() > 1:
        return labels.ne(-100).sum()
    reference = next(v for v in inputs.values() if torch.is_tensor(v))
    return torch.tensor(reference.shape[0], device=reference.device)
