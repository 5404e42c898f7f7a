"""Evaluation and prediction in the order of the evaluated dataset, also with ``group_by_length``.

Since transformers 4.46 ``Trainer`` evaluates in length-grouped order whenever training does
(``train_sampling_strategy="group_by_length"``, formerly ``group_by_length=True``): ``predict(ds).predictions[i]``
is then no longer the prediction of ``ds[i]``. Metrics computed from the predictions and their own
``label_ids`` survive that, but every metric that pairs predictions with the dataset does not: SQuAD
post-processing maps features back to their examples by position, and translation scores against the raw
reference sentences in split order. Both then report near-zero scores for a well-trained model, silently (a
Multi30k teacher read 1.1 BLEU instead of 24; ``benchmarks/checks/group_by_length.py``).
:class:`InOrderEvaluationMixin` keeps training length-grouped and evaluates in dataset order.
"""

from __future__ import annotations

from torch.utils.data import SequentialSampler
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import has_length

from hf_attn_distill.training.checkpoints import SaveGuardMixin
from hf_attn_distill.training.eval_rng import RNGPreservingEvaluationMixin

__all__ = ["InOrderEvaluationMixin", "InOrderSeq2SeqTrainer", "InOrderTrainer"]


class InOrderEvaluationMixin:
    """A ``Trainer`` mixin: evaluation and prediction visit the dataset in its order, whatever the training sampler.

    With one process the evaluation sampler is sequential; with several it is ``None``, as in ``Trainer`` without
    ``group_by_length`` (accelerate then shards the dataset in order and gathers it back in order).
    """

    def _get_eval_sampler(self, eval_dataset):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


class InOrderTrainer(SaveGuardMixin, InOrderEvaluationMixin, RNGPreservingEvaluationMixin, Trainer):
    """``transformers.Trainer`` that evaluates in dataset order without changing the training's random draws (the
    recipes' ``finetune`` mode and teacher scores) and says so when a save fills the disk."""


class InOrderSeq2SeqTrainer(SaveGuardMixin, InOrderEvaluationMixin, RNGPreservingEvaluationMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` that evaluates in dataset order without changing the training's random draws
    and says so when a save fills the disk."""
