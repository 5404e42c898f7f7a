"""Loading the teacher and checking that a student can learn from it, without changing either model."""

from __future__ import annotations

from pathlib import Path

import transformers
from transformers import AutoConfig, PreTrainedModel

from hf_attn_distill.config import DistillConfig
from hf_attn_distill.terms.attention import check_attention_sites
from hf_attn_distill.terms.logit import teacher_label_order
from hf_attn_distill.training.teacher_cache import complete_cache_meta

__all__ = [
    "check_distillation_pair",
    "check_same_tokenizer",
    "load_teacher",
    "load_teacher_tokenizer",
    "resolve_teacher",
    "shared_vocab_rows",
]


def load_teacher(name_or_path: str, init_kwargs: dict | None = None) -> PreTrainedModel:
    """Load a teacher from the Hub or a folder with the class its config names.

    ``init_kwargs`` go to ``from_pretrained`` (``dtype``, ``revision``, ...); ``trust_remote_code`` is off
    unless it says otherwise. A name that is neither an existing folder nor a valid Hub id raises naming both.
    """
    if not Path(name_or_path).expanduser().is_dir():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            raise FileNotFoundError(
                f"teacher_model={name_or_path!r}: there is no folder at {Path(name_or_path).expanduser()}, and it is "
                "not a Hub id ('name' or 'org/name'). Pass an existing folder, a Hub id or a loaded model."
            ) from None
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


def resolve_teacher(model, teacher_model, args) -> PreTrainedModel | None:
    """The teacher ``DistillTrainer(model=..., teacher_model=..., args=...)`` means, loaded when given as a Hub id
    or folder; raises naming the fix for arguments of the wrong kind."""
    if not isinstance(args, DistillConfig):
        raise TypeError(f"args must be a DistillConfig, got {type(args).__name__}: DistillConfig(**args.to_dict()).")
    if not isinstance(model, PreTrainedModel):
        raise TypeError("model must be the student, a transformers PreTrainedModel (model_init is not supported).")
    if teacher_model is None:
        if complete_cache_meta(getattr(args, "teacher_logits_cache", None)) is not None:
            return None  # its outputs come from the cache alone
        raise ValueError(
            "teacher_model is required: a PreTrainedModel, a Hub id or a folder (or None with a finished "
            "teacher_logits_cache, built once by a run with the teacher)."
        )
    if isinstance(teacher_model, str):
        teacher_model = load_teacher(teacher_model, args.teacher_model_init_kwargs)
    if teacher_model is model:
        raise ValueError("teacher_model is the student itself; pass a separate teacher.")
    return teacher_model


def _config_value(config, name: str):
    """``config.name``, or the decoder sub-config's for ``EncoderDecoderConfig``."""
    value = getattr(config, name, None)
    if value is None and getattr(config, "decoder", None) is not None:
        value = getattr(config.decoder, name, None)
    return value


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Refuse two tokenizers that give the same ids to different tokens (naming the first ids that differ): logit
    KD would match unrelated tokens, and attention transfer unrelated positions. Identical vocabularies pass."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    by_id = [{i: token for token, i in vocab.items()} for vocab in (teacher_vocab, student_vocab)]
    differ = sorted(i for i in set(by_id[0]) | set(by_id[1]) if by_id[0].get(i) != by_id[1].get(i))
    shown = "; ".join(f"id {i}: teacher {by_id[0].get(i)!r}, student {by_id[1].get(i)!r}" for i in differ[:3])
    raise ValueError(
        f"The student's tokenizer ({len(student_vocab)} tokens) and the teacher's ({len(teacher_vocab)}) give "
        f"{len(differ)} ids different tokens (first: {shown}): logit KD would match unrelated tokens. Use a student "
        "trained with the teacher's tokenizer, or build one from the teacher (student_from_teacher_layers / "
        "student_from_config); distilling across tokenizers needs a token alignment, which this trainer does not do."
    )


