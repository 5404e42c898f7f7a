"""``DistillTrainer``: a drop-in ``transformers.Trainer`` that distills a teacher into the student."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Trainer

from .attention_capture import AttentionRecorder, enable_attention_capture, verify_capture
from .attention_masks import attention_loss_count, recorded_quantity
from .config import DistillConfig
from .fused_transfer import TransferTarget
from .layer_map import resolve_layer_map
from .losses import group_teacher_heads, logit_kd_loss
from .model_structure import find_attention_modules
from .teacher_cache import CACHE_INDEX_COLUMN, TeacherLogitsCache

__all__ = ["KD_MASK_COLUMN", "DistillTrainer", "check_distillation_pair", "load_teacher"]

LABEL_KEYS = ("labels", "start_positions", "end_positions")
KD_MASK_COLUMN = "kd_mask"
"""Optional dataset column ``[seq_len]`` of 0/1: the positions token-position logits (extractive-QA
``start_logits``/``end_logits``) are distilled over. The trainer keeps it and never passes it to a model."""
LOGIT_KEYS = ("logits", "start_logits", "end_logits")
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


def _num_heads(model: PreTrainedModel) -> int:
    return int(model.config.num_attention_heads)


def check_distillation_pair(
    student: PreTrainedModel, teacher: PreTrainedModel, args: DistillConfig
) -> list[tuple[int, int]]:
    """Check that ``student`` can learn from ``teacher`` under ``args``; return the resolved layer map.

    Raises ``ValueError`` naming the fix for vocab or label-count mismatches, layer maps out of
    range and head counts that cannot be grouped.
    """
    s_cfg, t_cfg = student.config, teacher.config
    if getattr(s_cfg, "vocab_size", None) != getattr(t_cfg, "vocab_size", None):
        raise ValueError(
            f"Student vocab_size {s_cfg.vocab_size} != teacher vocab_size {t_cfg.vocab_size}: both models must "
            "read the same token ids. Build the student from the teacher (student_from_config / "
            "student_from_teacher_layers) or use a student trained with the teacher's tokenizer."
        )
    if args.alpha_kd > 0 and getattr(s_cfg, "num_labels", None) != getattr(t_cfg, "num_labels", None):
        raise ValueError(
            f"Student has num_labels={s_cfg.num_labels}, teacher num_labels={t_cfg.num_labels}: logit KD needs the "
            "same label set. Create the student with the teacher's num_labels/id2label."
        )
    if args.attention_weight == 0:
        return []
    pairs = resolve_layer_map(args.layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    s_heads, t_heads = _num_heads(student), _num_heads(teacher)
    if s_heads != t_heads and (args.head_grouping == "strict" or t_heads % s_heads != 0):
        divisors = [d for d in range(1, t_heads + 1) if t_heads % d == 0]
        reason = "head_grouping='strict'" if args.head_grouping == "strict" else "it is not a multiple of the student's"
        raise ValueError(
            f"Teacher has {t_heads} attention heads and student {s_heads}, and {reason}. Options: give the student "
            f"a head count that divides {t_heads} ({divisors}) with head_grouping='mean' (teacher heads are "
            "averaged in groups), or set attention_weight=0 to distill logits only."
        )
    return pairs


class DistillTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``alpha_ce * CE + alpha_kd * KD + attention_weight * ATT``.

    The teacher runs in eval mode under ``torch.inference_mode``, is never given to the optimizer and is not
    saved with student checkpoints. Only the layers in ``args.layer_map`` materialize attention (in
    both models); every other layer keeps the fused SDPA kernel. Each loss term is normalised over the
    whole gradient-accumulation window, so ``k`` micro-batches of ``n`` give the update of one batch
    of ``k * n`` (``loss_is_scaled_for_ga = True``). Loss terms are logged as ``loss_ce``, ``loss_kd``,
    ``loss_attn`` (train) and ``eval_loss_*`` (eval), averaged over items in the logging window and
    across processes.

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
        self.layer_pairs = check_distillation_pair(model, teacher_model, args)

        if args.teacher_dtype != "auto":
            teacher_model = teacher_model.to(getattr(torch, args.teacher_dtype))
        teacher_model.eval().requires_grad_(False)
        teacher_model.config.output_attentions = False
        teacher_model.config.output_hidden_states = False
        self._student_recorder = self._teacher_recorder = None
        if self.layer_pairs:
            enable_attention_capture(model)
            enable_attention_capture(teacher_model)
            loss = args.attention_loss
            s_mods, t_mods = find_attention_modules(model), find_attention_modules(teacher_model)
            self._student_recorder = AttentionRecorder([s_mods[s] for s, _ in self.layer_pairs], loss)
            self._teacher_recorder = AttentionRecorder([t_mods[t] for _, t in self.layer_pairs], loss)
            verify_capture(model, self._student_recorder)
            verify_capture(teacher_model, self._teacher_recorder)
        self._student_heads = _num_heads(model)
        forward_params = inspect.signature(teacher_model.forward).parameters
        self._teacher_input_names = {
            n for n, p in forward_params.items() if p.kind is not p.VAR_KEYWORD and n not in LABEL_KEYS
        }

        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self._window_items: torch.Tensor | None = None
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
            "teacher_weights_checksum": float(sum(p.detach().float().sum() for p in self.teacher_model.parameters())),
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

    def _batch_items(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(label items, attention items)`` of one batch: what the CE/KD and attention terms average over.

        Attention items are counted per head by :func:`~hf_attn_distill.attention_masks.attention_loss_count`
        for the configured loss: valid query rows for ``"kl"``, valid (query, key) entries for the MSE kinds.
        """
        labels = inputs.get("labels")
        input_ids = inputs.get("input_ids")
        reference = input_ids if input_ids is not None else next(v for v in inputs.values() if torch.is_tensor(v))
        if torch.is_tensor(labels) and labels.dim() > 1:
            label_items = labels.ne(-100).sum()
        else:
            label_items = torch.tensor(reference.shape[0], device=reference.device)
        mask = inputs.get("attention_mask")
        batch, length = reference.shape[:2]
        attention_items = attention_loss_count(
            self.args.attention_loss, 1, batch, length, length, key_mask=mask if torch.is_tensor(mask) else None,
            device=reference.device,
        )
        return label_items.float(), attention_items.to(label_items.device)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            totals = torch.stack([torch.stack(self._batch_items(b)).to(device) for b in batch_samples]).sum(0)
            if self.args.world_size > 1:
                totals = self.accelerator.gather(totals).view(-1, 2).sum(0)
            self._window_items = totals
        return batch_samples, num_items_in_batch

    def _scales(self, model: nn.Module, items: torch.Tensor) -> torch.Tensor:
        """Per-term multipliers turning micro-batch means into this micro-batch's share of the window mean."""
        if not model.training:
            return torch.ones_like(items)
        if self._window_items is None:  # compute_loss / training_step called outside the Trainer loop
            return torch.full_like(items, 1.0 / getattr(self, "current_gradient_accumulation_steps", 1))
        # DDP averages gradients over processes; multiply back so the result is the global mean.
        return items / self._window_items.to(items.device) * self.args.world_size

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._window_items = None  # the last window's counts must not scale later calls

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None):
        # Recording stays active through backward: gradient checkpointing re-runs mapped layers there.
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._stop_recording()

    def _stop_recording(self) -> None:
        for recorder in (self._student_recorder, self._teacher_recorder):
            if recorder is not None:
                recorder.stop()

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
                terms.append(logit_kd_loss(student_logits, teacher_logits, self.args.temperature, class_mask=positions))
                continue
            mask = None
            if student_logits.dim() == 3:  # token-level outputs: ignore -100 labels, else padding
                labels, attn = inputs.get("labels"), inputs.get("attention_mask")
                if torch.is_tensor(labels) and labels.shape == student_logits.shape[:2]:
                    mask = labels.ne(-100)
                elif torch.is_tensor(attn) and attn.shape == student_logits.shape[:2]:
                    mask = attn.bool()
            terms.append(logit_kd_loss(student_logits, teacher_logits, self.args.temperature, mask))
        return torch.stack(terms).mean()

    def _transfer_targets(self, teacher_att: list, inputs: Mapping) -> list[TransferTarget]:
        """One target per mapped student layer: the teacher's record, heads grouped to the student's count."""
        loss, heads = self.args.attention_loss, self._student_heads
        mask = inputs.get("attention_mask")
        if torch.is_tensor(mask) and bool(mask.all()):
            mask = None  # no padding: skip masking passes over [B, H, Q, K]
        quantity = recorded_quantity(loss)
        return [TransferTarget(group_teacher_heads(t, heads, quantity), loss, mask) for t in teacher_att]

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
        inputs = dict(inputs)
        cache_index = inputs.pop(CACHE_INDEX_COLUMN, None)
        kd_mask = inputs.pop(KD_MASK_COLUMN, None)
        if not model.training and not args.eval_with_teacher:
            return self._student_only_loss(model, inputs, return_outputs)
        use_attention = bool(self.layer_pairs)
        teacher_att: list = []
        if self.teacher_logits_cache is not None and cache_index is not None:
            teacher_outputs = {"logits": self.teacher_logits_cache.lookup(cache_index)}
        else:
            teacher_inputs = {k: v for k, v in inputs.items() if k in self._teacher_input_names}
            with torch.inference_mode():
                if use_attention:
                    self._teacher_recorder.start()
                try:
                    teacher_outputs = self.teacher_model(**teacher_inputs)
                    if use_attention:
                        teacher_att = self._teacher_recorder.collect()
                finally:
                    if use_attention:
                        self._teacher_recorder.stop()
        # The student's mapped layers take their attention loss inside their softmax (fused_transfer).
        layer_losses: list = []
        if use_attention:
            layer_losses = self._student_recorder.start(self._transfer_targets(teacher_att, inputs))
        del teacher_att
        keep_recording = use_attention and model.training and torch.is_grad_enabled()
        try:
            outputs = model(**inputs)
            if use_attention:
                layer_losses = self._student_recorder.collect()
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
        if use_attention:
            terms["loss_attn"] = torch.stack(layer_losses).mean()

        label_items, attention_items = self._batch_items(inputs)
        label_scale, attention_scale = self._scales(model, torch.stack([label_items, attention_items]))
        weights = {"loss_ce": args.alpha_ce, "loss_kd": args.alpha_kd, "loss_attn": args.attention_weight}
        loss = sum(
            weights[name] * value * (attention_scale if name == "loss_attn" else label_scale)
            for name, value in terms.items()
        )
        self._accumulate_terms("train" if model.training else "eval", terms, label_items, attention_items)
        return (loss, self._strip(outputs)) if return_outputs else loss

    def _student_only_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool):
        """Evaluation without the teacher (``eval_with_teacher=False``): the student's own task loss."""
        outputs = model(**inputs)
        loss = outputs.get("loss")
        if loss is not None:
            label_items, attention_items = self._batch_items(inputs)
            self._accumulate_terms("eval", {"loss_ce": loss.float()}, label_items, attention_items)
        return (loss, self._strip(outputs)) if return_outputs else loss

    @staticmethod
    def _strip(outputs):
        """Drop attentions and hidden states so they never reach ``predictions``."""
        stripped = [k for k in STRIPPED_OUTPUT_KEYS if outputs.get(k) is not None]
        if stripped:
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in stripped})
        return outputs

    # ---- logging of each term ----

    def _accumulate_terms(
        self, mode: str, terms: dict, label_items: torch.Tensor, attention_items: torch.Tensor
    ) -> None:
        sums = self._term_sums[mode]
        for name, value in terms.items():
            items = attention_items if name == "loss_attn" else label_items
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
        """Adds ``{prefix}_loss_ce/_loss_kd/_loss_attn`` to the metrics of ``evaluate`` and ``predict``."""
        self._term_sums["eval"].clear()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self._pop_term_means("eval").items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the terms averaged over its window
            logs.update(self._pop_term_means("train"))
        super().log(logs, start_time)
