"""Causal LMs and encoder-decoders: the hard-label loss and logit KD from the last hidden states, without
``[tokens, vocab]`` logits.

A :class:`HeadTap` sits on a model's output head (``get_output_embeddings()``): while armed it records the hidden
states the model hands its head and passes the head only the last position, so the model's forward never makes its
full logits. :class:`LMHeadPass` then computes, once per step, the student's cross-entropy and the divergence from
the two models' hidden states through their heads, a chunk of tokens at a time
(:func:`~hf_attn_distill.terms.divergences.lm_head_losses`); ``loss_ce`` and ``loss_kd``
(:mod:`~hf_attn_distill.terms.logit`) read their sums from it. In a causal LM position ``t`` predicts token ``t + 1``:
the tokens that count are those whose next label is not ``-100`` (without labels: whose next token is not padding);
in an encoder-decoder decoder position ``t`` predicts label ``t``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from hf_attn_distill.terms.divergences import LMHeadSettings, lm_head_losses

__all__ = [
    "CAUSAL_LM_SUFFIXES",
    "is_seq2seq_lm",
    "label_mask",
    "mask_unpredictable_labels",
    "TOP_K_IDS",
    "TOP_K_LOG_PROBS",
    "HeadTap",
    "LMHeadPass",
    "is_causal_lm",
    "lm_head_pass",
    "next_token_mask",
    "top_k_teacher",
]

logger = logging.get_logger(__name__)

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # model classes whose loss shifts the labels by one
TOP_K_IDS, TOP_K_LOG_PROBS = "top_k_ids", "top_k_log_probs"
"""The teacher outputs a top-k teacher-logit cache stands in with: ``[B, T, k]`` ids and log-probabilities."""


def top_k_teacher(teacher_outputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ids, log_probs)`` ``[B, T, k]`` when the teacher's outputs come from a top-k cache, else ``None``."""
    if teacher_outputs is not None and TOP_K_IDS in teacher_outputs:
        return teacher_outputs[TOP_K_IDS], teacher_outputs[TOP_K_LOG_PROBS]
    return None


#: Config fields of models whose logits are more than a linear head of the last hidden states.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only LM whose loss predicts token ``t + 1`` at position ``t``."""
    config = getattr(model, "config", None)
    return not getattr(config, "is_encoder_decoder", False) and type(model).__name__.endswith(CAUSAL_LM_SUFFIXES)


