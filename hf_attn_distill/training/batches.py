"""What happens to a batch around the two forwards: decoder inputs built once for both models, and outputs
stripped of what must never reach ``predictions``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["STRIPPED_OUTPUT_KEYS", "check_lengths", "position_limits", "strip_outputs", "with_decoder_inputs"]

STRIPPED_OUTPUT_KEYS = (
    "attentions",
    "hidden_states",
    "encoder_attentions",
    "encoder_hidden_states",
    "decoder_attentions",
    "decoder_hidden_states",
    "cross_attentions",
)
"""Model outputs that never reach ``predictions`` (large, and not predictions)."""


def with_decoder_inputs(model, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``inputs``; for an encoder-decoder ``model`` with ``labels`` and no ``decoder_input_ids``, the
    decoder inputs built once from the labels, so that teacher and student read the same target prefix."""
    inputs = dict(inputs)
    labels = inputs.get("labels")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq and torch.is_tensor(labels) and inputs.get("decoder_input_ids") is None:
        if not hasattr(model, "prepare_decoder_input_ids_from_labels"):
            raise ValueError(
                f"{type(model).__name__} cannot build decoder inputs from labels; add decoder_input_ids to the batch "
                "(e.g. with DataCollatorForSeq2Seq(tokenizer, model=model))."
            )
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    return inputs


def strip_outputs(outputs):
    """``outputs`` without attentions and hidden states."""
    stripped = [k for k in STRIPPED_OUTPUT_KEYS if outputs.get(k) is not None]
    if stripped:
        outputs = type(outputs)(**{k: v for k, v in outputs.items() if k not in stripped})
    return outputs


def position_limits(*models) -> dict[str, tuple[int, str]]:
    """``{input name: (most tokens, model)}``: how long ``input_ids`` and ``decoder_input_ids`` may be for every one
    of ``models`` whose positions have a size (``max_position_embeddings``: learned absolute positions, and rotary
    ones, which were not trained past it); relative positions (T5's, ``position_embedding_type`` other than
    ``"absolute"``) set no limit."""
    limits: dict[str, tuple[int, str]] = {}
    for model in models:
        config = model.config
        sides = {
            "input_ids": getattr(config, "encoder", config),
            "decoder_input_ids": getattr(config, "decoder", config),
        }
        for key, side in sides.items():
            if getattr(side, "position_embedding_type", "absolute") != "absolute":
                continue
            positions = getattr(side, "max_position_embeddings", None)
            if isinstance(positions, int) and (key not in limits or positions < limits[key][0]):
                limits[key] = (positions, type(model).__name__)
    return limits


def check_lengths(
    inputs: Mapping[str, Any], limits: dict[str, tuple[int, str]], flags: Mapping[str, str] | None = None
) -> None:
    """Raise ``ValueError`` naming the fix when an input is longer than :func:`position_limits` allows. ``inputs``
    maps input names (``input_ids``, ``decoder_input_ids``) to a batch tensor, or to the length a command-line flag
    asks for, with ``flags`` naming that flag (``{"input_ids": "--max_seq_length"}``)."""
    for key, (positions, model) in limits.items():
        value = inputs.get(key)
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[-1] > positions:
            raise ValueError(
                f"A batch has {key} of {value.shape[-1]} tokens, but {model} has only {positions} positions: "
                f"truncate the inputs to at most {positions} tokens (tokenizer max_length / --max_seq_length)."
            )
        if isinstance(value, int) and value > positions:
            flag = (flags or {}).get(key, key)
            raise ValueError(
                f"{flag}={value} but {model} has only {positions} positions: lower {flag} to at most {positions}."
            )
