"""Knowledge distillation with attention transfer for Hugging Face Transformers."""

from .attention_capture import ATTN_IMPLEMENTATION, AttentionRecorder, Capture, enable_attention_capture
from .attention_masks import ATTENTION_LOSSES, attention_loss_count, attention_valid_mask
from .config import DistillConfig
from .distributed import prepare_teacher, require_deepspeed
from .eval_order import InOrderEvaluationMixin, InOrderSeq2SeqTrainer, InOrderTrainer
from .fused_transfer import TransferTarget, softmax_with_transfer_loss
from .layer_map import parse_layer_map, resolve_layer_map
from .losses import (
    attention_kl_loss,
    attention_mse_loss,
    group_teacher_heads,
    hidden_cosine_loss,
    hidden_mse_loss,
    logit_kd_loss,
    relation_kl_loss,
)
from .model_structure import SITES, AttentionLayer, find_attention_modules, find_attention_sites, find_encoder_layers
from .nonfinite import NonFiniteError
from .objective import Objective, Step
from .objectives import OBJECTIVES, build_objectives
from .pairing import check_distillation_pair, load_teacher
from .seq2seq_trainer import DistillSeq2SeqConfig, DistillSeq2SeqTrainer
from .students import student_from_config, student_from_teacher_layers
from .term_registry import TermSpec, register_term
from .token_kd import token_kd_loss
from .trainer import DistillTrainer

__version__ = "0.1.0"

__all__ = [
    "TermSpec",
    "register_term",
    "NonFiniteError",
    "ATTENTION_LOSSES",
    "ATTN_IMPLEMENTATION",
    "AttentionLayer",
    "SITES",
    "AttentionRecorder",
    "Capture",
    "OBJECTIVES",
    "Objective",
    "Step",
    "build_objectives",
    "DistillConfig",
    "DistillSeq2SeqConfig",
    "DistillSeq2SeqTrainer",
    "DistillTrainer",
    "InOrderEvaluationMixin",
    "InOrderSeq2SeqTrainer",
    "InOrderTrainer",
    "TransferTarget",
    "attention_kl_loss",
    "attention_loss_count",
    "attention_mse_loss",
    "attention_valid_mask",
    "check_distillation_pair",
    "enable_attention_capture",
    "find_attention_modules",
    "find_attention_sites",
    "find_encoder_layers",
    "group_teacher_heads",
    "load_teacher",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "logit_kd_loss",
    "relation_kl_loss",
    "parse_layer_map",
    "prepare_teacher",
    "require_deepspeed",
    "resolve_layer_map",
    "softmax_with_transfer_loss",
    "student_from_config",
    "student_from_teacher_layers",
    "token_kd_loss",
]
