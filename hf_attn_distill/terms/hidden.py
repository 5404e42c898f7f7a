"""Hidden-state transfer (TinyBERT MSE through a learned projection, DistilBERT cosine) on the encoder layer map.

The student's hidden states at the mapped layers (and the embedding output) learn the teacher's at the
layers the encoder ``layer_map`` (or ``hidden_layer_map``) pairs them with. When the widths differ, one
learned ``nn.Linear(student width, teacher width)`` shared by all pairs (TinyBERT's ``W_h``) projects the
student's states. The projection is attached to the student as the submodule :data:`PROJECTION_NAME`, so
it trains with the student's optimizer, is synchronised by DDP and saved in checkpoints (and restored on
resume); :class:`~hf_attn_distill.DistillTrainer` leaves it out of the exported student.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hf_attn_distill.attention.layer_map import resolve_layer_map
from hf_attn_distill.attention.masks import valid_token_count
from hf_attn_distill.losses import hidden_cosine_loss, hidden_mse_loss
from hf_attn_distill.terms.base import Objective, Step
from hf_attn_distill.terms.registry import TermSpec

__all__ = ["HIDDEN_LOSSES", "PROJECTION_NAME", "HiddenTransfer"]

HIDDEN_LOSSES = {"mse": hidden_mse_loss, "cosine": hidden_cosine_loss}
PROJECTION_NAME = "hf_attn_distill_hidden_projection"


def _encoder_config(model: nn.Module):
    config = model.config
    return getattr(config, "encoder", config)


def _num_layers(config) -> int:
    for name in ("num_hidden_layers", "encoder_layers", "num_layers", "n_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"Cannot tell how many layers {type(config).__name__} has; hidden-state transfer needs it.")


def _width(config) -> int:
    for name in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"Cannot tell the hidden width of {type(config).__name__}; hidden-state transfer needs it.")


class HiddenTransfer(Objective):
    """``loss_hidden``: hidden-state transfer between mapped layers.

    Attributes:
        pairs: ``(student, teacher)`` indices into the models' ``hidden_states`` tuples (``0`` = embedding
            output, ``i + 1`` = output of layer ``i``).
        loss_kind: ``"mse"`` or ``"cosine"`` (:data:`HIDDEN_LOSSES`).
        weight: weight of the term.
        projection: the student-width -> teacher-width ``nn.Linear``, or ``None`` when the widths match.
    """

    name, weight_field = "loss_hidden", "hidden_weight"
    specs = (
        TermSpec(
            "loss_hidden",
            "hidden_weight",
            settings=("hidden_loss", "hidden_layer_map"),
            card="hidden-state transfer ({hidden_loss})",
        ),
    )
    teacher_forward_kwargs = student_forward_kwargs = {"output_hidden_states": True}

    def __init__(self, pairs: Sequence[tuple[int, int]], loss: str, weight: float, projection: nn.Module | None):
        self.pairs = list(pairs)
        self.loss_kind = loss
        self.weight = weight
        self.projection = projection
        self.outside_forward = projection is not None  # DDP must not look for unused parameters

    def __call__(
        self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean over pairs of the per-pair loss; each pair's loss is the mean over valid tokens."""
        if student_states is None or teacher_states is None:
            raise ValueError("Hidden-state transfer needs both models to return hidden_states (output_hidden_states).")
        fn = HIDDEN_LOSSES[self.loss_kind]
        losses = []
        for s, t in self.pairs:
            student = student_states[s]
            if self.projection is not None:
                student = self.projection(student)
            losses.append(fn(student, teacher_states[t].to(student.dtype), mask))
        return torch.stack(losses).mean()

    def loss(self, step: Step) -> torch.Tensor:
        return self(
            step.outputs.get("hidden_states"),
            step.teacher_outputs.get("hidden_states"),
            step.inputs.get("attention_mask"),
        )

    def count(self, inputs) -> torch.Tensor:
        """What the term averages over in a batch: its valid tokens."""
        return valid_token_count(inputs)

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, args, capture) -> list[Objective]:
        """The hidden-state transfer ``args`` asks for (none when ``hidden_weight`` is 0); attaches the
        projection to ``student`` through ``capture`` when the widths differ (or reuses the one already there,
        e.g. after resume)."""
        if args.hidden_weight == 0:
            return []
        if getattr(student.config, "is_encoder_decoder", False):
            raise ValueError(
                "hidden_weight > 0 is implemented for encoder-only models; for encoder-decoder models use attention "
                "transfer (layer_map, decoder_layer_map, cross_layer_map) and set hidden_weight=0."
            )
        spec = args.hidden_layer_map or args.layer_map
        if spec in (None, "none"):
            raise ValueError(
                "hidden_weight > 0 needs a layer map: set hidden_layer_map (or layer_map) to 'uniform', "
                "'last' or pairs."
            )
        s_config, t_config = _encoder_config(student), _encoder_config(teacher)
        try:
            layer_pairs = resolve_layer_map(spec, _num_layers(s_config), _num_layers(t_config))
        except ValueError as err:
            raise ValueError(f"hidden_layer_map: {err}") from None
        pairs = ([(0, 0)] if args.hidden_include_embeddings else []) + [(s + 1, t + 1) for s, t in layer_pairs]
        s_width, t_width = _width(s_config), _width(t_config)
        projection = getattr(student, PROJECTION_NAME, None)
        if projection is not None and s_width == t_width:
            delattr(student, PROJECTION_NAME)  # left from a wider/narrower teacher: unused now, so not trained or saved
            projection = None
        if projection is not None and (projection.in_features, projection.out_features) != (s_width, t_width):
            raise ValueError(
                f"The student carries a hidden-state projection {projection.in_features} -> {projection.out_features} "
                f"from another teacher, but this pair needs {s_width} -> {t_width}: remove it with "
                f"delattr(student, {PROJECTION_NAME!r}) to train a new one."
            )
        if s_width != t_width and projection is None:
            projection = nn.Linear(s_width, t_width)
            nn.init.normal_(projection.weight, std=getattr(s_config, "initializer_range", 0.02))
            nn.init.zeros_(projection.bias)
            reference = next(student.parameters())
            projection = projection.to(device=reference.device, dtype=reference.dtype)
        if projection is not None:
            if args.ddp_find_unused_parameters:
                raise ValueError(
                    "ddp_find_unused_parameters=True cannot be combined with the hidden-state projection (hidden_weight "
                    "> 0 with different widths), which is used outside the student's forward: leave "
                    "ddp_find_unused_parameters unset (DistillTrainer sets it to False) or set hidden_weight=0."
                )
            if args.world_size > 1 and args.alpha_ce == 0 and args.alpha_kd == 0:
                raise ValueError(
                    "With alpha_ce=0 and alpha_kd=0 the student's output head gets no gradient, which DDP refuses "
                    "without ddp_find_unused_parameters (off because of the hidden-state projection): keep alpha_kd "
                    "or alpha_ce > 0 in multi-process training, or use a student as wide as the teacher."
                )
            capture.attach_module(student, PROJECTION_NAME, projection)
        return [cls(pairs, args.hidden_loss, args.hidden_weight, projection)]
