"""The terms on the models' outputs: ``loss_ce`` (the student's own task loss) and ``loss_kd`` (logit KD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_attn_distill.attention.capture import Capture
from hf_attn_distill.losses import logit_kd_loss
from hf_attn_distill.terms.base import Objective, Step, label_items
from hf_attn_distill.terms.registry import TermSpec
from hf_attn_distill.terms.token_kd import token_kd_loss

__all__ = ["LABEL_KEYS", "LOGIT_KEYS", "HardLabelLoss", "LogitKD", "teacher_label_order"]

LABEL_KEYS = ("labels", "start_positions", "end_positions")
LOGIT_KEYS = ("logits", "start_logits", "end_logits")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # model classes whose loss shifts the labels by one


def teacher_label_order(student: PreTrainedModel, teacher: PreTrainedModel) -> list[int] | None:
    """Teacher logit columns in the student's label order, or ``None`` when both order labels alike.

    Models name their labels in ``config.id2label``. Default names (``LABEL_0``...) or identical maps need no
    reordering; the same names in another order are remapped; different names raise.
    """
    s_map, t_map = getattr(student.config, "id2label", None), getattr(teacher.config, "id2label", None)
    if not s_map or not t_map or len(s_map) != len(t_map):
        return None
    s_names = [s_map[i] for i in sorted(s_map)]
    t_names = [t_map[i] for i in sorted(t_map)]
    if s_names == t_names:
        return None
    if sorted(s_names) != sorted(t_names):
        raise ValueError(
            f"Student labels {s_names} and teacher labels {t_names} differ: KD would teach the student the wrong "
            "classes. Create the student with the teacher's id2label/label2id (or relabel the data)."
        )
    return [t_names.index(name) for name in s_names]


class HardLabelLoss(Objective):
    """``loss_ce``: the student's own task loss (what it returns given labels). A causal LM predicts token
    ``t + 1`` at position ``t``, so its loss averages over the labels after the first of each row (``shifted``)."""

    name, weight_field, needs_teacher = "loss_ce", "alpha_ce", False
    specs = (TermSpec("loss_ce", "alpha_ce", shown="always", needs_teacher=False),)

    def __init__(self, weight: float, num_labels: int | None = None, shifted: bool = False):
        self.weight = weight
        self.num_labels = num_labels  # class labels are checked against it (single-label classification)
        self.shifted = shifted

    @classmethod
    def build(cls, student, teacher, args, capture: Capture) -> list[Objective]:
        config = student.config
        classes = (
            config.num_labels
            if getattr(config, "problem_type", None) in (None, "single_label_classification")
            else None
        )
        if getattr(config, "is_encoder_decoder", False) or not type(student).__name__.endswith(
            "ForSequenceClassification"
        ):
            classes = None
        shifted = not getattr(config, "is_encoder_decoder", False) and type(student).__name__.endswith(
            CAUSAL_LM_SUFFIXES
        )
        return [cls(args.alpha_ce, classes, shifted)]  # logged even at weight 0, when the batch has labels

    def start_student(self, step: Step) -> None:
        labels = step.inputs.get("labels")
        if self.num_labels is None or self.num_labels < 2 or not torch.is_tensor(labels) or labels.dim() != 1:
            return
        if labels.is_floating_point():
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_labels:
            bad = high if high >= self.num_labels else low
            raise ValueError(
                f"A batch has label {bad}, but the student has num_labels={self.num_labels} (labels "
                f"0..{self.num_labels - 1}): relabel the data, or build both models with the right num_labels."
            )

    def loss(self, step: Step) -> torch.Tensor | None:
        loss = step.outputs.get("loss")
        if loss is None and self.weight > 0:
            raise ValueError(
                "alpha_ce > 0 but the student returned no loss: the batch has no labels "
                f"({', '.join(LABEL_KEYS)}). Add a label column or set alpha_ce=0 for unlabeled transfer data."
            )
        return None if loss is None else loss.float()

    def count(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        labels = inputs.get("labels")
        if self.shifted and torch.is_tensor(labels) and labels.dim() == 2:
            return labels[:, 1:].ne(-100).sum()
        return label_items(inputs)


class LogitKD(Objective):
    """``loss_kd``: KL of temperature-softened logits, times T² (Hinton et al.); start/end logits of QA heads over
    the context positions (``kd_mask``), token-level logits in chunks (:func:`~hf_attn_distill.token_kd_loss`)."""

    name, weight_field = "loss_kd", "alpha_kd"
    specs = (TermSpec("loss_kd", "alpha_kd", shown="always", card="logit KD", logits_only=True),)

    def __init__(self, label_order: list[int] | None, vocab_rows: int | None = None):
        self.label_order = label_order
        # token-level logits of padded vocabularies of different sizes: the first vocab_rows rows are compared
        self.vocab_rows = vocab_rows

    @classmethod
    def build(cls, student, teacher, args, capture: Capture) -> list[Objective]:
        return [cls(teacher_label_order(student, teacher))] if args.alpha_kd > 0 else []

    def loss(self, step: Step) -> torch.Tensor:
        outputs, teacher_outputs, inputs = step.outputs, step.teacher_outputs, step.inputs
        temperature = step.value("temperature")
        keys = [k for k in LOGIT_KEYS if outputs.get(k) is not None and teacher_outputs.get(k) is not None]
        if not keys:
            raise ValueError(
                f"Neither model returned logits ({', '.join(LOGIT_KEYS)}) to distill; use a model with a task head "
                "or set alpha_kd=0."
            )
        terms = []
        for key in keys:
            student_logits, teacher_logits = outputs[key], teacher_outputs[key]
            if key != "logits":  # start/end logits: a distribution over token positions
                positions = step.kd_mask if step.kd_mask is not None else inputs.get("attention_mask")
                terms.append(logit_kd_loss(student_logits, teacher_logits, temperature, class_mask=positions))
                continue
            if student_logits.dim() == 3 and student_logits.shape[-1] > 1:
                # token-level outputs (token classification, decoder logits): ignore -100 labels, else padding;
                # computed in chunks of tokens, without float32 copies of [B, T, V]
                labels, attn = inputs.get("labels"), inputs.get("attention_mask")
                mask = None
                if torch.is_tensor(labels) and labels.shape == student_logits.shape[:2]:
                    mask = labels.ne(-100)
                elif torch.is_tensor(attn) and attn.shape == student_logits.shape[:2]:
                    mask = attn.bool()
                if self.vocab_rows is not None and student_logits.shape[-1] != teacher_logits.shape[-1]:
                    student_logits = student_logits[..., : self.vocab_rows]
                    teacher_logits = teacher_logits[..., : self.vocab_rows]
                terms.append(token_kd_loss(student_logits, teacher_logits, temperature, mask))
                continue
            if self.label_order is not None:  # same label names, other order
                teacher_logits = teacher_logits[..., self.label_order]
            terms.append(logit_kd_loss(student_logits, teacher_logits, temperature))
        return torch.stack(terms).mean()

    def count(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        return label_items(inputs)