def is_seq2seq_lm(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder with a generation head: its decoder position ``t`` predicts label
    ``t`` (the decoder inputs are the labels shifted right)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return bool(getattr(config, "is_encoder_decoder", False)) and head is not None


def label_mask(inputs: dict[str, Any]) -> torch.Tensor | None:
    """``[B, T]`` bool of an encoder-decoder's decoder positions that count (label ``!= -100``, else not decoder
    padding); ``None`` when every position counts."""
    labels, attention = inputs.get("labels"), inputs.get("decoder_attention_mask")
    if torch.is_tensor(labels) and labels.dim() == 2:
        return labels.ne(-100)
    if torch.is_tensor(attention) and attention.dim() == 2:
        return attention.bool()
    return None


def next_token_mask(inputs: dict[str, Any]) -> torch.Tensor | None:
    """``[B, T - 1]`` bool: the positions whose next token counts (next label ``!= -100``, else next token not
    padding) and that are tokens themselves (``attention_mask``); ``None`` when every position counts.

    The second condition matters with left padding only: the padding position just before a row's first token has
    no context (its attention sees padding alone), so predicting that token from it is not counted. ``transformers``'
    own causal-LM loss counts it, which also makes its value depend on how much padding the batch added."""
    labels, attention = inputs.get("labels"), inputs.get("attention_mask")
    attention = attention.bool() if torch.is_tensor(attention) and attention.dim() == 2 else None
    if torch.is_tensor(labels) and labels.dim() == 2:
        mask = labels[:, 1:].ne(-100)
    elif attention is not None:
        mask = attention[:, 1:]
    else:
        return None
    return mask if attention is None else mask & attention[:, :-1]


def mask_unpredictable_labels(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with each label whose position a causal LM predicts from padding set to ``-100`` (with left
    padding: a row's first token), so the model's own loss counts the tokens :func:`next_token_mask` counts;
    ``inputs`` itself when nothing changes."""
    labels = inputs.get("labels")
    mask = next_token_mask(inputs) if torch.is_tensor(labels) and labels.dim() == 2 else None
    if mask is None or bool(mask.eq(labels[:, 1:].ne(-100)).all()):
        return inputs
    labels = labels.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(~mask, -100)
    return {**inputs, "labels": labels}


class HeadTap:
    """A forward pre-hook on an output head; while armed it records the head's input (the last hidden states
    ``[B, T, H]``) and hands the head the last position only (logits ``[B, 1, V]``). Registered for as long as the
    trainer's :class:`~hf_attn_distill.attention.capture.Capture` is attached; disarmed at the end of every step."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.armed = False
        self.hidden: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None  # what the head computed its logits in (autocast's, or its own)
        self._handle = None

    def _hook(self, module, args):
        if not self.armed or not args:
            return None
        self.hidden = args[0]
        device = args[0].device.type
        autocast = torch.is_autocast_enabled(device)
        self.dtype = torch.get_autocast_dtype(device) if autocast else torch.result_type(args[0], module.weight)
        return (args[0][..., -1:, :].contiguous(), *args[1:])  # a strided slice makes linear a slow batched GEMV

    def register(self) -> None:
        if self._handle is None:
            self._handle = self.head.register_forward_pre_hook(self._hook)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def arm(self) -> None:
        self.armed, self.hidden, self.dtype = True, None, None

    def disarm(self) -> None:
        self.armed, self.hidden = False, None

    def take(self, who: str) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError(
                f"The {who}'s output head was not called on its hidden states during the forward, so the chunked LM "
                "loss has nothing to read: set chunked_lm_loss=False."
            )
        return self.hidden


def head_refusal(model: nn.Module) -> str | None:
    """Why ``model``'s logits cannot be computed from its last hidden states through its head alone (``None``: they
    can)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return f"{type(model).__name__} has no nn.Linear output head"
    config = model.config
    for name in HEAD_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0):
            return f"{type(model).__name__} transforms its head's output ({name}={value})"
    if getattr(model, "final_logits_bias", None) is not None:  # BART, Marian, Pegasus: a bias added after the head
        return f"{type(model).__name__} adds final_logits_bias to its head's output"
    return None


@contextlib.contextmanager
def gathered_head(model: nn.Module, head: nn.Module, who: str) -> Iterator[None]:
    """The head's parameters whole for the duration: under FSDP2 a model's head is a sharded ``DTensor`` outside its
    forward (a teacher run in inference mode is resharded after it), so its FSDP root gathers it (``unshard``)
    and shards it again after."""
    from torch.distributed.tensor import DTensor

    if not isinstance(head.weight, DTensor):
        yield
        return
    if not hasattr(model, "unshard"):
        raise RuntimeError(
            f"The {who}'s output head is sharded (a DTensor) but {type(model).__name__} is not the FSDP module that "
            "can gather it: set chunked_lm_loss=False."
        )
    # the teacher runs in inference mode, and so did the gathering of its parameters: gather them again in it
    frozen = torch.inference_mode() if who == "teacher" else contextlib.nullcontext()
    with frozen:
        model.unshard()
    try:
        yield
    finally:
        with frozen:
            model.reshard()


class LMHeadPass:
    """What one step's ``loss_ce`` and ``loss_kd`` of a causal-LM or encoder-decoder pair share: the taps on both
    heads and the two sums over the step's counted tokens, computed once (:meth:`sums`)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, args: Any):
        self.student, self.teacher = student, teacher
        self.student_tap = HeadTap(student.get_output_embeddings())
        self.teacher_tap = HeadTap(teacher.get_output_embeddings()) if teacher is not None else None
        self.args = args
        self.shifted = is_causal_lm(student)  # position t predicts token t + 1 (else label t: encoder-decoders)
        self.rows: torch.Tensor | None = None  # how many positions this step's sums are over
        self.vocab_rows: int | None = None  # set by LogitKD.vocab_rows: the rows of a padded vocabulary compared
        self.checked: set[str] = set()  # the models whose head was checked (at their first step)
        self._step = None
        self._sums: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    @property
    def taps(self) -> list[HeadTap]:
        return [t for t in (self.student_tap, self.teacher_tap) if t is not None]

    def sums(self, step) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(Σ cross-entropy, T² · Σ divergence)`` over the tokens of ``step`` that count (``None``: not computed:
        no labels or an on-policy batch, or no teacher)."""
        if self._step is step:
            return self._sums
        hidden = self.student_tap.take("student")
        cached = top_k_teacher(step.teacher_outputs)
        teacher_hidden = None
        if self.teacher_tap is not None and cached is None:
            teacher_hidden = self.teacher_tap.take("teacher")
            step.teacher_read["hidden states its output head reads"] = teacher_hidden
        with contextlib.ExitStack() as gathered:
            gathered.enter_context(gathered_head(self.student, self.student_tap.head, "student"))
            if teacher_hidden is not None:
                gathered.enter_context(gathered_head(self.teacher, self.teacher_tap.head, "teacher"))
            return self._sums_of(step, hidden, teacher_hidden, cached)

    def _sums_of(self, step, hidden, teacher_hidden, cached):
        if "student" not in self.checked and self._check(hidden, step.outputs, "student", self.student_tap):
            self.checked.add("student")
        if (
            teacher_hidden is not None
            and "teacher" not in self.checked
            and self._check(teacher_hidden, step.teacher_outputs, "teacher", self.teacher_tap)
        ):
            self.checked.add("teacher")
        labels = step.inputs.get("labels")
        targets = labels if torch.is_tensor(labels) and labels.dim() == 2 else None
        if step.on_policy:  # the student's own samples: no hard-label loss, so no cross-entropy to compute
            targets = None
        teachers = [teacher_hidden] if cached is None else list(cached)
        rows = hidden
        if self.shifted:
            mask = next_token_mask(step.inputs)
            rows, targets = rows[:, :-1], None if targets is None else targets[:, 1:]
            teachers = [None if t is None else t[:, :-1] for t in teachers]
        else:
            mask = label_mask(step.inputs)
        if mask is not None:
            rows, teachers = rows[mask], [None if t is None else t[mask] for t in teachers]
            targets = None if targets is None else targets[mask]
        else:
            rows = rows.reshape(-1, rows.shape[-1])
            teachers = [None if t is None else t.reshape(-1, t.shape[-1]) for t in teachers]
            targets = None if targets is None else targets.reshape(-1)
        t_rows = teachers[0] if cached is None else tuple(teachers)
        self.rows = torch.tensor(rows.shape[0], device=rows.device)
        args = self.args
        settings = LMHeadSettings(
            divergence=args.divergence,
            temperature=step.value("temperature"),
            jsd_beta=args.jsd_beta,
            skew_alpha=args.skew_alpha,
            chunk_tokens=args.lm_chunk_tokens,
            vocab_rows=self.vocab_rows,
            ce_weight=step.value("alpha_ce"),
            kd_weight=step.value("alpha_kd") if t_rows is not None else 0.0,
            top_k_tail=args.teacher_logits_tail,
        )
        teacher_head = self.teacher_tap.head if t_rows is not None and cached is None else None
        ce, kd = lm_head_losses(rows, self.student_tap.head, t_rows, teacher_head, targets, settings)
        self._step, self._sums = step, (ce if targets is not None else None, kd if t_rows is not None else None)
        return self._sums

    @staticmethod
    def _check(hidden: torch.Tensor, outputs, who: str, tap: HeadTap) -> bool:
        """The model's own logits of the last position must be its head applied to the recorded hidden states (in
        the dtype the head ran in: autocast's bfloat16 / float16, to that dtype's rounding); ``False`` when this
        step cannot tell: no such logits, or NaN / inf in either (the non-finite check names where those came
        from, and the next step checks again)."""
        logits = outputs.get("logits") if outputs is not None else None
        if logits is None or logits.shape[-2] != 1:
            return False
        head, dtype = tap.head, tap.dtype or logits.dtype
        with torch.no_grad():
            bias = None if head.bias is None else head.bias.to(dtype)
            want = F.linear(hidden[:, -1:].detach().to(dtype), head.weight.to(dtype), bias).float()
        if not (torch.isfinite(logits).all() and torch.isfinite(want).all()):
            return False
        tol = max(1e-3, 4 * torch.finfo(dtype).eps)  # the rounding of the logits' dtype; a transform is far larger
        if not torch.allclose(logits.float(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item())):
            raise ValueError(
                f"The {who}'s logits are not its output head applied to its last hidden states (the model transforms "
                "them after the head), so the chunked LM loss would differ from its own: set chunked_lm_loss=False."
            )
        return True

    def stop(self) -> None:
        self._step, self._sums, self.rows = None, (None, None), None


def lm_head_pass(student: nn.Module, teacher: nn.Module | None, args: Any, capture) -> LMHeadPass | None:
    """The trainer's shared :class:`LMHeadPass` (built once, its taps kept by ``capture``), or ``None`` when the
    pair trains on full logits: not a causal LM, ``chunked_lm_loss=False``, the teacher-logit cache, or a head that
    is more than a linear layer (said in a warning)."""
    if not (is_causal_lm(student) or is_seq2seq_lm(student)) or not getattr(args, "chunked_lm_loss", False):
        return None
    if args.teacher_logits_cache and not getattr(args, "teacher_logits_top_k", 0):
        return None
    if "lm_head_pass" in capture.shared:
        return capture.shared["lm_head_pass"]
    uses_teacher = teacher is not None and args.alpha_kd > 0  # None: its outputs come from a top-k cache
    reasons = [r for r in (head_refusal(student), head_refusal(teacher) if uses_teacher else None) if r]
    if reasons:
        logger.warning(
            "The LM loss is computed from full logits: %s (chunked_lm_loss needs a plain linear head).",
            "; ".join(reasons),
        )
        capture.shared["lm_head_pass"] = None
        return None
    head_pass = LMHeadPass(student, teacher if uses_teacher else None, args)
    for tap in head_pass.taps:
        capture.add_tap(tap)
    capture.shared["lm_head_pass"] = head_pass
    return head_pass
