"""Training arguments for :class:`~hf_attn_distill.DistillTrainer`.

This module imports nothing else of the package but the term registry (:mod:`~hf_attn_distill.terms.registry`, a
leaf): every other module reads the attention sites from it (:data:`ATTENTION_SITES`: each site's map field,
weight field and term), and it reads every term's weight field, when the term is on and whether the
teacher-logit cache can serve it from the registry. ``__post_init__`` checks what the fields' ``choices`` metadata
lists, the bounds of :data:`LOWER_BOUNDS`, every registered term's weight (``>= 0``) and the layer maps of
:data:`LAYER_MAP_FIELDS`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from transformers import TrainingArguments

from hf_attn_distill.attention.layer_map import parse_layer_map
from hf_attn_distill.terms.registry import term_specs
from hf_attn_distill.training.schedules import parse_schedules

__all__ = [
    "ATTENTION_LOSSES",
    "ATTENTION_SITES",
    "DIVERGENCES",
    "HIDDEN_LOSS_KINDS",
    "RELATION_KINDS",
    "AttentionSite",
    "DistillConfig",
    "deepspeed_requested",
    "parse_relation_kinds",
    "require_deepspeed",
]

ATTENTION_LOSSES = ("kl", "mse_scores", "mse_probs")
"""Attention-transfer losses: ``"kl"`` (MiniLM, row-wise KL of attention distributions), ``"mse_scores"``
(TinyBERT, MSE of pre-softmax scores), ``"mse_probs"`` (MSE of attention probabilities)."""
HIDDEN_LOSS_KINDS = ("mse", "cosine")
RELATION_KINDS = ("qq", "kk", "vv")
HEAD_GROUPINGS = ("mean", "strict")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl")
"""Divergences of token-level logit KD (:mod:`~hf_attn_distill.terms.divergences`)."""
CACHE_DTYPES = ("float16", "float32")
TOP_K_TAILS = ("renormalize", "uniform")
"""What a top-k teacher-logit cache does with the probability outside its ``k`` tokens."""


class AttentionSite(NamedTuple):
    """One attention site: its name, the config fields of its layer map and weight, and its logged term."""

    name: str
    map_field: str
    weight_field: str
    term: str


ATTENTION_SITES = (
    AttentionSite("encoder", "layer_map", "attention_weight", "loss_attn_enc"),
    AttentionSite("decoder", "decoder_layer_map", "decoder_attention_weight", "loss_attn_dec"),
    AttentionSite("cross", "cross_layer_map", "cross_attention_weight", "loss_attn_cross"),
)
"""The attention sites, defined once: encoder self-attention, causal decoder self-attention, cross-attention."""


def parse_relation_kinds(text: str) -> tuple[str, ...]:
    """``"qq,kk,vv"`` -> ``("qq", "kk", "vv")``, checked."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in RELATION_KINDS]
    if unknown or not kinds:
        raise ValueError(f"relation_kinds must be a comma-separated subset of {list(RELATION_KINDS)}, got {text!r}.")
    return kinds


LAYER_MAP_FIELDS = (*(s.map_field for s in ATTENTION_SITES), "hidden_layer_map")
LOWER_BOUNDS = {
    "temperature": (0, False),
    "relation_heads": (1, True),
    "lm_chunk_tokens": (0, True),
    "attention_keep_mb": (0, True),
    "teacher_logits_top_k": (0, True),
    "on_policy_max_new_tokens": (1, True),
    "on_policy_temperature": (0, False),
}
"""``{field: (bound, inclusive)}`` checked in ``__post_init__``, besides every term weight's ``>= 0``."""


def deepspeed_requested(args: Any = None) -> bool:
    """Whether DeepSpeed is asked for: ``args.deepspeed`` set, or ``accelerate launch`` with a DeepSpeed config
    (``ACCELERATE_USE_DEEPSPEED=true``)."""
    if getattr(args, "deepspeed", None):
        return True
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes", "on")


