"""Build a student from a teacher: a subset of its layers, or a smaller random-init copy of its config."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from transformers import PretrainedConfig, PreTrainedModel

from hf_attn_distill.attention.sites import find_layer_stacks

__all__ = ["student_from_config", "student_from_teacher_layers"]


def student_from_teacher_layers(
    teacher: PreTrainedModel, layers: Sequence[int], decoder_layers: Sequence[int] | None = None
) -> PreTrainedModel:
    """DistilBERT-style initialisation: a copy of ``teacher`` that keeps only the given layers.

    Embeddings, pooler and task head are copied as they are; teacher layer ``layers[j]`` becomes
    student layer ``j``. The student has the teacher's class and config except for the layer counts.
    Encoder-decoder teachers (``EncoderDecoderModel``, BART, Marian) keep ``layers`` of the encoder and
    ``decoder_layers`` of the decoder.

    Args:
        teacher: the fine-tuned teacher.
        layers: 0-based teacher (encoder) layer indices, distinct, e.g. ``[1, 3, 5]`` for every other of 6.
        decoder_layers: for encoder-decoder teachers, the decoder layers to keep.
    """
    stacks = find_layer_stacks(teacher)
    keep = {"encoder": layers, "decoder": decoder_layers}
    if "decoder" in stacks and "encoder" not in stacks:  # decoder-only: ``layers`` are its layers
        keep = {"decoder": layers}
    if "encoder" in stacks and "decoder" in stacks and decoder_layers is None:
        raise ValueError(f"{type(teacher).__name__} has a decoder too: give decoder_layers as well.")
    if decoder_layers is not None and not ("encoder" in stacks and "decoder" in stacks):
        raise ValueError(f"decoder_layers given, but {type(teacher).__name__} has no separate decoder.")
    keep = {stack: [int(i) for i in chosen] for stack, chosen in keep.items() if stack in stacks}
    for stack, chosen in keep.items():
        num_layers = len(stacks[stack][1])
        if not chosen:
            raise ValueError(f"{stack} layers are empty: name at least one teacher layer to keep.")
        bad = [i for i in chosen if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"Teacher {stack} layers {bad} are out of range: the teacher has layers 0..{num_layers - 1}."
            )
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"Teacher {stack} layers {chosen} repeat an index; each layer may be kept once.")
    student = type(teacher)(_with_layer_counts(teacher, {s: len(c) for s, c in keep.items()})).to(teacher.dtype)
    prefixes = {stack: name + "." for stack, (name, _) in find_layer_stacks(student).items()}
    state = {}
    for key, value in teacher.state_dict().items():
        stack = next((s for s, p in prefixes.items() if key.startswith(p)), None)
        if stack is None:
            state[key] = value
            continue
        index, rest = key[len(prefixes[stack]) :].split(".", 1)
        if int(index) in keep[stack]:
            state[f"{prefixes[stack]}{keep[stack].index(int(index))}.{rest}"] = value
    student.load_state_dict(state, strict=True)
    return student


def _with_layer_counts(teacher: PreTrainedModel, counts: dict[str, int]) -> PretrainedConfig:
    """A copy of the teacher's config with ``counts`` layers per stack."""
    config = copy.deepcopy(teacher.config)
    if "encoder" in counts and "decoder" in counts:
        if isinstance(getattr(config, "encoder", None), PretrainedConfig):  # EncoderDecoderConfig
            config.encoder.num_hidden_layers = counts["encoder"]
            config.decoder.num_hidden_layers = counts["decoder"]
        elif hasattr(config, "encoder_layers") and hasattr(config, "decoder_layers"):  # BART, Marian, ...
            config.encoder_layers, config.decoder_layers = counts["encoder"], counts["decoder"]
        else:
            raise ValueError(
                f"Cannot set the layer counts of {type(config).__name__} (T5 keeps its relative position bias in "
                "layer 0 only); build the student with student_from_config instead."
            )
    else:
        config.num_hidden_layers = next(iter(counts.values()))
    return config


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
