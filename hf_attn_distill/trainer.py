"""``DistillTrainer``: a drop-in ``transformers.Trainer`` that distills a teacher into the student."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import logging

from hf_attn_distill.attention.capture import Capture
from hf_attn_distill.config import DistillConfig
from hf_attn_distill.hub.model_card import ModelCardMixin
from hf_attn_distill.terms.attention import SiteTransfer
from hf_attn_distill.terms.base import KD_MASK_COLUMN, ON_POLICY_COLUMN, Step
from hf_attn_distill.terms.build import build_objectives
from hf_attn_distill.terms.lm_head import TOP_K_IDS, TOP_K_LOG_PROBS, is_causal_lm, mask_unpredictable_labels
from hf_attn_distill.terms.logit import LABEL_KEYS, LogitKD
from hf_attn_distill.training.accounting import TermAccounting, TermLoggingMixin
from hf_attn_distill.training.batches import check_lengths, position_limits, strip_outputs, with_decoder_inputs
from hf_attn_distill.training.checkpoints import CheckpointMixin, SaveGuardMixin, resolve_resume
from hf_attn_distill.training.distributed import prepare_teacher
from hf_attn_distill.training.eval_order import InOrderEvaluationMixin
from hf_attn_distill.training.eval_rng import RNGPreservingEvaluationMixin
from hf_attn_distill.training.nonfinite import NonFiniteWatch
from hf_attn_distill.training.on_policy import is_on_policy_step, on_policy_batch
from hf_attn_distill.training.pairing import (
    check_cache_only,
    check_distillation_pair,
    check_same_tokenizer,
    load_teacher_tokenizer,
    resolve_teacher,
)
from hf_attn_distill.training.schedules import parse_schedules, scheduled_value
from hf_attn_distill.training.teacher_cache import (
    CACHE_INDEX_COLUMN,
    TeacherTopKCache,
    complete_cache_meta,
    prepare_logits_cache,
)
from hf_attn_distill.utils.hardware import emulated_bf16_warning

__all__ = ["DistillTrainer"]

logger = logging.get_logger(__name__)


class DistillTrainer(
    TermLoggingMixin,
    SaveGuardMixin,
    CheckpointMixin,
    ModelCardMixin,
    InOrderEvaluationMixin,
    RNGPreservingEvaluationMixin,
    Trainer,
):
    """``transformers.Trainer`` whose loss is the weighted sum of the objectives ``args`` asks for
    (:mod:`~hf_attn_distill.terms.logit`): ``alpha_ce * CE + alpha_kd * KD``, one attention term per mapped site,
    and the hidden-state and relation terms when their weights are above 0.

    The teacher runs in eval mode under ``torch.inference_mode``, is never given to the optimizer and is not
    saved with student checkpoints. Every teacher layer and every unmapped student layer runs the fused SDPA
    kernel; mapped student layers compute attention and its loss block by block over query rows
    (:mod:`~hf_attn_distill.attention.streamed`). Each term is normalised over the whole gradient-accumulation window
    (:mod:`~hf_attn_distill.training.accounting`), so ``k`` micro-batches of ``n`` give the update of one batch of
    ``k * n``. Terms are logged by name (``loss_ce``, ``loss_kd``, ``loss_attn_enc`` ..., ``eval_loss_*``),
    averaged over their items in the logging window and across processes. What the trainer attaches to the
    models (capture points, attention implementation, the hidden-state projection, the teacher's frozen state)
    is taken off when ``train`` ends (:class:`~hf_attn_distill.attention.capture.Capture`). Evaluation and
    prediction visit the dataset in its order, also when training groups batches by length
    (:mod:`~hf_attn_distill.training.eval_order`), and leave the random generators as they were, so evaluating
    during training does not change the training (:mod:`~hf_attn_distill.training.eval_rng`).

    Args:
        model: the student (a ``PreTrainedModel``).
        teacher_model: the teacher, or a Hub id / folder to load it from; ``None`` with a finished
            ``teacher_logits_cache`` (built by a run with the teacher): training reads the teacher's outputs from
            it and the teacher is never loaded (logit KD only, ``eval_with_teacher=False``).
        args: a :class:`DistillConfig`.
        **kwargs: everything else ``Trainer`` takes (datasets, ``processing_class``, callbacks, ...).
    """

    loss_is_scaled_for_ga = True
    objective_classes: tuple[type, ...] | None = None
    """The term classes this trainer builds; ``None``: every registered one (the package's
    :data:`~hf_attn_distill.terms.logit.OBJECTIVES`, then those registered from outside with
    :func:`~hf_attn_distill.terms.registry.register_term`, see ``docs/adding_a_term.md``)."""

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillConfig | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = DistillConfig(output_dir="tmp_trainer")
        tokenizer = kwargs.get("processing_class")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor's tokenizer
        if isinstance(teacher_model, str) and tokenizer is not None and hasattr(tokenizer, "get_vocab"):
            # a teacher given by name has its own tokenizer: the student's must give every id the same token
            teacher_tokenizer = load_teacher_tokenizer(teacher_model, args.teacher_model_init_kwargs)
            if teacher_tokenizer is not None:
                check_same_tokenizer(teacher_tokenizer, tokenizer)
        teacher_model = resolve_teacher(model, teacher_model, args)
        self.capture = Capture()
        if teacher_model is None:  # its outputs come from a finished teacher-logit cache alone
            vocab_rows = check_cache_only(model, args, tokenizer)
        else:
            vocab_rows = check_distillation_pair(model, teacher_model, args, tokenizer)
            if args.teacher_dtype != "auto":
                teacher_model = teacher_model.to(getattr(torch, args.teacher_dtype))
            self.capture.freeze(teacher_model)
        # before super(): the optimizer and DDP must see what objectives attach to the student
        self.objectives = build_objectives(model, teacher_model, args, self.capture, self.objective_classes)
        self.vocab_rows = vocab_rows  # the vocabulary rows token-level KD compares (None: all)
        self.vocab_rows_note = None  # what the card says about a padded vocabulary, when KD compares part of it
        if vocab_rows is not None:
            for objective in self.objectives:
                if isinstance(objective, LogitKD):
                    objective.vocab_rows = vocab_rows
            sizes = [
                getattr(getattr(m.config, "decoder", m.config), "vocab_size", None) if m is not None else None
                for m in (teacher_model, model)
            ]
            if teacher_model is None:
                sizes[0] = complete_cache_meta(args.teacher_logits_cache).get("vocab")
            self.vocab_rows_note = (
                f"rows 0-{vocab_rows - 1} (the tokenizer's {vocab_rows} tokens) of the teacher's {sizes[0]} and the "
                f"student's {sizes[1]}; the rest is embedding padding no token id reaches"
            )
            logger.warning("Token-level KD compares vocabulary %s.", self.vocab_rows_note)
        if any(getattr(o, "outside_forward", False) for o in self.objectives):
            # A module used outside the student's forward (the hidden-state projection): DDP must not look for
            # unused parameters (it would mark it unused, then fail when its gradient arrives).
            args = copy.copy(args)  # the caller's arguments stay as given
            args.ddp_find_unused_parameters = False
        if not args.nonfinite_check and args.logging_nan_inf_filter:
            # transformers' behaviour, except that a non-finite step shows as nan in the logged loss, never as 0
            args = copy.copy(args)
            args.logging_nan_inf_filter = False
        reference = teacher_model if teacher_model is not None else model
        self.nonfinite = NonFiniteWatch(next(reference.parameters()).dtype) if args.nonfinite_check else None
        forward_params = inspect.signature(reference.forward).parameters
        self.teacher_input_names = {
            n for n, p in forward_params.items() if p.kind is not p.VAR_KEYWORD and n not in LABEL_KEYS
        }
        self._position_limits = position_limits(*(m for m in (model, teacher_model) if m is not None))
        super().__init__(model=model, args=args, **kwargs)
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__") and len(self.train_dataset) == 0:
            raise ValueError("train_dataset is empty: there is nothing to train on. Pass a dataset with examples.")
        # see distributed.py; None: the teacher's outputs come from its cache alone
        self.teacher_model = (
            prepare_teacher(teacher_model, self.accelerator, args) if teacher_model is not None else None
        )
        warning = emulated_bf16_warning(args, self.accelerator.device)
        if warning:
            logger.warning(warning)
        self.accounting = TermAccounting(
            self.objectives, args.world_size, lambda t: self.accelerator.gather(t[None]).sum(0)
        )
        self._schedules = parse_schedules(args.schedules, args.term_weight_fields)
        self._scheduled_in_window: dict[str, float] = {}
        self.teacher_logits_cache = prepare_logits_cache(self) if args.teacher_logits_cache else None

    @property
    def transfers(self) -> list[SiteTransfer]:
        """The attention-transfer objectives, one per mapped site."""
        return [o for o in self.objectives if isinstance(o, SiteTransfer)]

    def objective(self, name: str):
        """The objective whose term is ``name`` (``"loss_kd"``, ``"loss_attn_enc"``, ...)."""
        for objective in self.objectives:
            if objective.name == name:
                return objective
        raise KeyError(f"No objective {name!r}; this trainer has {[o.name for o in self.objectives]}.")

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (CACHE_INDEX_COLUMN, KD_MASK_COLUMN, ON_POLICY_COLUMN):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ---- the loss ----

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Run teacher and student on ``inputs`` and combine the objectives' terms (see the class docstring).

        ``num_items_in_batch`` is accepted for the ``Trainer`` contract; normalisation uses each term's own
        window counts (:class:`~hf_attn_distill.training.accounting.TermAccounting`). Called on its own after ``train()``
        has taken capture off the models, it attaches capture for the call.
        """
        if not self.capture.attached:
            with self.attached():
                return self.compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = self._with_decoder_inputs(inputs)
        check_lengths(inputs, self._position_limits)
        cache_index = inputs.pop(CACHE_INDEX_COLUMN, None)
        on_policy = inputs.pop(ON_POLICY_COLUMN, None)
        step = Step(
            inputs,
            self.current_value,
            kd_mask=inputs.pop(KD_MASK_COLUMN, None),
            training=model.training,
            on_policy=on_policy is not None and bool(on_policy.any()),
        )
        if not model.training and not self.args.eval_with_teacher:
            return self._student_only_loss(model, inputs, return_outputs)
        objectives = self.objectives
        try:
            if any(o.needs_teacher for o in objectives):
                step.teacher_outputs = self._teacher_forward(step, cache_index)
            for objective in objectives:
                objective.start_student(step)
            kwargs = {k: v for o in objectives for k, v in o.student_forward_kwargs.items()}
            student_inputs = inputs
            for objective in objectives:
                student_inputs = objective.student_inputs(student_inputs)
            step.outputs = model(**student_inputs, **kwargs)
            for objective in objectives:
                objective.read_student(step)
            terms = {o.name: value for o in objectives if (value := o.loss(step)) is not None}
        except BaseException:
            self._stop()
            raise
        if not (model.training and torch.is_grad_enabled()):
            self._stop()  # else training_step stops after backward: checkpointing re-runs mapped layers there
        if model.training and self.nonfinite is not None:
            self.nonfinite.update(self.state.global_step + 1, {**step.teacher_outputs, **step.teacher_read}, terms)
        items = self.accounting.items(inputs if on_policy is None else {**inputs, ON_POLICY_COLUMN: on_policy})
        scales = self.accounting.scales(model.training, items)
        if model.training:
            self._scheduled_in_window = {name: self.current_value(name) for name in self._schedules}
        weight_of = {o.name: o.weight_field for o in objectives}
        loss = sum(
            self.current_value(weight_of[name]) * value * self.accounting.scale_of(name, scales)
            for name, value in terms.items()
        )
        self.accounting.add("train" if model.training else "eval", terms, items)
        return (loss, strip_outputs(step.outputs)) if return_outputs else loss

    def _teacher_forward(self, step: Step, cache_index):
        if self.teacher_model is None and (self.teacher_logits_cache is None or cache_index is None):
            raise ValueError(
                "This trainer has no teacher in memory (teacher_model=None: its outputs come from "
                "teacher_logits_cache), but this batch has no teacher_cache_index column to read them by: train on "
                "the trainer's train_dataset, and evaluate with eval_with_teacher=False."
            )
        if self.teacher_logits_cache is not None and cache_index is not None:
            if isinstance(self.teacher_logits_cache, TeacherTopKCache):
                ids, log_probs = self.teacher_logits_cache.lookup(cache_index, step.inputs["attention_mask"])
                return {TOP_K_IDS: ids, TOP_K_LOG_PROBS: log_probs}
            return {"logits": self.teacher_logits_cache.lookup(cache_index)}
        teacher_inputs = {k: v for k, v in step.inputs.items() if k in self.teacher_input_names}
        kwargs = {k: v for o in self.objectives for k, v in o.teacher_forward_kwargs.items()}
        with torch.inference_mode():
            for objective in self.objectives:
                objective.start_teacher(step.inputs)
            step.teacher_outputs = self.teacher_model(**teacher_inputs, **kwargs)
            for objective in self.objectives:
                objective.read_teacher(step)
        return step.teacher_outputs

    def current_value(self, name: str) -> float:
        """The temperature or loss weight ``name`` at this step: its configured value, moved along its schedule
        (:mod:`~hf_attn_distill.training.schedules`) by ``global_step / max_steps``."""
        start = getattr(self.args, name)
        if name not in self._schedules:
            return start
        kind, end = self._schedules[name]
        return scheduled_value(kind, start, end, self.state.global_step / max(self.state.max_steps, 1))

    def _student_only_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool):
        """Evaluation without the teacher (``eval_with_teacher=False``): the student's own task loss (a causal LM's
        over the tokens the trainer counts: none predicted from padding)."""
        if is_causal_lm(self.accelerator.unwrap_model(model)):
            inputs = mask_unpredictable_labels(inputs)
        outputs = model(**inputs)
        loss = outputs.get("loss")
        if loss is not None:
            items = self.accounting.items(inputs)
            self.accounting.add("eval", {"loss_ce": loss.float()}, items)
        return (loss, strip_outputs(outputs)) if return_outputs else loss

    def _stop(self) -> None:
        for objective in self.objectives:
            objective.stop()
        self.capture.stop()

    def _with_decoder_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return with_decoder_inputs(self.accelerator.unwrap_model(self.model), inputs)

    # ---- the Trainer loop ----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.lmbda > 0 and batch_samples:  # on-policy micro-batches, before the window is counted
            batch_samples = [self._maybe_on_policy(b, i) for i, b in enumerate(batch_samples)]
        if batch_samples:  # count the whole accumulation window before its first micro-batch
            self.accounting.start_window([self._with_decoder_inputs(b) for b in batch_samples], device)
        return batch_samples, num_items_in_batch

    def _maybe_on_policy(self, batch: dict[str, Any], micro_batch: int) -> dict[str, Any]:
        """``batch``, or (a ``lmbda`` share of micro-batches) its prompts with completions the student samples."""
        if not is_on_policy_step(self.args.seed, self.state.global_step, micro_batch, self.args.lmbda):
            return batch
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        student = self.accelerator.unwrap_model(self.model)
        config = student.generation_config
        eos = getattr(tokenizer, "eos_token_id", None) or config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else config.pad_token_id if config.pad_token_id is not None else eos or 0
        moved = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        return on_policy_batch(
            student, moved, self.args.on_policy_max_new_tokens, self.args.on_policy_temperature, pad, eos
        )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None):
        try:  # capture stays armed through backward: gradient checkpointing re-runs mapped layers there
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._stop()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint=True`` (or the string ``"true"``, as the command line
        gives it) resumes from the last *complete* checkpoint of ``output_dir``. When it ends, what the trainer
        attached to the models is taken off."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self.capture.attach()
        if self.nonfinite is not None:
            self.nonfinite.reset()
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            if self.nonfinite is not None:
                self.nonfinite.check()  # flags kept on an accelerator since the last log
            return output
        finally:
            self.accounting.end_window()  # the last window's counts must not scale later calls
            self.accounting.reset("train")  # terms after the last log must not leak into a later run
            self._stop()
            self.capture.release()

    @contextlib.contextmanager
    def attached(self):
        """Capture attached to the models for the duration (what ``train`` ends by taking off), e.g. to record
        attention maps after training."""
        was_attached = self.capture.attached
        self.capture.attach()
        try:
            yield self
        finally:
            self._stop()
            if not was_attached:
                self.capture.release()
