"""``DistillTrainer``: a drop-in ``transformers.Trainer`` that distills a teacher into the student."""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .attention_transfer import SiteTransfer, plan_attention_transfer
from .config import DistillConfig
from .distributed import prepare_teacher
from .hidden_transfer import PROJECTION_NAME, plan_hidden_transfer
from .losses import logit_kd_loss
from .model_card import (
    CardInfo,
    card_metrics,
    count_parameters,
    describe_layers,
    distillation_method,
    distillation_settings,
    task_of,
    write_model_card,
)
from .relation_transfer import plan_relation_transfer
from .schedules import parse_schedules, scheduled_value
from .teacher_cache import CACHE_INDEX_COLUMN, TeacherLogitsCache, weights_checksum
from .token_kd import token_kd_loss

__all__ = [
    "KD_MASK_COLUMN",
    "DistillTrainer",
    "check_distillation_pair",
    "checkpoint_is_complete",
    "last_complete_checkpoint",
    "load_teacher",
    "teacher_label_order",
]

logger = logging.getLogger(__name__)
TRAINER_STATE_NAME = "trainer_state.json"

LABEL_KEYS = ("labels", "start_positions", "end_positions")
KD_MASK_COLUMN = "kd_mask"
"""Optional dataset column ``[seq_len]`` of 0/1: the positions token-position logits (extractive-QA
``start_logits``/``end_logits``) are distilled over. The trainer keeps it and never passes it to a model."""
LOGIT_KEYS = ("logits", "start_logits", "end_logits")
# The DistillConfig weight of each loss term (what `schedules` names).
TERM_WEIGHTS = {"loss_ce": "alpha_ce", "loss_kd": "alpha_kd", "loss_attn_enc": "attention_weight",
                "loss_attn_dec": "decoder_attention_weight", "loss_attn_cross": "cross_attention_weight",
                "loss_hidden": "hidden_weight", "loss_relation": "relation_weight"}
# Model outputs that must never reach `predictions` (large, and not predictions).
STRIPPED_OUTPUT_KEYS = (
    "attentions",
    "hidden_states",
    "encoder_attentions",
    "encoder_hidden_states",
    "decoder_attentions",
    "decoder_hidden_states",
    "cross_attentions",
)


def load_teacher(name_or_path: str, init_kwargs: dict | None = None) -> PreTrainedModel:
    """Load a teacher from the Hub or a folder with the class its config names.

    ``init_kwargs`` go to ``from_pretrained`` (``dtype``, ``revision``, ...); ``trust_remote_code`` is off
    unless it says otherwise.
    """
    kwargs = {"trust_remote_code": False, **(init_kwargs or {})}
    config_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "revision", "token") if k in kwargs}
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"Cannot tell which model class to load for teacher {name_or_path!r} (config.architectures="
            f"{architectures}); load it yourself and pass the model as teacher_model."
        )
    return model_class.from_pretrained(name_or_path, **kwargs)


def check_distillation_pair(
    student: PreTrainedModel, teacher: PreTrainedModel, args: DistillConfig
) -> list[SiteTransfer]:
    """Check that ``student`` can learn from ``teacher`` under ``args``; return the attention transfer per site.

    Raises ``ValueError`` naming the fix for vocab or label-count mismatches, different decoder start tokens,
    layer maps out of range or for a site the models lack, and head counts that cannot be grouped.
    """
    s_cfg, t_cfg = student.config, teacher.config
    s_vocab, t_vocab = _config_value(s_cfg, "vocab_size"), _config_value(t_cfg, "vocab_size")
    if s_vocab != t_vocab:
        raise ValueError(
            f"Student vocab_size {s_vocab} != teacher vocab_size {t_vocab}: both models must "
            "read the same token ids. Build the student from the teacher (student_from_config / "
            "student_from_teacher_layers) or use a student trained with the teacher's tokenizer."
        )
    if args.alpha_kd > 0 and getattr(s_cfg, "num_labels", None) != getattr(t_cfg, "num_labels", None):
        raise ValueError(
            f"Student has num_labels={s_cfg.num_labels}, teacher num_labels={t_cfg.num_labels}: logit KD needs the "
            "same label set. Create the student with the teacher's num_labels/id2label."
        )
    if args.alpha_kd > 0:
        teacher_label_order(student, teacher)  # raises when the label names differ
    s_start, t_start = _config_value(s_cfg, "decoder_start_token_id"), _config_value(t_cfg, "decoder_start_token_id")
    if s_start != t_start:
        raise ValueError(
            f"Student decoder_start_token_id {s_start} != teacher's {t_start}: both decoders must read the same target "
            "prefix. Set the student's config.decoder_start_token_id to the teacher's."
        )
    return plan_attention_transfer(student, teacher, args)


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


