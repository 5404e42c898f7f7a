"""Knowledge distillation with attention transfer for Hugging Face Transformers."""

from hf_attn_distill.attention.capture import ATTN_IMPLEMENTATION, AttentionRecorder, Capture, enable_attention_capture
from hf_attn_distill.attention.fused import TransferTarget, softmax_with_transfer_loss
from hf_attn_distill.attention.layer_map import parse_layer_map, resolve_layer_map
from hf_attn_distill.attention.masks import ATTENTION_LOSSES, attention_loss_count, attention_valid_mask
from hf_attn_distill.attention.sites import (
    SITES,
    AttentionLayer,
    find_attention_modules,
    find_attention_sites,
    find_encoder_layers,
)
from hf_attn_distill.config import DistillConfig
from hf_attn_distill.losses import (
    attention_kl_loss,
    attention_mse_loss,
    group_teacher_heads,
    hidden_cosine_loss,
    hidden_mse_loss,
    logit_kd_loss,
    relation_kl_loss,
)
from hf_attn_distill.seq2seq_trainer import DistillSeq2SeqConfig, DistillSeq2SeqTrainer
from hf_attn_distill.students import student_from_config, student_from_teacher_layers
from hf_attn_distill.terms.base import Objective, Step
from hf_attn_distill.terms.build import OBJECTIVES, build_objectives
from hf_attn_distill.terms.divergences import chunked_lm_divergence, token_divergence
from hf_attn_distill.terms.registry import TermSpec, register_term
from hf_attn_distill.terms.token_kd import token_kd_loss
from hf_attn_distill.trainer import DistillTrainer
from hf_attn_distill.training.distributed import prepare_teacher, require_deepspeed
from hf_attn_distill.training.eval_order import InOrderEvaluationMixin, InOrderSeq2SeqTrainer, InOrderTrainer
from hf_attn_distill.training.nonfinite import NonFiniteError
from hf_attn_distill.training.pairing import check_distillation_pair, load_teacher

__version__ = "0.1.0"

__all__ = [
    "chunked_lm_divergence",
    "token_divergence",
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
