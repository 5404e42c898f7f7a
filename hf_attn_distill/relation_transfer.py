"""Self-attention relation transfer: MiniLM's value relation and MiniLMv2's query/key/value relations.

For one student layer and one teacher layer (any layers, e.g. MiniLMv2's upper-middle teacher layer), the
queries, keys and values of all heads are concatenated to ``[B, T, D]`` and split into ``R`` relation heads;
each relation ``softmax(x_r x_r^T / sqrt(D / R))`` of the student learns the teacher's by KL
(:func:`~hf_attn_distill.losses.relation_kl_loss`). Relations are ``T x T`` whatever the width, so student
and teacher may differ in hidden size and head count: only both widths must divide into ``R`` heads.
``relation_kinds="vv"`` with ``R`` = the attention heads is MiniLM (v1)'s value relation.

The states come from the same selective path as attention transfer: only the two chosen attention modules
hand their ``query``/``key``/``value`` to a :class:`StateTap`; every other layer keeps the fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_capture import POINT_ATTR, _CapturePoint, enable_attention_capture
from .attention_masks import valid_token_count
from .losses import relation_kl_loss
from .model_structure import find_attention_sites

__all__ = ["RELATION_KINDS", "RelationTransfer", "StateTap", "parse_relation_kinds", "plan_relation_transfer", "state_widths"]

RELATION_KINDS = {"qq": 0, "kk": 1, "vv": 2}


def parse_relation_kinds(text: str) -> tuple[str, ...]:
    """``"qq,kk,vv"`` -> ``("qq", "kk", "vv")``, checked."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in RELATION_KINDS]
    if unknown or not kinds:
        raise ValueError(f"relation_kinds must be a comma-separated subset of {list(RELATION_KINDS)}, got {text!r}.")
    return kinds


class StateTap:
    """Hands over the ``(query, key, value)`` of one attention module's call while started."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.point = getattr(module, POINT_ATTR, None)
        if self.point is None:
            self.point = _CapturePoint()
            setattr(module, POINT_ATTR, self.point)

    def start(self) -> None:
        self.point.tap = [None]

    def states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value as ``[B, T, D]`` (heads concatenated) from the call since :meth:`start`."""
        seen = self.point.tap[0] if self.point.tap else None
        if seen is None:
            raise RuntimeError(
                f"{type(self.module).__name__} was not called through the 'hf_attn_distill' attention implementation, "
                "so its queries, keys and values cannot be read. Set relation_weight=0 for this model."
            )
        return tuple(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) for x in seen)

    def stop(self) -> None:
        self.point.tap = None


class RelationTransfer:
    """Relation transfer between one student and one teacher attention module (encoder self-attention).

    Attributes:
        kinds: relation kinds (``"qq"``, ``"kk"``, ``"vv"``); the term is their mean.
        num_heads: relation heads ``R``.
        weight: weight of the ``loss_relation`` term.
        student_layer, teacher_layer: the 0-based layers.
    """

    term = "loss_relation"

    def __init__(self, kinds, num_heads: int, weight: float, student: StateTap, teacher: StateTap,
                 student_layer: int, teacher_layer: int):
        self.kinds, self.num_heads, self.weight = tuple(kinds), num_heads, weight
        self.student, self.teacher = student, teacher
        self.student_layer, self.teacher_layer = student_layer, teacher_layer

    def loss(self, student_states, teacher_states, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over kinds of :func:`~hf_attn_distill.losses.relation_kl_loss` of the tapped states."""
        losses = [relation_kl_loss(student_states[RELATION_KINDS[k]], teacher_states[RELATION_KINDS[k]],
                                   self.num_heads, mask) for k in self.kinds]
        return torch.stack(losses).mean()

    #: What the term averages over in a batch: its valid tokens.
    count = staticmethod(valid_token_count)


def state_widths(config) -> dict[str, int | None]:
    """Widths of the concatenated queries (``"qq"``) and keys / values (``"kk"``, ``"vv"``) that an attention
    module of ``config`` hands over: heads x head width, with fewer key/value heads under grouped-query attention
    and ``head_dim`` where the config sets it. ``None`` where the config does not say."""
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not heads or not width:
        return dict.fromkeys(RELATION_KINDS)
    head_dim = getattr(config, "head_dim", None) or width // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"qq": heads * head_dim, "kk": kv_heads * head_dim, "vv": kv_heads * head_dim}


def checkpointing_settings(args) -> tuple[bool, dict | None]:
    """``(on, kwargs)`` of activation checkpointing, read from ``activation_checkpointing*`` where transformers has
    them (their ``gradient_checkpointing*`` aliases only mirror them) and from ``gradient_checkpointing*`` before."""
    if hasattr(args, "activation_checkpointing"):
        return bool(args.activation_checkpointing), args.activation_checkpointing_kwargs
    return bool(args.gradient_checkpointing), args.gradient_checkpointing_kwargs


def _layer(index: int, count: int, name: str) -> int:
    resolved = index + count if index < 0 else index
    if not 0 <= resolved < count:
        raise ValueError(f"{name}={index} is out of range for a model with {count} layers (0..{count - 1}, or -1 "
                         "for the last).")
    return resolved


def plan_relation_transfer(student: nn.Module, teacher: nn.Module, args) -> RelationTransfer | None:
    """The relation transfer ``args`` asks for (``None`` when ``relation_weight`` is 0), checked: layers in
    range, widths divisible into the relation heads, no reentrant gradient checkpointing."""
    if args.relation_weight == 0:
        return None
    if getattr(student.config, "is_encoder_decoder", False):
        raise ValueError("relation_weight > 0 is implemented for encoder-only models; set relation_weight=0 and use "
                         "attention transfer (layer_map, decoder_layer_map, cross_layer_map) for encoder-decoders.")
    checkpointing, kwargs = checkpointing_settings(args)
    if checkpointing and (kwargs or {}).get("use_reentrant"):
        raise ValueError("Relation transfer reads the student's queries, keys and values with their gradient, which "
                         "reentrant checkpointing does not keep: use activation_checkpointing_kwargs "
                         "(gradient_checkpointing_kwargs on older transformers)={'use_reentrant': False}.")
    for model in (student, teacher):
        enable_attention_capture(model)
    s_mods, t_mods = find_attention_sites(student)["encoder"], find_attention_sites(teacher)["encoder"]
    s_layer = _layer(args.relation_student_layer, len(s_mods), "relation_student_layer")
    t_layer = _layer(args.relation_teacher_layer, len(t_mods), "relation_teacher_layer")
    kinds = parse_relation_kinds(args.relation_kinds)
    heads = args.relation_heads or getattr(student.config, "num_attention_heads", None)
    s_widths, t_widths = state_widths(student.config), state_widths(teacher.config)
    for kind in kinds:
        s_width, t_width = s_widths[kind], t_widths[kind]
        if not heads or not s_width or not t_width or s_width % heads or t_width % heads:
            raise ValueError(
                f"relation_heads={heads} must divide the width of the {kind} relation's states in both the student "
                f"({s_width}) and the teacher ({t_width}); pick a common divisor with relation_heads."
            )
    return RelationTransfer(kinds, heads, args.relation_weight,
                            StateTap(s_mods[s_layer]), StateTap(t_mods[t_layer]), s_layer, t_layer)