def _config_value(config, name: str):
    """``config.name``, or the decoder sub-config's for ``EncoderDecoderConfig``."""
    value = getattr(config, name, None)
    if value is None and getattr(config, "decoder", None) is not None:
        value = getattr(config.decoder, name, None)
    return value


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """A checkpoint is complete once its ``trainer_state.json``, written last by ``Trainer``, parses."""
    try:
        json.loads((Path(folder) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished; a save killed midway is skipped."""
    folders = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_is_complete(folder):
            return str(folder)
        logger.warning("Skipping %s: its save did not finish (no readable %s).", folder, TRAINER_STATE_NAME)
    return None


class DistillTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``alpha_ce * CE + alpha_kd * KD`` plus, per attention site,
    ``attention_weight * ATT_enc + decoder_attention_weight * ATT_dec + cross_attention_weight * ATT_cross``,
    plus ``hidden_weight * HIDDEN + relation_weight * RELATION`` when those are on.

    The teacher runs in eval mode under ``torch.inference_mode``, is never given to the optimizer and is not
    saved with student checkpoints. Only the layers of the site layer maps (``layer_map``,
    ``decoder_layer_map``, ``cross_layer_map``) materialize attention (in both models); every other layer keeps
    the fused SDPA kernel. Each loss term is normalised over the
    whole gradient-accumulation window, so ``k`` micro-batches of ``n`` give the update of one batch
    of ``k * n`` (``loss_is_scaled_for_ga = True``). Loss terms are logged as ``loss_ce``, ``loss_kd``,
    ``loss_attn_enc`` / ``loss_attn_dec`` / ``loss_attn_cross``, ``loss_hidden``, ``loss_relation`` (train)
    and ``eval_loss_*`` (eval), averaged over items in the logging window and across processes.

    Args:
        model: the student (a ``PreTrainedModel``).
        teacher_model: the teacher, or a Hub id / folder to load it from.
        args: a :class:`DistillConfig`.
        **kwargs: everything else ``Trainer`` takes (datasets, ``processing_class``, callbacks, ...).
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillConfig | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = DistillConfig(output_dir="tmp_trainer")
        if not isinstance(args, DistillConfig):
            raise TypeError(f"args must be a DistillConfig, got {type(args).__name__}: DistillConfig(**args.to_dict()).")
        if not isinstance(model, PreTrainedModel):
            raise TypeError("model must be the student, a transformers PreTrainedModel (model_init is not supported).")
        if teacher_model is None:
            raise ValueError("teacher_model is required: a PreTrainedModel, a Hub id or a folder.")
        if isinstance(teacher_model, str):
            teacher_model = load_teacher(teacher_model, args.teacher_model_init_kwargs)
        if teacher_model is model:
            raise ValueError("teacher_model is the student itself; pass a separate teacher.")
        self.transfers = check_distillation_pair(model, teacher_model, args)
        self.hidden_transfer = plan_hidden_transfer(model, teacher_model, args)  # before super(): optimizer, DDP
        if self.hidden_transfer is not None and self.hidden_transfer.projection is not None:
            # The projection runs on the outputs, outside the DDP-wrapped forward: DDP must not look for unused
            # parameters (it would mark the projection unused, then fail when its gradient arrives).
            if args.ddp_find_unused_parameters:
                raise ValueError(
                    "ddp_find_unused_parameters=True cannot be combined with the hidden-state projection (hidden_weight "
                    "> 0 with different widths), which is used outside the student's forward: leave "
                    "ddp_find_unused_parameters unset (DistillTrainer sets it to False) or set hidden_weight=0."
                )
            args.ddp_find_unused_parameters = False
            if args.world_size > 1 and args.alpha_ce == 0 and args.alpha_kd == 0:
                raise ValueError(
                    "With alpha_ce=0 and alpha_kd=0 the student's output head gets no gradient, which DDP refuses "
                    "without ddp_find_unused_parameters (off because of the hidden-state projection): keep alpha_kd "
                    "or alpha_ce > 0 in multi-process training, or use a student as wide as the teacher."
                )
        self.relation_transfer = plan_relation_transfer(model, teacher_model, args)
        # terms besides CE, KD and the attention sites, each with .term, .weight and .count(inputs)
        self._extra_terms = [t for t in (self.hidden_transfer, self.relation_transfer) if t is not None]
        self._teacher_label_order = teacher_label_order(model, teacher_model) if args.alpha_kd > 0 else None
        if any(p.device.type == "meta" for p in teacher_model.parameters()):
            raise ValueError(
                "The teacher has parameters on the 'meta' device (not loaded). Load it with real weights, e.g. "
                "from_pretrained(..., device_map=None), before passing it as teacher_model."
            )
        self._seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))

        if args.teacher_dtype != "auto":
            teacher_model = teacher_model.to(getattr(torch, args.teacher_dtype))
        teacher_model.eval().requires_grad_(False)
        teacher_model.config.output_attentions = False
        teacher_model.config.output_hidden_states = False
        forward_params = inspect.signature(teacher_model.forward).parameters
        self._teacher_input_names = {
            n for n, p in forward_params.items() if p.kind is not p.VAR_KEYWORD and n not in LABEL_KEYS
        }

        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = prepare_teacher(teacher_model, self.accelerator, args)  # see distributed.py
        self._window_items: torch.Tensor | None = None
        self._saving_checkpoint = False
        self._schedules = parse_schedules(args.schedules)
        self._scheduled_in_window: dict[str, float] = {}
        self._term_sums: dict[str, dict[str, list[torch.Tensor]]] = {"train": {}, "eval": {}}
        self.teacher_logits_cache = self._prepare_logits_cache() if args.teacher_logits_cache else None

    # ---- optional teacher-logit cache ----

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (CACHE_INDEX_COLUMN, KD_MASK_COLUMN):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _prepare_logits_cache(self) -> TeacherLogitsCache:
        """Index the training set, then compute teacher logits once (or reuse a matching cache)."""
        import datasets

        dataset = self.train_dataset
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError("teacher_logits_cache needs train_dataset to be a datasets.Dataset (rows are keyed by index).")
        if "start_positions" in inspect.signature(self.teacher_model.forward).parameters:
            raise ValueError(
                "teacher_logits_cache stores one sequence-level `logits` vector per example; a question-answering "
                "teacher returns start/end logits per token. Drop teacher_logits_cache for QA."
            )
        key = {
            "teacher": str(getattr(self.teacher_model.config, "_name_or_path", "")),
            "teacher_weights_checksum": weights_checksum(self.teacher_model),
            "dataset_fingerprint": dataset._fingerprint,
            "num_examples": len(dataset),
            "dtype": self.args.teacher_logits_cache_dtype,
        }
        if CACHE_INDEX_COLUMN not in dataset.column_names:
            dataset = dataset.add_column(CACHE_INDEX_COLUMN, list(range(len(dataset))))
        self.train_dataset = dataset
        cache = TeacherLogitsCache(self.args.teacher_logits_cache, key)
        if not cache.is_complete and self.is_world_process_zero():
            loader = torch.utils.data.DataLoader(
                self._remove_unused_columns(dataset, description="teacher cache"),
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=self.data_collator,
            )

            @torch.inference_mode()
            def forward(batch):
                inputs = {k: v.to(self.args.device) for k, v in batch.items() if k in self._teacher_input_names}
                return self.teacher_model(**inputs)["logits"]

            cache.build(loader, forward, len(dataset), self.args.teacher_logits_cache_dtype)
        self.accelerator.wait_for_everyone()
        return cache

    # ---- gradient accumulation: count items of the whole window before its first micro-batch ----

    def _batch_items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Float tensor ``[1 + sites + extra terms]``: label items of the CE/KD terms, then what each site's attention
        term averages over (per head; :meth:`SiteTransfer.count`), then what the hidden-state and relation terms
        average over (valid tokens), when they are on.

        Label items are examples for sequence-level heads and QA, and ``labels != -100`` tokens for
        token-level and sequence-to-sequence heads.
        """
        labels = inputs.get("labels")
        reference = next(v for v in inputs.values() if torch.is_tensor(v))
        if torch.is_tensor(labels) and labels.dim() > 1:
            label_items = labels.ne(-100).sum()
        else:
            label_items = torch.tensor(reference.shape[0], device=reference.device)
        counts = [t.count(inputs).to(reference.device) for t in self.transfers]
        counts += [t.count(inputs).to(reference.device) for t in self._extra_terms]
        return torch.stack([label_items.float(), *[c.float() for c in counts]])

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            totals = torch.stack([self._batch_items(self._with_decoder_inputs(b)).to(device) for b in batch_samples])
            totals = totals.sum(0)
            if self.args.world_size > 1:
                totals = self.accelerator.gather(totals).view(-1, totals.numel()).sum(0)
            self._window_items = totals
        return batch_samples, num_items_in_batch

    def _scales(self, model: nn.Module, items: torch.Tensor) -> torch.Tensor:
        """Per-term multipliers turning micro-batch means into this micro-batch's share of the window mean."""
        if not model.training:
            return torch.ones_like(items)
        if self._window_items is None:  # compute_loss / training_step called outside the Trainer loop: one batch
            return torch.ones_like(items)
        # DDP averages gradients over processes; multiply back so the result is the global mean.
        return items / self._window_items.to(items.device) * self.args.world_size

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except RuntimeError as err:
            if "size mismatch" not in str(err) and "Missing key" not in str(err) and "Unexpected key" not in str(err):
                raise
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} holds a student of another shape than this trainer's "
                f"({type(self.accelerator.unwrap_model(self.model)).__name__}, "
                f"{sum(p.numel() for p in self.model.parameters())} parameters): resume with the same student "
                "configuration, or start a new run (resume_from_checkpoint=None)."
            ) from err

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self._saving_checkpoint = True  # checkpoints keep the hidden-state projection, for resume
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student as a plain ``from_pretrained`` model: without the hidden-state projection, which
        only checkpoints keep."""
        student = self.accelerator.unwrap_model(self.model)
        projection = getattr(student, PROJECTION_NAME, None)
        if projection is None or self._saving_checkpoint:
            return super().save_model(output_dir, _internal_call)
        del student._modules[PROJECTION_NAME]
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            student.add_module(PROJECTION_NAME, projection)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        elif isinstance(resume_from_checkpoint, str) and not checkpoint_is_complete(resume_from_checkpoint):
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint} is incomplete (its save was interrupted: no readable "
                "trainer_state.json); resume from an earlier checkpoint, or with resume_from_checkpoint=True to pick "
                "the last complete one."
            )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._window_items = None  # the last window's counts must not scale later calls
            self._term_sums["train"].clear()  # terms after the last log must not leak into a later run

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None):
        # Recording stays active through backward: gradient checkpointing re-runs mapped layers there.
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._stop_recording()

    def _stop_recording(self) -> None:
        for transfer in self.transfers:
            transfer.student.stop()
            transfer.teacher.stop()
        if self.relation_transfer is not None:
            self.relation_transfer.student.stop()

    def _with_decoder_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """For encoder-decoder models, decoder inputs built once from the labels, so that teacher and student
        read the same target prefix."""
        inputs = dict(inputs)
        labels = inputs.get("labels")
        if self._seq2seq and torch.is_tensor(labels) and inputs.get("decoder_input_ids") is None:
            model = self.accelerator.unwrap_model(self.model)
            if not hasattr(model, "prepare_decoder_input_ids_from_labels"):
                raise ValueError(
                    f"{type(model).__name__} cannot build decoder inputs from labels; add decoder_input_ids to the batch "
                    "(e.g. with DataCollatorForSeq2Seq(tokenizer, model=model))."
                )
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        return inputs

    # ---- the loss ----

    def _kd_term(
        self, outputs: Mapping, teacher_outputs: Mapping, inputs: Mapping, kd_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
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
                positions = kd_mask if kd_mask is not None else inputs.get("attention_mask")
                terms.append(logit_kd_loss(student_logits, teacher_logits, self.current_value("temperature"), class_mask=positions))
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
                terms.append(token_kd_loss(student_logits, teacher_logits, self.current_value("temperature"), mask))
                continue
            if self._teacher_label_order is not None:  # same label names, other order
                teacher_logits = teacher_logits[..., self._teacher_label_order]
            terms.append(logit_kd_loss(student_logits, teacher_logits, self.current_value("temperature")))
        return torch.stack(terms).mean()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Run teacher and student on ``inputs`` and combine the loss terms (see the class docstring).

        ``num_items_in_batch`` is accepted for the ``Trainer`` contract; normalisation uses this
        trainer's own window counts, which also cover the attention term's own count.
        """
        args = self.args
        inputs = self._with_decoder_inputs(inputs)
        cache_index = inputs.pop(CACHE_INDEX_COLUMN, None)
        kd_mask = inputs.pop(KD_MASK_COLUMN, None)
        if not model.training and not args.eval_with_teacher:
            return self._student_only_loss(model, inputs, return_outputs)
        teacher_records: list[list] = []
        if self.teacher_logits_cache is not None and cache_index is not None:
            teacher_outputs = {"logits": self.teacher_logits_cache.lookup(cache_index)}
        else:
            teacher_inputs = {k: v for k, v in inputs.items() if k in self._teacher_input_names}
            with torch.inference_mode():
                for transfer in self.transfers:
                    transfer.teacher.start()
                if self.hidden_transfer is not None:
                    teacher_inputs["output_hidden_states"] = True
                if self.relation_transfer is not None:
                    self.relation_transfer.teacher.start()
                try:
                    teacher_outputs = self.teacher_model(**teacher_inputs)
                    teacher_records = [transfer.teacher.collect() for transfer in self.transfers]
                    if self.relation_transfer is not None:
                        teacher_states = self.relation_transfer.teacher.states()
                finally:
                    for transfer in self.transfers:
                        transfer.teacher.stop()
                    if self.relation_transfer is not None:
                        self.relation_transfer.teacher.stop()
        # The student's mapped layers take their attention loss inside their softmax (fused_transfer).
        for transfer, records in zip(self.transfers, teacher_records):
            transfer.student.start(transfer.targets(records, inputs))
        del teacher_records
        if self.relation_transfer is not None:
            self.relation_transfer.student.start()
        keep_recording = bool(self.transfers or self.relation_transfer) and model.training and torch.is_grad_enabled()
        try:
            outputs = model(**inputs, **({"output_hidden_states": True} if self.hidden_transfer is not None else {}))
            layer_losses = [transfer.student.collect() for transfer in self.transfers]
            student_states = self.relation_transfer.student.states() if self.relation_transfer is not None else None
            if keep_recording and student_states is not None and not student_states[0].requires_grad:
                raise RuntimeError(
                    f"The student's queries, keys and values at relation_student_layer="
                    f"{self.relation_transfer.student_layer} carry no gradient (reentrant gradient checkpointing "
                    "turned on on the model, or that layer frozen), so loss_relation would train nothing: enable "
                    "checkpointing with use_reentrant=False, or unfreeze the layer."
                )
        finally:
            if not keep_recording:  # else training_step stops it after backward
                self._stop_recording()

        terms: dict[str, torch.Tensor] = {}
        if outputs.get("loss") is not None:
            terms["loss_ce"] = outputs["loss"].float()
        elif args.alpha_ce > 0:
            raise ValueError(
                "alpha_ce > 0 but the student returned no loss: the batch has no labels "
                f"({', '.join(LABEL_KEYS)}). Add a label column or set alpha_ce=0 for unlabeled transfer data."
            )
        if args.alpha_kd > 0:
            terms["loss_kd"] = self._kd_term(outputs, teacher_outputs, inputs, kd_mask)
        for transfer, losses in zip(self.transfers, layer_losses):
            terms[transfer.term] = torch.stack(losses).mean()
        if self.hidden_transfer is not None:
            terms[self.hidden_transfer.term] = self.hidden_transfer(
                outputs.get("hidden_states"), teacher_outputs.get("hidden_states"), inputs.get("attention_mask"))
        if self.relation_transfer is not None:
            terms[self.relation_transfer.term] = self.relation_transfer.loss(
                student_states, teacher_states, inputs.get("attention_mask"))
            del student_states, teacher_states

        items = self._batch_items(inputs)
        scales = self._scales(model, items)
        weights = {term: self.current_value(TERM_WEIGHTS[term]) for term in terms}
        if model.training:
            self._scheduled_in_window = {name: self.current_value(name) for name in self._schedules}
        loss = sum(weights[name] * value * scales[self._item_index(name)] for name, value in terms.items())
        self._accumulate_terms("train" if model.training else "eval", terms, items)
        return (loss, self._strip(outputs)) if return_outputs else loss

    def current_value(self, name: str) -> float:
        """The temperature or loss weight ``name`` at this step: its configured value, moved along its schedule
        (:mod:`~hf_attn_distill.schedules`) by ``global_step / max_steps``."""
        start = getattr(self.args, name)
        if name not in self._schedules:
            return start
        kind, end = self._schedules[name]
        return scheduled_value(kind, start, end, self.state.global_step / max(self.state.max_steps, 1))

    def _item_index(self, term: str) -> int:
        """Which entry of :meth:`_batch_items` a term averages over."""
        for index, transfer in enumerate(self.transfers, start=1):
            if transfer.term == term:
                return index
        for index, extra in enumerate(self._extra_terms, start=1 + len(self.transfers)):
            if extra.term == term:
                return index
        return 0

    def _student_only_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool):
        """Evaluation without the teacher (``eval_with_teacher=False``): the student's own task loss."""
        outputs = model(**inputs)
        loss = outputs.get("loss")
        if loss is not None:
            self._accumulate_terms("eval", {"loss_ce": loss.float()}, self._batch_items(inputs))
        return (loss, self._strip(outputs)) if return_outputs else loss

    @staticmethod
    def _strip(outputs):
        """Drop attentions and hidden states so they never reach ``predictions``."""
        stripped = [k for k in STRIPPED_OUTPUT_KEYS if outputs.get(k) is not None]
        if stripped:
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in stripped})
        return outputs

    # ---- logging of each term ----

    def _accumulate_terms(self, mode: str, terms: dict, batch_items: torch.Tensor) -> None:
        sums = self._term_sums[mode]
        for name, value in terms.items():
            items = batch_items[self._item_index(name)]
            total = torch.stack([value.detach().float() * items, items])
            sums[name] = [sums[name][0] + total] if name in sums else [total]

    def _pop_term_means(self, mode: str) -> dict[str, float]:
        """Item-weighted mean of each term accumulated in ``mode`` (all processes), then reset."""
        sums = self._term_sums[mode]
        if not sums:
            return {}
        names = sorted(sums)
        totals = torch.stack([sums[n][0] for n in names])  # [terms, (weighted sum, items)]
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        sums.clear()
        return {name: weighted / max(items, 1.0) for name, (weighted, items) in zip(names, totals.tolist())}

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """Adds ``{prefix}_loss_ce``, ``_loss_kd``, each site's ``_loss_attn_*``, ``_loss_hidden`` and
        ``_loss_relation`` (those that are on) to the metrics of ``evaluate`` and ``predict``."""
        self._term_sums["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._pop_term_means("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the terms averaged over its window, and the scheduled values
            logs.update(self._pop_term_means("train"))
            logs.update(self._scheduled_in_window)  # the values the logged window was trained with
        super().log(logs, start_time)

    _tag_names: ClassVar[list[str]] = ["hf_attn_distill", "knowledge-distillation"]

    def card_info(self, **fields) -> CardInfo:
        """What :meth:`create_model_card` writes: the student, teacher and objective this trainer holds, the last
        evaluation's metrics, and ``fields`` overriding any :class:`~hf_attn_distill.model_card.CardInfo` field."""
        student = self.accelerator.unwrap_model(self.model)
        evals = [e for e in self.state.log_history if any(k.startswith("eval_") for k in e)]
        metrics, _ = card_metrics(evals[-1] if evals else {}, "eval")
        teacher_name = getattr(self.teacher_model.config, "_name_or_path", "") or type(self.teacher_model).__name__
        defaults = {
            "model_name": self.args.hub_model_id or Path(self.args.output_dir).name, "task": task_of(student),
            "repo_id": getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            "teacher": teacher_name, "dataset": "custom", "eval_split": "evaluation set",
            "method": distillation_method(self.args), "student_params": count_parameters(student),
            "teacher_params": count_parameters(self.teacher_model), "student_layers": describe_layers(student),
            "metrics": metrics, "settings": distillation_settings(self.args),
        }
        return CardInfo(**{**defaults, **fields})

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **card_fields,
    ) -> CardInfo | None:
        """Write the distillation card (Hub metadata with ``model-index``, teacher vs student, objective, usage,
        citations) as ``README.md`` in ``output_dir``. Takes ``Trainer.create_model_card``'s arguments, so
        ``push_to_hub`` writes it too; ``card_fields`` set :class:`~hf_attn_distill.model_card.CardInfo` fields
        (``teacher_metrics``, ``eval_split``, latencies, ...). Tags and ``dataset_args`` are not used. Returns
        what the card says (``None`` on other processes than the main one)."""
        if not self.is_world_process_zero():
            return None
        given = {"language": [language] if isinstance(language, str) else language, "license": license,
                 "model_name": model_name, "teacher": finetuned_from,
                 "task": tasks[0] if isinstance(tasks, list) else tasks,
                 "dataset": (dataset[0] if isinstance(dataset, list) else dataset)
                 or (dataset_tags[0] if isinstance(dataset_tags, list) else dataset_tags)}
        try:
            info = self.card_info(**{k: v for k, v in given.items() if v}, **card_fields)
        except ValueError as err:  # a task our card does not describe: transformers' generic card
            logger.warning("Writing transformers' generic model card: %s", err)
            super().create_model_card(language, license, tags, model_name, finetuned_from, tasks, dataset_tags,
                                      dataset, dataset_args)
            return None
        write_model_card(self.args.output_dir, info)
        return info
