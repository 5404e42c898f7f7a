"""Which attention each site transfers: layer pairs, weights, masks and recorders, checked against both models.

One :class:`SiteTransfer` per attention site (``"encoder"``, ``"decoder"``, ``"cross"``, see
:mod:`~hf_attn_distill.model_structure`) that the configuration maps. Its masks follow the site:

| site | keys | queries | causal |
|---|---|---|---|
| encoder self-attention | source padding | source padding | no |
| decoder self-attention | target padding | target padding | yes |
| cross-attention | source padding | target padding | no |

For a model whose only stack is causal (a decoder-only model), ``layer_map`` maps that stack, with the
input's padding as target padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .attention_capture import AttentionRecorder, enable_attention_capture, verify_capture
from .attention_masks import attention_loss_count, recorded_quantity
from .config import DistillConfig
from .fused_transfer import TransferTarget
from .layer_map import resolve_layer_map
from .losses import group_teacher_heads
from .model_structure import attention_heads, find_attention_sites

__all__ = ["SITE_TERMS", "SiteTransfer", "plan_attention_transfer", "target_mask"]

SITE_TERMS = {"encoder": "loss_attn_enc", "decoder": "loss_attn_dec", "cross": "loss_attn_cross"}
_SITE_FLAGS = {"encoder": "layer_map", "decoder": "decoder_layer_map", "cross": "cross_layer_map"}


def target_mask(inputs: Mapping) -> torch.Tensor | None:
    """Valid target (decoder) positions: ``decoder_attention_mask``, else ``labels != -100``."""
    mask = inputs.get("decoder_attention_mask")
    if torch.is_tensor(mask):
        return mask
    labels = inputs.get("labels")
    return labels.ne(-100) if torch.is_tensor(labels) and labels.dim() == 2 else None


@dataclass
class SiteTransfer:
    """Attention transfer at one site.

    Attributes:
        site: ``"encoder"``, ``"decoder"`` or ``"cross"``.
        pairs: ``(student layer, teacher layer)`` pairs, 0-based within the site.
        weight: weight of the site's term in the loss.
        loss: the attention loss (``ATTENTION_LOSSES``).
        student_heads: head count of the student's attention at this site.
        student: recorder of the student's mapped modules (fused losses).
        teacher: recorder of the teacher's mapped modules.
        seq2seq: the models have an encoder and a decoder (target masks come from the decoder inputs).
    """

    site: str
    pairs: list[tuple[int, int]]
    weight: float
    loss: str
    student_heads: int
    student: AttentionRecorder
    teacher: AttentionRecorder
    seq2seq: bool

    @property
    def term(self) -> str:
        """Name of the site's loss term in logs (``loss_attn_enc``, ``loss_attn_dec``, ``loss_attn_cross``)."""
        return SITE_TERMS[self.site]

    def masks(self, inputs: Mapping) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """``(key mask [B, K], query mask [B, Q], causal)`` of this site for a batch."""
        source = inputs.get("attention_mask")
        target = target_mask(inputs) if self.seq2seq else source
        if self.site == "encoder":
            return source, source, False
        if self.site == "decoder":
            return target, target, True
        return source, target, False

    def lengths(self, inputs: Mapping) -> tuple[int, int, int]:
        """``(batch, queries, keys)`` of this site's attention for a batch."""
        source = inputs.get("input_ids", inputs.get("attention_mask"))
        target = inputs.get("decoder_input_ids", source)
        queries = source if self.site == "encoder" else target
        keys = target if self.site == "decoder" else source
        return queries.shape[0], queries.shape[1], keys.shape[1]

    def count(self, inputs: Mapping) -> torch.Tensor:
        """How many items this site's loss averages over in a batch (per head)."""
        key, query, causal = self.masks(inputs)
        batch, num_q, num_k = self.lengths(inputs)
        device = next(v for v in inputs.values() if torch.is_tensor(v)).device
        return attention_loss_count(self.loss, 1, batch, num_q, num_k, key, query, causal, device)

    def targets(self, teacher_records: list[torch.Tensor], inputs: Mapping) -> list[TransferTarget]:
        """One target per mapped student layer: the teacher's record, heads grouped to the student's count."""
        key, query, causal = self.masks(inputs)
        if torch.is_tensor(key) and bool(key.all()):
            key = None  # no padding: skip masking passes over [B, H, Q, K]
        if torch.is_tensor(query) and bool(query.all()):
            query = None
        if self.site != "cross" and query is None and key is not None:
            query = key
        quantity = recorded_quantity(self.loss)
        return [
            TransferTarget(group_teacher_heads(t, self.student_heads, quantity), self.loss, key, query, causal)
            for t in teacher_records
        ]