def require_deepspeed(args: Any = None, force: bool = False) -> None:
    """Raise ``ImportError`` naming ``pip install deepspeed`` when DeepSpeed is asked for (see
    :func:`deepspeed_requested`, or ``force``) but not installed. Call it before ``TrainingArguments.__post_init__``, which
    otherwise fails with a bare ``PackageNotFoundError``."""
    if (force or deepspeed_requested(args)) and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            "DeepSpeed was requested (the `deepspeed` argument, or `accelerate launch` with a DeepSpeed config) but "
            "the `deepspeed` package is not installed: `pip install deepspeed`, or drop the DeepSpeed config to train "
            "with DDP or FSDP."
        )


@dataclass
class DistillConfig(TrainingArguments):
    r"""
    Configuration for [`DistillTrainer`]: everything [`~transformers.TrainingArguments`] has, plus the
    distillation objective

    ``loss = alpha_ce * CE(student, labels) + alpha_kd * KD(student, teacher)
    + attention_weight * ATT_enc + decoder_attention_weight * ATT_dec + cross_attention_weight * ATT_cross
    + hidden_weight * HIDDEN + relation_weight * RELATION``

    with one attention term per mapped site (encoder self-attention, decoder self-attention, cross-attention);
    the hidden-state and relation terms are off (weight 0) by default.

    Parameters:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature of the logit KD term; the term is multiplied by `temperature**2` (Hinton et al.).
        alpha_ce (`float`, *optional*, defaults to `0.5`):
            Weight of the student's own hard-label loss (what the model returns with `labels`). `0` allows
            unlabeled transfer data.
        alpha_kd (`float`, *optional*, defaults to `0.5`):
            Weight of the KL divergence between temperature-softened teacher and student logits.
        divergence (`str`, *optional*, defaults to `"forward_kl"`):
            Divergence of token-level logit KD (language models, decoder logits), between `p_t = softmax(t / T)`
            and `p_s = softmax(s / T)`, averaged over the tokens that have a label and times `T**2`:
            `"forward_kl"` `KL(p_t || p_s)` (Hinton et al.), `"reverse_kl"` `KL(p_s || p_t)` (MiniLLM), `"jsd"`
            the generalized Jensen-Shannon divergence with `jsd_beta` (TRL's GKD: `0` is forward KL, `1` reverse KL),
            `"skew_kl"` / `"skew_reverse_kl"` DistiLLM's skew divergences with `skew_alpha`. Classification and QA
            heads use `"forward_kl"`.
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            `beta` of `divergence="jsd"`, in `[0, 1]`: `beta KL(p_t || m) + (1 - beta) KL(p_s || m)` with
            `m = beta p_t + (1 - beta) p_s`.
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            `alpha` of the skew divergences, in `[0, 1)`: `KL(p_t || alpha p_t + (1 - alpha) p_s)` (`skew_kl`) and
            `KL(p_s || alpha p_s + (1 - alpha) p_t)` (`skew_reverse_kl`).
        lmbda (`float`, *optional*, defaults to `0.0`):
            Causal LMs, on-policy distillation (GKD, Agarwal et al. 2024; TRL's `lmbda`): the fraction of training
            batches whose completions the student generates itself (sampling from each record's prompt, everything
            before its first labelled token); the teacher scores them and only the teacher's terms train on them
            (no hard-label loss). Needs prompt/completion or chat records and `alpha_kd > 0`. Which batches is drawn
            from `seed` and the step, so a rerun makes the same choice.
        on_policy_max_new_tokens (`int`, *optional*, defaults to `64`):
            Longest completion the student generates for an on-policy batch.
        on_policy_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the student's on-policy completions.
        chunked_lm_loss (`bool`, *optional*, defaults to `True`):
            Causal LMs and encoder-decoders whose logits are a plain linear head of the decoder's last hidden states
            (T5, `EncoderDecoderModel`): compute the hard-label loss and token-level logit KD from those hidden
            states through both output heads, `lm_chunk_tokens` tokens at a time in forward and backward, so
            neither model's `[tokens, vocab]` logits exist (the heads then return the last position's logits
            only). Models that transform the head's output (logit soft-capping, a logit scale, BART's and Marian's
            `final_logits_bias`) and a teacher-logit cache of whole logits use the full logits. Same values and
            gradients as the full logits; under bf16/fp16 autocast the chunks' logits are in the head's dtype
            (float32 for a float32 head), so they differ from the full ones by that rounding only.
        lm_chunk_tokens (`int`, *optional*, defaults to `0`):
            Tokens per chunk of the chunked LM loss; `0` picks them from the vocabulary size (about 8M logits,
            32 MB of float32, per chunk, and at least 512 tokens: fewer make a large vocabulary's step slower).
        attention_loss (`str`, *optional*, defaults to `"kl"`):
            Per-head attention-transfer loss. `"kl"`: MiniLM, row-wise KL(teacher || student) between attention
            distributions (from log-probabilities), mean over heads and valid query rows. `"mse_scores"`: TinyBERT,
            mean squared error of pre-softmax scores `q k^T / sqrt(d)`, mean over heads and valid (query, key)
            entries. `"mse_probs"`: the same on attention probabilities.
        attention_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the encoder self-attention loss (`loss_attn_enc`), averaged over mapped layers. `0` leaves the
            encoder out.
        layer_map (`str` or list of pairs, *optional*, defaults to `"uniform"`):
            Which teacher layer each student layer learns encoder self-attention from (0-based). `"uniform"`
            (TinyBERT: student layer `i` <- teacher layer `k*(i+1)-1`, `k = teacher_layers / student_layers`),
            `"last"` (MiniLM: last <- last), explicit `(student, teacher)` pairs: `[(0, 1), (1, 3)]`, `"0:1,1:3"` or
            `"[[0,1],[1,3]]"`, or `"none"`. Only mapped
            layers materialize attention; all others keep the fused SDPA kernel.
        decoder_layer_map (`str` or `None`, *optional*, defaults to `None`):
            Encoder-decoder models: layer map of the causal decoder self-attention (`loss_attn_dec`), same forms as
            `layer_map`; `None` leaves it out.
        cross_layer_map (`str` or `None`, *optional*, defaults to `None`):
            Encoder-decoder models: layer map of the decoder-to-encoder cross-attention (`loss_attn_cross`), which
            carries the source-target alignment; `None` leaves it out.
        decoder_attention_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the decoder self-attention loss.
        cross_attention_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the cross-attention loss.
        attention_keep_mb (`float`, *optional*, defaults to `64.0`):
            Per mapped student layer, which computes its attention in blocks of query rows: when one float32
            `[batch, heads, queries, keys]` tensor of its attention takes at most this many MB, the layer keeps its
            blocks' probabilities (and, with attention dropout, a one-byte mask) for backward, up to 1.25 times this
            size until backward, and recomputes nothing; above it, backward recomputes the student's blocks as flash
            attention does, so the layer holds nothing of size queries x keys beyond one block (except, where they
            take at most half this budget, its one-byte attention-dropout masks, kept rather than drawn again). Either way the
            teacher's rows are computed once, in forward, where the transfer loss's gradient on the student's
            queries and keys is taken (two float32 tensors of their size, held until backward); only a trainable
            position bias that differs by query (T5) has the teacher's rows recomputed in backward for its share. Keeping is faster; the default keeps up
            to 384 tokens at batch 8 and 12 heads and recomputes 512, where a kept layer would hold about 125 MB
            until backward and recomputing measured 1.00x the limit's time at 0.51-0.61x its working memory
            (benchmarks/README.md). `0` always recomputes. Decided per
            batch (lengths vary with padding); each layer's choice for the first batch is logged (info).
        head_grouping (`str`, *optional*, defaults to `"mean"`):
            How teacher heads meet student heads when their counts differ. `"mean"`: teacher heads are averaged in
            consecutive groups of `teacher_heads // student_heads` (teacher heads must be a multiple of student
            heads); `"strict"`: head counts must be equal.
        hidden_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the hidden-state transfer term `loss_hidden` (encoder-only models); `0` turns it off. Both
            models then return `hidden_states`, and each mapped student layer's output (and the embedding output)
            learns the teacher's.
        hidden_loss (`str`, *optional*, defaults to `"mse"`):
            `"mse"` (TinyBERT): mean squared error over valid tokens and hidden units, the student's states passed
            through one learned `nn.Linear(student width, teacher width)` shared by all pairs when the widths
            differ. `"cosine"` (DistilBERT's loss): mean over valid tokens of `1 - cos(student, teacher)`, through
            the same projection when widths differ; DistilBERT applies it to the last layer only
            (`hidden_layer_map="last"`, `hidden_include_embeddings=False`).
        hidden_layer_map (`str` or `None`, *optional*, defaults to `None`):
            Layer map of the hidden-state term, same forms as `layer_map` (indices of layer outputs, 0-based);
            `None` uses `layer_map`.
        hidden_include_embeddings (`bool`, *optional*, defaults to `True`):
            Also match the embedding outputs (TinyBERT's embedding-layer loss).
        relation_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the self-attention relation term `loss_relation` (MiniLM / MiniLMv2; encoder-only models, and
            decoder-only LMs at their causal self-attention, with the queries and keys as rotated for attention);
            `0` turns it off. For each kind in `relation_kinds`, `KL(softmax(X_t X_t^T / sqrt(d_r)) ||
            softmax(X_s X_s^T / sqrt(d_r)))` per relation head and valid row, `X` the queries, keys or values of
            all heads concatenated and split into `relation_heads` heads of width `d_r`; the term is the mean over
            the kinds (MiniLMv2 sums its three, so `relation_weight=3` gives the paper's weighting). Works when the
            student has another width and head count than the teacher, and across grouped-query attention (keys
            and values have the key/value heads' width).
        relation_kinds (`str`, *optional*, defaults to `"qq,kk,vv"`):
            Relations transferred: MiniLMv2's `"qq,kk,vv"`, or MiniLM's value relation `"vv"`.
        relation_heads (`int` or `None`, *optional*, defaults to `None`):
            Relation heads; must divide the query and key/value widths of both models. `None`: the student's
            attention heads.
        relation_teacher_layer (`int`, *optional*, defaults to `-1`):
            Teacher layer the relations come from (0-based; negative counts from the end). MiniLMv2 takes an
            upper-middle layer of large teachers.
        relation_student_layer (`int`, *optional*, defaults to `-1`):
            Student layer that learns them (the last by default).
        schedules (`dict` or `str`, *optional*, defaults to `None`):
            Move the temperature or a loss weight from its configured value to an end value over training:
            `{"temperature": "linear:1.0", "attention_weight": "cosine:0.0"}` (or its JSON, or
            `"temperature=linear:1.0,attention_weight=cosine:0.0"`). Kinds: `constant`, `linear`
            (`start + (end - start) * p`), `cosine` (`end + (start - end) * (1 + cos(pi p)) / 2`), with
            `p = global_step / max_steps`. Scheduled values are logged with each training log. A weight that
            starts at 0 cannot be scheduled (its term is off).
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            Cast the teacher to this dtype for faster inference (`"bfloat16"`, `"float16"`, `"float32"`); `"auto"`
            keeps it as loaded.
        teacher_model_init_kwargs (`dict` or `str`, *optional*, defaults to `None`):
            Keyword arguments for `from_pretrained` when `teacher_model` is given as a Hub id or folder (a dict, or
            a JSON string on the command line), e.g. `{"dtype": "bfloat16", "revision": "main"}`.
            `trust_remote_code` stays off unless given here.
        nonfinite_check (`bool`, *optional*, defaults to `True`):
            Stop training with `NonFiniteError` at the step where the teacher's outputs (logits, hidden states) or
            a term of the loss are NaN or inf, naming the source, the teacher's dtype and what to try; nothing of
            that step is applied. Checked at every step on CPU; on an accelerator the flags stay on the device and
            are read at each training log and at the end of training (no synchronisation per step). `False` keeps
            transformers' behaviour: training goes on (the weights take the non-finite update) and the logged
            `loss` of such a window shows `nan` (`logging_nan_inf_filter` is switched off), never 0.
        eval_with_teacher (`bool`, *optional*, defaults to `True`):
            Run the teacher during evaluation and report `eval_loss_kd` / `eval_loss_attn_*` next to `eval_loss`
            (the weighted distillation loss). `False`: evaluation runs the student alone, at the cost of a plain
            `Trainer` evaluation, and `eval_loss` is the student's own task loss.
        teacher_logits_cache (`str` or `None`, *optional*, defaults to `None`):
            Folder for teacher logits computed once per training example and memory-mapped; later steps read them
            instead of running the teacher. Needs the teacher for logits alone (no attention site, `hidden_weight=0`,
            `relation_weight=0`) and sequence-level logits, or `teacher_logits_top_k` for causal LMs. Rebuilt when the
            teacher or the training data change. Once built, a run may pass `teacher_model=None` (with
            `eval_with_teacher=False`): the teacher is never loaded, the cache is checked against its training data.
        teacher_logits_cache_dtype (`str`, *optional*, defaults to `"float16"`):
            Storage dtype of the cache: `"float16"` (half the size) or `"float32"` (exact).
        teacher_logits_top_k (`int`, *optional*, defaults to `0`):
            Token-level teachers (causal LMs): the cache keeps, for every position of every training example, the
            ids of the teacher's `k` most likely next tokens and their log-probabilities at `temperature` (in
            `teacher_logits_cache_dtype`), not the whole vocabulary: `k * 4` bytes a token at float16 with a
            vocabulary of at most 65,536 (`k * 6` above). Logit KD is then forward KL against them
            (`teacher_logits_tail`); the temperature cannot follow a schedule. `0`: whole logit vectors (one per
            example: sequence-level tasks).
        teacher_logits_tail (`str`, *optional*, defaults to `"renormalize"`):
            What a top-k cache does with the probability outside the `k` tokens: `"renormalize"` scales the `k`
            probabilities to sum to 1 (DistillKit's choice); `"uniform"` keeps them and spreads the rest evenly
            over the other tokens of the vocabulary.
    """

    @property
    def term_weight_fields(self) -> dict[str, str]:
        """``{term: weight field}`` of every registered term whose weight this config has (a term registered from
        outside brings its weight in its own config class)."""
        fields = {f.name for f in dataclasses.fields(self)}
        return {spec.name: spec.weight_field for spec in term_specs() if spec.weight_field in fields}

    """``{term: weight field}`` of the terms this configuration weighs; a subclass that adds a term's weight
    field extends it (``docs/adding_a_term.md``)."""

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature of the logit KD term (> 0); the term is scaled by T^2."},
    )
    alpha_ce: float = field(
        default=0.5,
        metadata={"help": "Weight of the student's hard-label loss (>= 0); 0 allows unlabeled data."},
    )
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of the logit KD term (>= 0)."})
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence of token-level logit KD: 'forward_kl', 'reverse_kl', 'jsd' (with jsd_beta), "
            "'skew_kl' or 'skew_reverse_kl' (with skew_alpha).",
            "choices": list(DIVERGENCES),
        },
    )
    jsd_beta: float = field(
        default=0.5, metadata={"help": "beta of divergence='jsd' in [0, 1] (0: forward KL, 1: reverse KL)."}
    )
    skew_alpha: float = field(default=0.1, metadata={"help": "alpha of the skew divergences, in [0, 1)."})
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Causal LMs: fraction of batches whose completions the student generates (on-policy, GKD)."},
    )
    on_policy_max_new_tokens: int = field(
        default=64, metadata={"help": "Longest completion the student generates for an on-policy batch (>= 1)."}
    )
    on_policy_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of the student's on-policy completions (> 0)."}
    )
    chunked_lm_loss: bool = field(
        default=True,
        metadata={
            "help": "Causal LMs and encoder-decoders with a linear head: compute loss_ce and loss_kd from the last "
            "hidden states a chunk of tokens at a time, so [tokens, vocab] logits never exist (same values)."
        },
    )
    lm_chunk_tokens: int = field(
        default=0, metadata={"help": "Tokens per chunk of the chunked LM loss (>= 0); 0 picks from the vocabulary."}
    )
    attention_loss: str = field(
        default="kl",
        metadata={
            "help": "Attention-transfer loss: 'kl' (MiniLM, on attention distributions), 'mse_scores' (TinyBERT, "
            "on pre-softmax scores) or 'mse_probs' (on probabilities).",
            "choices": list(ATTENTION_LOSSES),
        },
    )
    attention_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the encoder self-attention loss (>= 0); 0 leaves the encoder out."},
    )
    layer_map: str | None = field(
        default="uniform",
        metadata={
            "help": "Student<-teacher encoder layer map: 'uniform' (TinyBERT), 'last' (MiniLM), pairs "
            "'student:teacher,...' such as '0:1,1:3,2:5' (0-based), or 'none'.",
        },
    )
    decoder_layer_map: str | None = field(
        default=None,
        metadata={"help": "Layer map of the causal decoder self-attention (encoder-decoder models)."},
    )
    cross_layer_map: str | None = field(
        default=None, metadata={"help": "Layer map of the cross-attention (encoder-decoder models)."}
    )
    decoder_attention_weight: float = field(
        default=1.0, metadata={"help": "Weight of the decoder self-attention loss (>= 0)."}
    )
    cross_attention_weight: float = field(default=1.0, metadata={"help": "Weight of the cross-attention loss (>= 0)."})
    attention_keep_mb: float = field(
        default=64.0,
        metadata={
            "help": "A mapped student layer whose float32 [batch, heads, queries, keys] attention takes at most this "
            "many MB keeps its blocks for backward (no recompute); above it backward recomputes them (>= 0; 0: always "
            "recompute).",
        },
    )
    head_grouping: str = field(
        default="mean",
        metadata={
            "help": "Head-count mismatch: 'mean' averages teacher heads in groups (teacher heads must be a "
            "multiple of student heads); 'strict' requires equal counts.",
            "choices": list(HEAD_GROUPINGS),
        },
    )
    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state transfer term loss_hidden (>= 0); 0 turns it off."}
    )
    hidden_loss: str = field(
        default="mse",
        metadata={
            "help": "Hidden-state loss: 'mse' (TinyBERT, through a learned projection when widths differ) or "
            "'cosine' (DistilBERT).",
            "choices": list(HIDDEN_LOSS_KINDS),
        },
    )
    hidden_layer_map: str | None = field(
        default=None,
        metadata={"help": "Layer map of the hidden-state term (same forms as layer_map); default: layer_map."},
    )
    hidden_include_embeddings: bool = field(
        default=True, metadata={"help": "Also match the embedding outputs in the hidden-state term."}
    )
    relation_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the MiniLM/MiniLMv2 relation term loss_relation (>= 0); 0 turns it off."},
    )
    relation_kinds: str = field(
        default="qq,kk,vv", metadata={"help": "Relations: comma-separated subset of qq, kk, vv ('vv' = MiniLM v1)."}
    )
    relation_heads: int | None = field(
        default=None,
        metadata={"help": "Relation heads (must divide both widths); default: the student's heads."},
    )
    relation_teacher_layer: int = field(
        default=-1, metadata={"help": "Teacher layer of the relations (0-based, negative from the end)."}
    )
    relation_student_layer: int = field(
        default=-1, metadata={"help": "Student layer that learns the relations (0-based, negative from the end)."}
    )
    schedules: dict | str | None = field(
        default=None,
        metadata={
            "help": "Schedules of the temperature / loss weights, e.g. 'temperature=linear:1.0,"
            "attention_weight=cosine:0.0' or a JSON object (kinds: constant, linear, cosine; 'kind:end')."
        },
    )
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "Run the teacher in this dtype: 'auto' (as loaded), 'float32', 'bfloat16' or 'float16'.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "from_pretrained kwargs for a teacher given as a Hub id or folder (dict or JSON string), e.g. "
            '\'{"dtype": "bfloat16"}\'. trust_remote_code stays off unless given.'
        },
    )
    nonfinite_check: bool = field(
        default=True,
        metadata={
            "help": "Stop training at the step where the teacher's outputs or a loss term are NaN or inf, naming "
            "the source; False keeps transformers' behaviour (training goes on) and logs such steps' loss as nan."
        },
    )
    eval_with_teacher: bool = field(
        default=True,
        metadata={
            "help": "Run the teacher during evaluation and report eval_loss_kd/eval_loss_attn_*; False evaluates the "
            "student alone (as fast as a plain Trainer evaluation)."
        },
    )
    teacher_logits_cache: str | None = field(
        default=None,
        metadata={"help": "Folder to cache teacher logits once per training example (needs attention_weight=0)."},
    )
    teacher_logits_cache_dtype: str = field(
        default="float16",
        metadata={"help": "Storage dtype of the teacher-logit cache.", "choices": list(CACHE_DTYPES)},
    )
    teacher_logits_top_k: int = field(
        default=0,
        metadata={"help": "Causal LMs: cache each position's top-k teacher log-probabilities (>= 0; 0: whole logits)."},
    )
    teacher_logits_tail: str = field(
        default="renormalize",
        metadata={
            "help": "Mass outside a top-k cache's tokens: 'renormalize' (scale the k to 1) or 'uniform' (spread it).",
            "choices": list(TOP_K_TAILS),
        },
    )

    def __post_init__(self):
        require_deepspeed(self)  # transformers would fail first, with a bare PackageNotFoundError
        super().__post_init__()
        if self.attention_loss == "mse":
            raise ValueError(
                "attention_loss='mse' is ambiguous: use 'mse_scores' (TinyBERT, pre-softmax scores) or 'mse_probs' "
                "(attention probabilities)."
            )
        for f in dataclasses.fields(DistillConfig):  # the choices the fields' metadata list
            value = getattr(self, f.name)
            if f.name in _OWN_FIELDS and "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {tuple(f.metadata['choices'])}, got {value!r}")
        bounds = {**LOWER_BOUNDS, **{name: (0, True) for name in self.term_weight_fields.values()}}
        for name, (bound, inclusive) in bounds.items():
            value = getattr(self, name)
            if value is not None and not (value >= bound if inclusive else value > bound):
                raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {bound}, got {value}")
        for name in LAYER_MAP_FIELDS:
            value = getattr(self, name)
            if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
                setattr(self, name, None)  # "none" on the command line is None
            else:
                parsed = parse_layer_map(value)
                # Keep a JSON-friendly form so the arguments still serialize with checkpoints.
                setattr(self, name, parsed if isinstance(parsed, str) else [list(p) for p in parsed])
        if not any(self.term_is_on(term) for term in self.term_weight_fields):
            raise ValueError(
                "alpha_ce, alpha_kd, hidden_weight, relation_weight and every attention weight (with its "
                "layer map) are 0: nothing to train on."
            )
        parse_relation_kinds(self.relation_kinds)
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {self.jsd_beta}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ValueError(f"skew_alpha must be in [0, 1), got {self.skew_alpha}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda (the fraction of on-policy batches) must be in [0, 1], got {self.lmbda}")
        if self.lmbda > 0 and self.alpha_kd == 0:
            raise ValueError("lmbda > 0 trains on-policy batches on the teacher's logits alone: set alpha_kd > 0.")
        if self.lmbda > 0 and self.teacher_logits_cache:
            raise ValueError(
                "lmbda > 0 needs the teacher to score the student's own completions, which no cache holds: drop "
                "teacher_logits_cache or set lmbda=0."
            )
        parsed_schedules = parse_schedules(self.schedules, self.term_weight_fields)
        for name in parsed_schedules:
            if getattr(self, name) == 0:
                raise ValueError(
                    f"schedules: {name} starts at its configured value 0, so its term is off; set {name} "
                    "to the schedule's start value."
                )
        self.schedules = {n: k if k == "constant" else f"{k}:{e}" for n, (k, e) in parsed_schedules.items()} or None
        if self.hidden_weight > 0 and self.hidden_layer_map is None and self.layer_map is None:
            raise ValueError(
                "hidden_weight > 0 needs a layer map: set hidden_layer_map (or layer_map) to 'uniform', "
                "'last' or pairs such as '0:1,1:3'."
            )
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"teacher_model_init_kwargs must be a dict or a JSON object string, got {self.teacher_model_init_kwargs!r}"
                ) from err
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"teacher_model_init_kwargs must be a dict, got {type(self.teacher_model_init_kwargs).__name__}"
            )
        beyond_logits = [
            s for s in term_specs() if s.is_on(self) and s.needs_teacher and not s.logits_only
        ]  # terms that read more of the teacher than its logits: the cache cannot stand in for its forward
        if self.teacher_logits_cache and beyond_logits:
            raise ValueError(
                "teacher_logits_cache only replaces the teacher when it is needed for logits alone, but "
                f"{', '.join(s.name for s in beyond_logits)} read(s) more of it: set "
                f"{', '.join(f'{s.weight_field}=0' for s in beyond_logits)} (or leave their layer maps unset), or drop "
                "teacher_logits_cache (with those terms the teacher runs every step)."
            )
        if self.teacher_logits_cache and self.alpha_kd == 0:
            raise ValueError("teacher_logits_cache is useless with alpha_kd=0: no teacher logits are used.")
        if self.teacher_logits_top_k > 0:
            if not self.teacher_logits_cache:
                raise ValueError("teacher_logits_top_k needs teacher_logits_cache: the folder the top-k outputs go to.")
            if self.divergence != "forward_kl":
                raise ValueError(
                    f"teacher_logits_top_k supports divergence='forward_kl' only, got {self.divergence!r}: the other "
                    "divergences need the teacher's whole distribution (set teacher_logits_top_k=0)."
                )
            if "temperature" in (self.schedules or {}):
                raise ValueError(
                    "teacher_logits_top_k stores log-probabilities at the configured temperature, so the temperature "
                    "cannot follow a schedule: drop its schedule or set teacher_logits_top_k=0."
                )

    def site_is_on(self, site: AttentionSite) -> bool:
        """Whether ``site`` is transferred: its layer map is set and its weight is above 0."""
        return getattr(self, site.map_field) is not None and getattr(self, site.weight_field) > 0

    def term_is_on(self, term: str) -> bool:
        """Whether the loss term ``term`` contributes: its weight is above 0 (and, for a site, its map is set)."""
        spec = next((s for s in term_specs() if s.name == term), None)
        if spec is None:
            raise KeyError(f"No registered term {term!r}; registered: {[s.name for s in term_specs()]}.")
        return spec.is_on(self)

    @property
    def uses_attention(self) -> bool:
        """Whether any attention site is transferred."""
        return any(self.site_is_on(site) for site in ATTENTION_SITES)


_OWN_FIELDS = {f.name for f in dataclasses.fields(DistillConfig)} - {
    f.name for f in dataclasses.fields(TrainingArguments)
}
