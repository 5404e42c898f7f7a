"""Build a student from a teacher: a subset of its layers, or a smaller random-init copy of its config."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from transformers import PreTrainedModel

from .model_structure import find_encoder_layers

__all__ = ["student_from_config", "student_from_teacher_layers"]


def student_from_teacher_layers(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """DistilBERT-style initialisation: a copy of ``teacher`` that keeps only the given layers.

    Embeddings, pooler and task head are copied as they are; teacher layer ``layers[j]`` becomes
    student layer ``j``. The student has the teacher's class and config except for the layer count.

    Args:
        teacher: the fine-tuned teacher.
        layers: 0-based teacher layer indices, distinct, e.g. ``[1, 3, 5]`` for every other of 6.
    """
    _, teacher_layers = find_encoder_layers(teacher)
    num_layers = len(teacher_layers)
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("layers is empty: name at least one teacher layer to keep.")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"Teacher layers {bad} are out of range: the teacher has layers 0..{num_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Teacher layers {layers} repeat an index; each layer may be kept once.")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config).to(teacher.dtype)
    prefix = find_encoder_layers(student)[0] + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in layers:
                state[f"{prefix}{layers.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    student.load_state_dict(state, strict=True)
    return student


def student_from_config(teacher: PreTrainedModel, **overrides) -> PreTrainedModel:
    """A randomly initialised student with the teacher's class and config, changed by ``overrides``.

    Typical overrides: ``num_hidden_layers=4, hidden_size=312, num_attention_heads=12,
    intermediate_size=1200`` (TinyBERT-4L). When ``hidden_size`` changes and ``intermediate_size`` is not
    given, it becomes ``4 * hidden_size``. Vocabulary, labels and tokenizer-related fields stay the
    teacher's, so both models read the same inputs.
    """
    config = copy.deepcopy(teacher.config)
    for key, value in overrides.items():
        if key in ("vocab_size", "num_labels", "id2label", "label2id", "pad_token_id"):
            raise ValueError(f"{key} must stay the teacher's: student and teacher share tokenizer and labels.")
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no field {key!r}.")
        setattr(config, key, value)
    if "hidden_size" in overrides and "intermediate_size" not in overrides and hasattr(config, "intermediate_size"):
        config.intermediate_size = 4 * config.hidden_size
    heads = getattr(config, "num_attention_heads", None)
    if heads and config.hidden_size % heads != 0:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}.")
    return type(teacher)(config)
