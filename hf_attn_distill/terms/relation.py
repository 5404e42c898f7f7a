"""Self-attention relation transfer: MiniLM's value relation and MiniLMv2's query/key/value relations.

For one student layer and one teacher layer (any layers, e.g. MiniLMv2's upper-middle teacher layer), the
queries, keys and values of all heads are concatenated to ``[B, T, D]`` and split into ``R`` relation heads;
each relation ``softmax(x_r x_r^T / sqrt(D / R))`` of the student learns the teacher's by KL
(:func:`~hf_attn_distill.losses.relation_kl_loss`). Relations are ``T x T`` whatever the width, so student
and teacher may differ in hidden size and head count: only both widths must divide into ``R`` heads.
``relation_kinds="vv"`` with ``R`` = the attention heads is MiniLM (v1)'s value relation.

The states come from the same selective path as attention transfer: only the two chosen attention modules
hand their ``query``/``key``/``value`` to a :class:`~hf_attn_distill.attention.capture.StateRecorder`; every other layer keeps the fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_attn_distill.attention.capture import StateRecorder
from hf_attn_distill.attention.masks import valid_token_count
from hf_attn_distill.attention.sites import find_attention_sites
from hf_attn_distill.config import RELATION_KINDS, parse_relation_kinds
from hf_attn_distill.losses import relation_kl_loss
from hf_attn_distill.terms.base import Objective, Step
from hf_attn_distill.terms.registry import TermSpec

__all__ = ["RELATION_KINDS", "RelationTransfer", "parse_relation_kinds", "state_widths"]

RELATION_INDEX = {kind: index for index, kind in enumerate(RELATION_KINDS)}  # position in (q, k, v)


class RelationTransfer(Objective):
    """``loss_relation``: relation transfer between one student and one teacher attention module (encoder
    self-attention).

    Attributes:
        kinds: relation kinds (``"qq"``, ``"kk"``, ``"vv"``); the term is their mean.
        num_heads: relation heads ``R``.
        weight: weight of the term.
        student, teacher: :class:`~hf_attn_distill.attention.capture.StateRecorder` of the two modules.
        student_layer, teacher_layer: the 0-based layers.
    """

    name, weight_field = "loss_relation", "relation_weight"
    specs = (
        TermSpec(
            "loss_relation",
            "relation_weight",
            settings=("relation_kinds", "relation_heads", "relation_teacher_layer", "relation_student_layer"),
            card="self-attention relation transfer ({relation_kinds})",
        ),
    )

    def __init__(
        self,
        kinds,
        num_heads: int,
        weight: float,
        student: StateRecorder,
        teacher: StateRecorder,
        student_layer: int,
        teacher_layer: int,
    ):
        self.kinds, self.num_heads, self.weight = tuple(kinds), num_heads, weight
        self.student, self.teacher = student, teacher
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self._teacher_states = self._student_states = None

    def relation_loss(self, student_states, teacher_states, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over kinds of :func:`~hf_attn_distill.losses.relation_kl_loss` of the recorded states."""
        losses = [
            relation_kl_loss(student_states[RELATION_INDEX[k]], teacher_states[RELATION_INDEX[k]], self.num_heads, mask)
            for k in self.kinds
        ]
        return torch.stack(losses).mean()

    def start_teacher(self, inputs) -> None:
        self.teacher.start()

    def read_teacher(self, step: Step) -> None:
        self._teacher_states = self.teacher.states()
        self.teacher.stop()

    def start_student(self, step: Step) -> None:
        self.student.start()

    def read_student(self, step: Step) -> None:
        states = self.student.states()
        if step.training and torch.is_grad_enabled() and not states[0].requires_grad:
            raise RuntimeError(
                f"The student's queries, keys and values at relation_student_layer={self.student_layer} carry no "
                "gradient (reentrant gradient checkpointing turned on on the model, or that layer frozen), so "
                "loss_relation would train nothing: enable checkpointing with use_reentrant=False, or unfreeze the "
                "layer."
            )
        self._student_states = states

    def loss(self, step: Step) -> torch.Tensor:
        student, teacher = self._student_states, self._teacher_states
        self._student_states = self._teacher_states = None
        return self.relation_loss(student, teacher, step.inputs.get("attention_mask"))

    def count(self, inputs) -> torch.Tensor:
        """What the term averages over in a batch: its valid tokens."""
        return valid_token_count(inputs)

    def stop(self) -> None:
        self.student.stop()
        self.teacher.stop()
        self._student_states = self._teacher_states = None

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, args, capture) -> list[Objective]:
        """The relation transfer ``args`` asks for (none when ``relation_weight`` is 0), checked: layers in
        range, widths divisible into the relation heads, no reentrant gradient checkpointing."""
        if args.relation_weight == 0:
            return []
        if getattr(student.config, "is_encoder_decoder", False):
            raise ValueError(
                "relation_weight > 0 is implemented for encoder-only and decoder-only models; set relation_weight=0 and "
                "use attention transfer (layer_map, decoder_layer_map, cross_layer_map) for "
                "encoder-decoders."
            )
        checkpointing, kwargs = checkpointing_settings(args)
        if checkpointing and (kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "Relation transfer reads the student's queries, keys and values with their gradient, "
                "which reentrant checkpointing does not keep: use activation_checkpointing_kwargs "
                "(gradient_checkpointing_kwargs on older transformers)={'use_reentrant': False}."
            )
        s_sites, t_sites = find_attention_sites(student), find_attention_sites(teacher)
        # encoders: their self-attention; decoder-only LMs: their causal self-attention (a position's queries, keys
        # and values depend on the past only, so relations over every pair of valid positions leak nothing)
        site = "encoder" if "encoder" in s_sites else "decoder"
        if site not in s_sites or site not in t_sites:
            raise ValueError(
                f"Relation transfer needs a self-attention site in both models; the student has {sorted(s_sites)}, "
                f"the teacher {sorted(t_sites)}. Set relation_weight=0."
            )
        s_mods, t_mods = s_sites[site], t_sites[site]
        s_layer = _layer(args.relation_student_layer, len(s_mods), "relation_student_layer")
        t_layer = _layer(args.relation_teacher_layer, len(t_mods), "relation_teacher_layer")
        kinds = parse_relation_kinds(args.relation_kinds)
        heads = args.relation_heads or getattr(student.config, "num_attention_heads", None)
        s_widths, t_widths = state_widths(student.config), state_widths(teacher.config)
        for kind in kinds:
            s_width, t_width = s_widths[kind], t_widths[kind]
            if not heads or not s_width or not t_width or s_width % heads or t_width % heads:
                raise ValueError(
                    f"relation_heads={heads} must divide the width of the {kind} relation's states in both the "
                    f"student ({s_width}) and the teacher ({t_width}); pick a common divisor with relation_heads."
                )
        recorders = capture.state_recorder(s_mods[s_layer]), capture.state_recorder(t_mods[t_layer])
        for model in (student, teacher):
            capture.enable(model)
        return [cls(kinds, heads, args.relation_weight, *recorders, s_layer, t_layer)]


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
        raise ValueError(
            f"{name}={index} is out of range for a model with {count} layers (0..{count - 1}, or -1 for the last)."
        )
    return resolved
