"""Generation-based evaluation for encoder-decoder students: ``Seq2SeqTrainer`` plus distillation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from hf_attn_distill.config import DistillConfig
from hf_attn_distill.trainer import DistillTrainer

__all__ = ["DistillSeq2SeqConfig", "DistillSeq2SeqTrainer"]


@dataclass
class DistillSeq2SeqConfig(DistillConfig, Seq2SeqTrainingArguments):
    r"""
    [`DistillConfig`] plus [`~transformers.Seq2SeqTrainingArguments`]: `predict_with_generate`,
    `generation_max_length`, `generation_num_beams`, `generation_config`, `sortish_sampler`. Every field keeps
    the meaning documented in those two classes.
    """


class DistillSeq2SeqTrainer(DistillTrainer, Seq2SeqTrainer):
    """:class:`DistillTrainer` whose evaluation can generate, as ``Seq2SeqTrainer`` does.

    With ``predict_with_generate`` the predictions are generated token ids (``generation_max_length``,
    ``generation_num_beams``), for ``compute_metrics`` such as
    :class:`~hf_attn_distill.tasks.metrics.TranslationMetrics`; the reported ``eval_loss`` is still the distillation
    loss and the per-term ``eval_loss_*`` are still computed on the same batches (teacher forcing).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if not isinstance(kwargs.get("args"), DistillSeq2SeqConfig):
            raise TypeError("args must be a DistillSeq2SeqConfig (DistillConfig + Seq2SeqTrainingArguments).")
        super().__init__(*args, **kwargs)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs,
    ):
        if not self.args.predict_with_generate or prediction_loss_only:
            # Trainer.prediction_step, which calls compute_loss (all terms)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        loss = None
        if "labels" in inputs:  # the distillation loss, on teacher-forced targets (all terms)
            with torch.no_grad():
                loss = self.compute_loss(model, self._prepare_inputs(inputs)).detach()
        # Generation only: without labels, Seq2SeqTrainer.prediction_step runs no second loss forward.
        generation_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        labels = inputs.get("labels")
        decoder_ids = inputs.get("decoder_input_ids")
        if torch.is_tensor(labels) and torch.is_tensor(decoder_ids) and decoder_ids.shape == labels.shape:
            # built from the labels: let the model generate freely (as Seq2SeqTrainer does)
            generation_inputs = {
                k: v for k, v in generation_inputs.items() if k not in ("decoder_input_ids", "decoder_attention_mask")
            }
        _, generated, _ = Seq2SeqTrainer.prediction_step(
            self, model, generation_inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs
        )
        if torch.is_tensor(labels):
            labels = self._prepare_inputs({"labels": labels})["labels"]
            config = self.model.generation_config
            if labels.shape[-1] < config.max_length:
                labels = self._pad_tensors_to_max_len(labels, config.max_length)
            elif config.max_new_tokens is not None and labels.shape[-1] < config.max_new_tokens + 1:
                labels = self._pad_tensors_to_max_len(labels, config.max_new_tokens + 1)
        return loss, generated, labels
