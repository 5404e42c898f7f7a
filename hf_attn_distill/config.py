"""Training arguments for :class:`~hf_attn_distill.DistillTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .layer_map import parse_layer_map

__all__ = ["DistillConfig"]

ATTENTION_LOSSES = ("kl", "mse")
MSE_INPUTS = ("scores", "probs")
HEAD_GROUPINGS = ("mean", "strict")
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
CACHE_DTYPES = ("float16", "float32")


@dataclass
class DistillConfig(TrainingArguments):
    r"""
    Configuration for [`DistillTrainer`]: everything [`~transformers.TrainingArguments`] has, plus the
    distillation objective

    ``loss = alpha_ce * CE(student, labels) + alpha_kd * KD(student, teacher) + attention_weight * ATT``

    Parameters:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature of the logit KD term; the term is multiplied by `temperature**2` (Hinton et al.).
        alpha_ce (`float`, *optional*, defaults to `0.5`):
            Weight of the student's own hard-label loss (what the model returns with `labels`). `0` allows
            unlabeled transfer data.
        alpha_kd (`float`, *optional*, defaults to `0.5`):
            Weight of the KL divergence between temperature-softened teacher and student logits.
        attention_loss (`str`, *optional*, defaults to `"kl"`):
            Per-head attention-transfer loss. `"kl"`: MiniLM, row-wise KL(teacher || student) between attention
            distributions, computed from log-probabilities. `"mse"`: TinyBERT, mean squared error, on pre-softmax
            scores or probabilities as `attention_mse_input` says.
        attention_mse_input (`str`, *optional*, defaults to `"scores"`):
            What `attention_loss="mse"` compares: `"scores"` (pre-softmax `q k^T / sqrt(d)`, TinyBERT) or `"probs"`
            (attention probabilities). Ignored for `"kl"`.
        attention_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the attention loss, averaged over mapped layers. `0` turns attention capture off entirely.
        layer_map (`str` or list of pairs, *optional*, defaults to `"uniform"`):
            Which teacher layer each student layer learns attention from (0-based). `"uniform"` (TinyBERT: student
            layer `i` <- teacher layer `k*(i+1)-1`, `k = teacher_layers / student_layers`), `"last"` (MiniLM: last
            <- last), or explicit `(student, teacher)` pairs: `[(0, 1), (1, 3)]`, `"0:1,1:3"` or `"[[0,1],[1,3]]"`.
            Only mapped layers materialize attention; all others keep the fused SDPA kernel.
        head_grouping (`str`, *optional*, defaults to `"mean"`):
            How teacher heads meet student heads when their counts differ. `"mean"`: teacher heads are averaged in
            consecutive groups of `teacher_heads // student_heads` (teacher heads must be a multiple of student
            heads); `"strict"`: head counts must be equal.
        teacher_dtype (`str`, *optional*, defaults to `"auto"`):
            Cast the teacher to this dtype for faster inference (`"bfloat16"`, `"float16"`, `"float32"`); `"auto"`
            keeps it as loaded.
        teacher_logits_cache (`str` or `None`, *optional*, defaults to `None`):
            Folder for teacher logits computed once per training example and memory-mapped; later steps read them
            instead of running the teacher. Needs `attention_weight=0` and sequence-level logits. Rebuilt when the
            teacher or the training data change.
        teacher_logits_cache_dtype (`str`, *optional*, defaults to `"float16"`):
            Storage dtype of the cache: `"float16"` (half the size) or `"float32"` (exact).
    """

    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature of the logit KD term (> 0); the term is scaled by T^2."}
    )
    alpha_ce: float = field(
        default=0.5, metadata={"help": "Weight of the student's hard-label loss (>= 0); 0 allows unlabeled data."}
    )
    alpha_kd: float = field(default=0.5, metadata={"help": "Weight of the logit KD term (>= 0)."})
    attention_loss: str = field(
        default="kl",
        metadata={
            "help": "Attention-transfer loss: 'kl' (MiniLM, on attention distributions) or 'mse' (TinyBERT).",
            "choices": list(ATTENTION_LOSSES),
        },
    )
    attention_mse_input: str = field(
        default="scores",
        metadata={
            "help": "What attention_loss='mse' compares: 'scores' (pre-softmax, TinyBERT) or 'probs'.",
            "choices": list(MSE_INPUTS),
        },
    )
    attention_weight: float = field(
        default=1.0, metadata={"help": "Weight of the attention loss (>= 0); 0 disables attention capture."}
    )
    layer_map: str = field(
        default="uniform",
        metadata={
            "help": "Student<-teacher layer map: 'uniform' (TinyBERT), 'last' (MiniLM), or pairs "
            "'student:teacher,...' such as '0:1,1:3,2:5' (0-based)."
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
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "Run the teacher in this dtype: 'auto' (as loaded), 'float32', 'bfloat16' or 'float16'.",
            "choices": list(TEACHER_DTYPES),
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

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("alpha_ce", "alpha_kd", "attention_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.alpha_ce == 0 and self.alpha_kd == 0 and self.attention_weight == 0:
            raise ValueError("alpha_ce, alpha_kd and attention_weight are all 0: nothing to train on.")
        if self.attention_loss not in ATTENTION_LOSSES:
            raise ValueError(f"attention_loss must be one of {ATTENTION_LOSSES}, got {self.attention_loss!r}")
        if self.attention_mse_input not in MSE_INPUTS:
            raise ValueError(f"attention_mse_input must be one of {MSE_INPUTS}, got {self.attention_mse_input!r}")
        if self.head_grouping not in HEAD_GROUPINGS:
            raise ValueError(f"head_grouping must be one of {HEAD_GROUPINGS}, got {self.head_grouping!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")
        if self.teacher_logits_cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"teacher_logits_cache_dtype must be one of {CACHE_DTYPES}, got {self.teacher_logits_cache_dtype!r}")
        if self.teacher_logits_cache and self.attention_weight > 0:
            raise ValueError(
                "teacher_logits_cache only replaces the teacher when it is needed for logits alone: set "
                "attention_weight=0, or drop teacher_logits_cache (with attention the teacher runs every step)."
            )
        if self.teacher_logits_cache and self.alpha_kd == 0:
            raise ValueError("teacher_logits_cache is useless with alpha_kd=0: no teacher logits are used.")
        parsed = parse_layer_map(self.layer_map)
        # Keep a JSON-friendly form so the arguments still serialize with checkpoints.
        self.layer_map = parsed if isinstance(parsed, str) else [list(p) for p in parsed]

    @property
    def attention_record_kind(self) -> str:
        """What the attention recorder stores for the chosen loss: ``"log_probs"`` or ``"scores"``."""
        if self.attention_loss == "mse" and self.attention_mse_input == "scores":
            return "scores"
        return "log_probs"