def load_teacher_tokenizer(name_or_path: str, init_kwargs: dict | None = None):
    """The tokenizer saved with a teacher given as a folder or Hub id, or ``None`` when it has none."""
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (init_kwargs or {}).items() if k in ("revision", "token", "trust_remote_code")}
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError):
        return None


def shared_vocab_rows(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer=None) -> int | None:
    """How many vocabulary rows token-level KD compares: ``None`` (all) when both embeddings have the same size;
    ``len(tokenizer)`` when they differ but ``tokenizer`` (shared by both models) fits both, as when one family
    pads its embedding matrices differently (Qwen2.5: 152,064 rows for 7B, 151,936 for 0.5B): the rows past the
    tokenizer are padding that no token id reaches, so KD over the first ``len(tokenizer)`` rows is exact.
    Raises ``ValueError`` naming the fix otherwise."""
    s_vocab = _config_value(student.config, "vocab_size")
    t_vocab = _config_value(teacher.config, "vocab_size")
    if s_vocab == t_vocab:
        return None
    rows = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    if rows is not None and rows <= min(s_vocab, t_vocab):
        return rows
    reason = (
        f"the tokenizer given ({rows} tokens) does not fit the smaller one, so it is not the tokenizer of both"
        if rows is not None
        else "no tokenizer was given to tell whether the extra rows are padding (pass the one both models share "
        "as processing_class: KD then runs over its rows)"
    )
    raise ValueError(
        f"Student vocab_size {s_vocab} != teacher vocab_size {t_vocab}, and {reason}. Both models must read the same "
        "token ids: build the student from the teacher (student_from_config / student_from_teacher_layers) or use a "
        "student trained with the teacher's tokenizer."
    )


def check_cache_only(student: PreTrainedModel, args, tokenizer=None) -> int | None:
    """Check a run whose teacher's outputs come from a finished ``teacher_logits_cache`` alone (``teacher_model=None``):
    evaluation cannot run the teacher, and the cached vocabulary must be the student's (or, padded differently
    around one tokenizer, compared over the tokenizer's rows, which are returned; ``None``: all)."""
    if args.eval_with_teacher:
        raise ValueError(
            "teacher_model=None (the teacher's outputs from teacher_logits_cache): evaluation cannot run the teacher, "
            "set eval_with_teacher=False."
        )
    meta = complete_cache_meta(args.teacher_logits_cache) or {}
    vocab = meta.get("vocab")
    student_vocab = getattr(student.config, "vocab_size", None)
    if vocab is None or vocab == student_vocab:
        return None
    rows = len(tokenizer) if tokenizer is not None else None
    if rows is None or rows > min(vocab, student_vocab or 0):
        raise ValueError(
            f"The cached teacher has {vocab} vocabulary rows, the student {student_vocab}: give the tokenizer both "
            "share (processing_class) so that its rows are compared, or use a student of the teacher's vocabulary."
        )
    return rows


def check_distillation_pair(student: PreTrainedModel, teacher: PreTrainedModel, args, tokenizer=None) -> int | None:
    """Check that ``student`` can learn from ``teacher`` under ``args`` (a :class:`~hf_attn_distill.DistillConfig`),
    reading configs and module structure only: neither model is changed or run. Returns the vocabulary rows that
    token-level KD compares (:func:`shared_vocab_rows` with ``tokenizer``, the one both models read; ``None``: all).

    Raises ``ValueError`` naming the fix for vocab or label-count mismatches, different label names or decoder
    start tokens, layer maps out of range or for a site the models lack, and head counts that cannot be grouped.
    """
    s_cfg, t_cfg = student.config, teacher.config
    vocab_rows = shared_vocab_rows(student, teacher, tokenizer)
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
    if any(p.device.type == "meta" for p in teacher.parameters()):
        raise ValueError(
            "The teacher has parameters on the 'meta' device (not loaded). Load it with real weights, e.g. "
            "from_pretrained(..., device_map=None), before passing it as teacher_model."
        )
    check_attention_sites(student, teacher, args)
    return vocab_rows
