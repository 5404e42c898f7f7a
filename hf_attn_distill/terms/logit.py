"""The terms on the models' outputs: ``loss_ce`` (the student's own task loss) and ``loss_kd`` (logit KD)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_attn_distill.attention.capture import Capture
from hf_attn_distill.losses import logit_kd_loss
from hf_attn_distill.terms.base import ON_POLICY_COLUMN, Objective, Step, label_items
from hf_attn_distill.terms.divergences import token_divergence, top_k_forward_kl
from hf_attn_distill.terms.lm_head import (
    LMHeadPass,
    is_causal_lm,
    is_seq2seq_lm,
    lm_head_pass,
    mask_unpredictable_labels,
    next_token_mask,
    top_k_teacher,
)
from hf_attn_distill.terms.registry import TermSpec
from hf_attn_distill.terms.token_kd import token_kd_loss

__all__ = ["LABEL_KEYS", "LOGIT_KEYS", "HardLabelLoss", "LogitKD", "teacher_label_order"]

LABEL_KEYS = ("labels", "start_positions", "end_positions")
LOGIT_KEYS = ("logits", "start_logits", "end_logits")


def teacher_label_order(student: PreTrainedModel, teacher: PreTrainedModel) -> list[int] | None:
    """Teacher logit columns in the student's label order, or ``None`` when both order labels alike.

    Models name their labels in ``config.id2label``. Default names (``LABEL_0``...) or identical maps need no
    reordering; the same names in another order are remapped; different names raise.
    """
    if teacher is None:  # outputs from a cache: the label order was checked when it was built
        return None
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
    ``t + 1`` at position ``t``, so its loss averages over the labels after the first of each row (``shifted``);
    with ``head_pass`` (:mod:`~hf_attn_distill.terms.lm_head`) it is computed from the hidden states a chunk of
    tokens at a time, and the student's forward gets no labels (it makes no full logits)."""

    name, weight_field, needs_teacher = "loss_ce", "alpha_ce", False
    specs = (TermSpec("loss_ce", "alpha_ce", shown="always", needs_teacher=False),)

    def __init__(
        self, weight: float, num_labels: int | None = None, shifted: bool = False, head_pass: LMHeadPass | None = None
    ):
        self.weight = weight
        self.num_labels = num_labels  # class labels are checked against it (single-label classification)
        self.shifted = shifted
        self.head_pass = head_pass

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
        shifted = is_causal_lm(student)
        head_pass = lm_head_pass(student, teacher, args, capture) if shifted or is_seq2seq_lm(student) else None
        return [cls(args.alpha_ce, classes, shifted, head_pass)]  # logged even at weight 0, when the batch has labels

    def student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if "labels" not in inputs:
            return inputs
        if self.head_pass is not None:
            return {k: v for k, v in inputs.items() if k != "labels"}
        # the model's own loss, over the tokens that count here (not those predicted from left padding)
        return mask_unpredictable_labels(inputs) if self.shifted else inputs

    def start_student(self, step: Step) -> None:
        if self.head_pass is not None:
            self.head_pass.student_tap.arm()
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
        if step.on_policy:  # the student's own samples: nothing to learn from as labels
            return None
        if self.head_pass is not None and torch.is_tensor(step.inputs.get("labels")):
            ce, _ = self.head_pass.sums(step)
            return ce / self.head_pass.rows.clamp_min(1)
        loss = step.outputs.get("loss")
        if loss is None and self.weight > 0:
            raise ValueError(
                "alpha_ce > 0 but the student returned no loss: the batch has no labels "
                f"({', '.join(LABEL_KEYS)}). Add a label column or set alpha_ce=0 for unlabeled transfer data."
            )
        return None if loss is None else loss.float()

    def count(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        labels = inputs.get("labels")
        marker = inputs.get(ON_POLICY_COLUMN)
        if torch.is_tensor(marker) and bool(marker.any()):
            return torch.zeros((), dtype=torch.long, device=marker.device)
        if self.shifted and torch.is_tensor(labels) and labels.dim() == 2:
            return next_token_mask(inputs).sum()
        return label_items(inputs)

    def stop(self) -> None:
        if self.head_pass is not None:
            self.head_pass.stop()


class LogitKD(Objective):
    """``loss_kd``: KL of temperature-softened logits, times T² (Hinton et al.); start/end logits of QA heads over
    the context positions (``kd_mask``), token-level logits in chunks (:func:`~hf_attn_distill.token_kd_loss`) or
    with the configured ``divergence`` (:func:`~hf_attn_distill.token_divergence`). A causal LM's position ``t`` is
    compared where token ``t + 1`` counts (``shifted``); with ``head_pass`` from the hidden states, a chunk of tokens
    at a time (:mod:`~hf_attn_distill.terms.lm_head`)."""

    name, weight_field = "loss_kd", "alpha_kd"
    specs = (
        TermSpec(
            "loss_kd",
            "alpha_kd",
            settings=("divergence",),
            shown="always",
            card="logit KD",
            logits_only=True,
        ),
    )

    def __init__(
        self,
        label_order: list[int] | None,
        vocab_rows: int | None = None,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        skew_alpha: float = 0.1,
        shifted: bool = False,
        head_pass: LMHeadPass | None = None,
        top_k_tail: str = "renormalize",
    ):
        self.label_order = label_order
        self.head_pass = head_pass
        self.vocab_rows = vocab_rows
        self.divergence, self.jsd_beta, self.skew_alpha = divergence, jsd_beta, skew_alpha
        self.shifted = shifted
        self.top_k_tail = top_k_tail

    @property
    def vocab_rows(self) -> int | None:
        """The first rows of padded vocabularies of different sizes that token-level KD compares (``None``: all)."""
        return self._vocab_rows

    @vocab_rows.setter
    def vocab_rows(self, rows: int | None) -> None:
        # the head pass computes both sums once a step, whichever of loss_ce / loss_kd asks first: it must know now
        self._vocab_rows = rows
        if self.head_pass is not None:
            self.head_pass.vocab_rows = rows

    @classmethod
    def build(cls, student, teacher, args, capture: Capture) -> list[Objective]:
        if args.alpha_kd == 0:
            return []
        shifted = is_causal_lm(student)
        return [
            cls(
                teacher_label_order(student, teacher),
                divergence=args.divergence,
                jsd_beta=args.jsd_beta,
                skew_alpha=args.skew_alpha,
                shifted=shifted,
                head_pass=lm_head_pass(student, teacher, args, capture) if shifted or is_seq2seq_lm(student) else None,
                top_k_tail=getattr(args, "teacher_logits_tail", "renormalize"),
            )
        ]

    def start_teacher(self, inputs: Mapping[str, Any]) -> None:
        if self.head_pass is not None and self.head_pass.teacher_tap is not None:
            self.head_pass.teacher_tap.arm()

    def loss(self, step: Step) -> torch.Tensor:
        outputs, teacher_outputs, inputs = step.outputs, step.teacher_outputs, step.inputs
        if self.head_pass is not None:
            _, kd = self.head_pass.sums(step)
            return kd / self.head_pass.rows.clamp_min(1)
        temperature = step.value("temperature")
        cached = top_k_teacher(teacher_outputs)
        if cached is not None:  # a top-k teacher-logit cache, full student logits
            logits, ids, log_probs = outputs["logits"][:, :-1], cached[0][:, :-1], cached[1][:, :-1]
            mask = next_token_mask(inputs)
            if mask is not None:
                logits, ids, log_probs = logits[mask], ids[mask], log_probs[mask]
            logits = logits[..., : self.vocab_rows] if self.vocab_rows is not None else logits
            values = top_k_forward_kl(logits, ids, log_probs, temperature, self.top_k_tail)
            return values.sum() * temperature**2 / max(values.numel(), 1)
        keys = [k for k in LOGIT_KEYS if outputs.get(k) is not None and teacher_outputs.get(k) is not None]
        if not keys:
            raise ValueError(
                f"Neither model returned logits ({', '.join(LOGIT_KEYS)}) to distill; use a model with a task head "
                "or set alpha_kd=0."
            )
        terms = []
        for key in keys:
            student_logits, teacher_logits = outputs[key], teacher_outputs[key]
            token_level = key == "logits" and student_logits.dim() == 3 and student_logits.shape[-1] > 1
            if self.divergence != "forward_kl" and not token_level:
                raise ValueError(
                    f"divergence={self.divergence!r} applies to token-level logits (language models, decoder "
                    f"logits); this model's {key} are per example or per position: use divergence='forward_kl'."
                )
            if key != "logits":  # start/end logits: a distribution over token positions
                positions = step.kd_mask if step.kd_mask is not None else inputs.get("attention_mask")
                terms.append(logit_kd_loss(student_logits, teacher_logits, temperature, class_mask=positions))
                continue
            if token_level:
                terms.append(self._token_loss(student_logits, teacher_logits, inputs, temperature))
                continue
            if self.label_order is not None:  # same label names, other order
                teacher_logits = teacher_logits[..., self.label_order]
            terms.append(logit_kd_loss(student_logits, teacher_logits, temperature))
        return torch.stack(terms).mean()

    def _token_loss(self, student_logits, teacher_logits, inputs, temperature) -> torch.Tensor:
        """Token-level outputs (token classification, decoder logits): ignore -100 labels, else padding; a causal
        LM's position ``t`` where token ``t + 1`` counts. Forward KL in chunks of tokens, without float32 copies
        of ``[B, T, V]``; the other divergences on the counted rows."""
        if self.shifted:
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
            mask = next_token_mask(inputs)
        else:
            labels, attn = inputs.get("labels"), inputs.get("attention_mask")
            mask = None
            if torch.is_tensor(labels) and labels.shape == student_logits.shape[:2]:
                mask = labels.ne(-100)
            elif torch.is_tensor(attn) and attn.shape == student_logits.shape[:2]:
                mask = attn.bool()
        if self.vocab_rows is not None and student_logits.shape[-1] != teacher_logits.shape[-1]:
            student_logits = student_logits[..., : self.vocab_rows]
            teacher_logits = teacher_logits[..., : self.vocab_rows]
        if self.divergence == "forward_kl":
            return token_kd_loss(student_logits, teacher_logits, temperature, mask)
        vocab = student_logits.shape[-1]
        rows_s, rows_t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        if mask is not None:
            keep = mask.reshape(-1)
            rows_s, rows_t = rows_s[keep], rows_t[keep]
        values = token_divergence(rows_s, rows_t, self.divergence, temperature, self.jsd_beta, self.skew_alpha)
        return values.sum() * temperature**2 / max(rows_s.shape[0], 1)

    def count(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        if self.shifted:
            mask = next_token_mask(inputs)
            if mask is not None:
                return mask.sum()
            reference = inputs["input_ids"]
            return torch.tensor(reference.shape[0] * (reference.shape[1] - 1), device=reference.device)
        return label_items(inputs)

    def stop(self) -> None:
        if self.head_pass is not None:
            self.head_pass.stop()