def _site_maps(args: DistillConfig, sites: Mapping[str, list]) -> dict[str, tuple[object, float]]:
    """``{site: (layer-map spec, weight)}`` of the sites ``args`` maps, checked against the sites ``sites`` has."""
    maps = {"encoder": (args.layer_map, args.attention_weight),
            "decoder": (args.decoder_layer_map, args.decoder_attention_weight),
            "cross": (args.cross_layer_map, args.cross_attention_weight)}
    decoder_only = "encoder" not in sites and "cross" not in sites and "decoder" in sites
    if decoder_only and args.decoder_layer_map is None:
        maps["decoder"], maps["encoder"] = maps["encoder"], (None, 0.0)
    out = {}
    for site, (spec, weight) in maps.items():
        if spec is None or weight == 0:
            continue
        if site not in sites:
            raise ValueError(
                f"{_SITE_FLAGS[site]} is set, but the models have no {site} attention (sites: {sorted(sites)}). "
                f"Remove {_SITE_FLAGS[site]} or set its weight to 0."
            )
        out[site] = (spec, weight)
    return out


def plan_attention_transfer(
    student: PreTrainedModel, teacher: PreTrainedModel, args: DistillConfig
) -> list[SiteTransfer]:
    """Resolve and check every mapped site; return the transfers (empty when attention transfer is off).

    Raises ``ValueError`` naming the fix for layer maps out of range or for a site a model lacks, and for
    head counts that cannot be grouped.
    """
    if not any(w > 0 for w in (args.attention_weight, args.decoder_attention_weight, args.cross_attention_weight)):
        return []
    enable_attention_capture(student)
    enable_attention_capture(teacher)
    s_sites, t_sites = find_attention_sites(student), find_attention_sites(teacher)
    if set(s_sites) != set(t_sites):
        raise ValueError(
            f"Student attention sites {sorted(s_sites)} differ from the teacher's {sorted(t_sites)}: distill an "
            "encoder into an encoder and an encoder-decoder into an encoder-decoder."
        )
    maps = _site_maps(args, s_sites)
    if not maps:
        return []
    transfers = []
    for site, (spec, weight) in maps.items():
        try:
            pairs = resolve_layer_map(spec, len(s_sites[site]), len(t_sites[site]))
        except ValueError as err:
            raise ValueError(f"{_SITE_FLAGS[site]} ({site} attention): {err}") from None
        s_mods = [s_sites[site][s] for s, _ in pairs]
        t_mods = [t_sites[site][t] for _, t in pairs]
        s_heads, t_heads = attention_heads(s_mods[0]), attention_heads(t_mods[0])
        _check_heads(site, s_heads, t_heads, args.head_grouping)
        transfers.append(SiteTransfer(
            site=site, pairs=pairs, weight=weight, loss=args.attention_loss, student_heads=s_heads,
            student=AttentionRecorder(s_mods, args.attention_loss), teacher=AttentionRecorder(t_mods, args.attention_loss),
            seq2seq="cross" in s_sites,
        ))
    for models, side in ((student, "student"), (teacher, "teacher")):
        recorders = [getattr(t, side) for t in transfers]
        verify_capture(models, AttentionRecorder([m for r in recorders for m in r.modules], args.attention_loss))
    return transfers


def _check_heads(site: str, s_heads: int, t_heads: int, head_grouping: str) -> None:
    if s_heads == t_heads or (head_grouping == "mean" and t_heads % s_heads == 0):
        return
    divisors = [d for d in range(1, t_heads + 1) if t_heads % d == 0]
    reason = "head_grouping='strict'" if head_grouping == "strict" else "it is not a multiple of the student's"
    raise ValueError(
        f"Teacher {site} attention has {t_heads} heads and the student's {s_heads}, and {reason}. Options: give the "
        f"student a head count that divides {t_heads} ({divisors}) with head_grouping='mean' (teacher heads are "
        "averaged in groups), or set that site's attention weight to 0 to leave it out."
    )
