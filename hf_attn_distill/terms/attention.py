"""Which attention each site transfers: layer pairs, weights, masks and recorders, checked against both models.

One :class:`SiteTransfer` per attention site (``"encoder"``, ``"decoder"``, ``"cross"``, see
:mod:`~hf_attn_distill.attention.sites`) that the configuration maps. Its masks follow the site:

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

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from hf_attn_distill.attention.capture import Capture
from hf_attn_distill.attention.fused import TransferTarget
from hf_attn_distill.attention.layer_map import resolve_layer_map
from hf_attn_distill.attention.masks import attention_loss_count, recorded_quantity
from hf_attn_distill.attention.sites import AttentionLayer, find_attention_sites
from hf_attn_distill.attention.streamed import (
    ROW_BLOCK_ELEMENTS,
    AttentionRows,
    keeps_attention,
    keeps_dropout_masks,
)
from hf_attn_distill.config import ATTENTION_SITES, AttentionSite
from hf_attn_distill.losses import group_teacher_heads
from hf_attn_distill.terms.base import Objective, Step
from hf_attn_distill.terms.registry import TermSpec

__all__ = ["SiteTransfer", "check_attention_sites", "site_layer_maps", "target_mask"]

logger = logging.get_logger(__name__)


def target_mask(inputs: Mapping) -> torch.Tensor | None:
    """Valid target (decoder) positions: ``decoder_attention_mask``, else ``labels != -100``."""
    mask = inputs.get("decoder_attention_mask")
    if torch.is_tensor(mask):
        return mask
    labels = inputs.get("labels")
    return labels.ne(-100) if torch.is_tensor(labels) and labels.dim() == 2 else None


class SiteTransfer(Objective):
    """Attention transfer at one site (``loss_attn_enc``, ``loss_attn_dec`` or ``loss_attn_cross``).

    The teacher's mapped layers keep what recomputes their attention rows (queries, keys, mask:
    :class:`~hf_attn_distill.attention.streamed.AttentionRows`); each mapped student layer then computes its output
    and transfer loss block by block over query rows (:mod:`~hf_attn_distill.attention.streamed`), and the term is
    the mean over the pairs. A teacher whose attention is read as probabilities (DeBERTa) records them in full, and
    its students take the loss inside their softmax (:mod:`~hf_attn_distill.attention.fused`).

    Attributes:
        site: ``"encoder"``, ``"decoder"`` or ``"cross"`` (:data:`~hf_attn_distill.config.ATTENTION_SITES`).
        name, weight_field, map_field: the site's term and config fields.
        pairs: ``(student layer, teacher layer)`` pairs, 0-based within the site.
        loss: the attention loss (``ATTENTION_LOSSES``).
        student_heads: head count of the student's attention at this site.
        student, teacher: recorders of the mapped modules.
        seq2seq: the models have an encoder and a decoder (target masks come from the decoder inputs).
        keep_elements: a streamed student layer whose attention has at most this many elements keeps it for
            backward (``attention_keep_mb``, :func:`~hf_attn_distill.attention.streamed.keeps_attention`).
    """

    specs = tuple(
        TermSpec(
            site.term,
            site.weight_field,
            map_field=site.map_field,
            settings=(
                ("attention_loss", site.map_field, "head_grouping") if site.name == "encoder" else (site.map_field,)
            ),
            shown="always" if site.name == "encoder" else "map",
            card=site.name,
            card_group="attention",
        )
        for site in ATTENTION_SITES
    )

    def __init__(
        self,
        site: AttentionSite,
        pairs,
        loss: str,
        student_heads: int,
        student,
        teacher,
        seq2seq: bool,
        keep_elements: int | None = None,
    ):
        self.site, self.pairs, self.loss_kind, self.student_heads = site.name, list(pairs), loss, student_heads
        self.student, self.teacher, self.seq2seq = student, teacher, seq2seq
        self.keep_elements = keep_elements
        self._logged_paths = False
        self.name, self.weight_field, self.map_field = site.term, site.weight_field, site.map_field
        self._records: list | None = None
        self._losses: list | None = None

    @classmethod
    def build(cls, student: PreTrainedModel, teacher: PreTrainedModel, args, capture: Capture) -> list[Objective]:
        """One transfer per site ``args`` maps, checked against both models; attaches capture to the mapped
        layers (the ``"hf_attn_distill"`` implementation for models that dispatch through ``AttentionInterface``)."""
        maps = site_layer_maps(student, teacher, args)
        if not maps:
            return []
        s_sites, t_sites = find_attention_sites(student), find_attention_sites(teacher)
        transfers = []
        for site, pairs in maps:
            s_layers = [s_sites[site.name][s] for s, _ in pairs]
            t_layers = [t_sites[site.name][t] for _, t in pairs]
            _check_layers(s_layers, "student", args)
            _check_layers(t_layers, "teacher", args)
            transfers.append(
                cls(
                    site,
                    pairs,
                    args.attention_loss,
                    s_layers[0].heads,
                    capture.attention_recorder(s_layers, args.attention_loss),
                    # the teacher keeps what recomputes its rows (queries, keys, mask), not the rows
                    capture.attention_recorder(t_layers, args.attention_loss, rows=True),
                    "cross" in s_sites,
                    int(args.attention_keep_mb * 2**20) // 4,  # float32 elements
                )
            )
        for model, sites in ((student, s_sites), (teacher, t_sites)):
            if any(layer.probabilities is None for layers in sites.values() for layer in layers):
                capture.enable(model)
        return transfers

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
        return attention_loss_count(self.loss_kind, 1, batch, num_q, num_k, key, query, causal, device)

    def targets(self, teacher_records: list[torch.Tensor], inputs: Mapping) -> list[TransferTarget]:
        """One target per mapped student layer: the teacher's record, heads grouped to the student's count."""
        key, query, causal = self.masks(inputs)
        if torch.is_tensor(key) and bool(key.all()):
            key = None  # no padding: skip masking passes over [B, H, Q, K]
        if torch.is_tensor(query) and bool(query.all()):
            query = None
        if self.site != "cross" and query is None and key is not None:
            query = key
        quantity = recorded_quantity(self.loss_kind)
        return [
            TransferTarget(
                t if isinstance(t, AttentionRows) else group_teacher_heads(t, self.student_heads, quantity),
                self.loss_kind,
                key,
                query,
                causal,
                self.keep_elements,
            )
            for t in teacher_records
        ]

    def log_paths(self, teacher_records: list, inputs: Mapping) -> None:
        """Log (info), once, whether each mapped student layer keeps its attention blocks for backward or recomputes
        them, for the lengths of this batch (later batches of other lengths may take the other path)."""
        if self._logged_paths:
            return
        self._logged_paths = True
        batch, num_q, num_k = self.lengths(inputs)
        size = batch * self.student_heads * num_q * num_k
        limit = ROW_BLOCK_ELEMENTS if self.keep_elements is None else self.keep_elements
        for (s, t), record in zip(self.pairs, teacher_records):
            if not isinstance(record, AttentionRows):
                path = "fused (the teacher's probabilities are recorded in full)"
            elif keeps_attention(batch, self.student_heads, num_q, num_k, self.keep_elements):
                path = "kept for backward, no recompute"
            elif keeps_dropout_masks(batch, self.student_heads, num_q, num_k, self.keep_elements):
                path = "blocks recomputed in backward (attention-dropout masks kept, 1 byte an entry)"
            else:
                path = "blocks recomputed in backward"
            logger.info(
                f"{self.name}: student layer {s} <- teacher layer {t}: attention {batch}x{self.student_heads}x"
                f"{num_q}x{num_k} ({size * 4 / 2**20:.1f} MB float32, attention_keep_mb "
                f"{limit * 4 / 2**20:g}, for this batch's lengths): {path}"
            )

    # ---- the objective's steps ----

    def start_teacher(self, inputs: Mapping) -> None:
        self.teacher.start()

    def read_teacher(self, step: Step) -> None:
        self._records = self.teacher.collect()
        self.teacher.stop()

    def start_student(self, step: Step) -> None:
        if self._records is None:
            raise RuntimeError(f"{self.name}: the teacher's attention was not recorded for this batch.")
        self.log_paths(self._records, step.inputs)
        self.student.start(self.targets(self._records, step.inputs))
        self._records = None

    def read_student(self, step: Step) -> None:
        self._losses = self.student.collect()

    def loss(self, step: Step) -> torch.Tensor:
        losses, self._losses = self._losses, None
        return torch.stack(losses).mean()

    def stop(self) -> None:
        self.student.stop()
        self.teacher.stop()
        self._records = self._losses = None

    @property
    def term(self) -> str:
        """The site's term name (``loss_attn_enc``, ...), as :attr:`name`."""
        return self.name


def site_layer_maps(student: PreTrainedModel, teacher: PreTrainedModel, args) -> list[tuple[AttentionSite, list]]:
    """``[(site, pairs)]`` for every site ``args`` transfers, resolved and checked against both models without
    changing them: both must have the same sites, maps in range, head counts that can be grouped.

    For a model whose only stack is causal (a decoder-only model), ``layer_map`` maps that stack.
    """
    if not args.uses_attention:
        return []
    s_sites, t_sites = find_attention_sites(student), find_attention_sites(teacher)
    if set(s_sites) != set(t_sites):
        raise ValueError(
            f"Student attention sites {sorted(s_sites)} differ from the teacher's {sorted(t_sites)}: distill an "
            "encoder into an encoder and an encoder-decoder into an encoder-decoder."
        )
    encoder, decoder, _ = ATTENTION_SITES
    decoder_only = set(s_sites) == {"decoder"}
    out = []
    for site in ATTENTION_SITES:
        spec_site = site
        if decoder_only and site is decoder and args.decoder_layer_map is None:
            spec_site = encoder  # layer_map / attention_weight map the only (causal) stack
        elif decoder_only and site is encoder and args.decoder_layer_map is None:
            continue
        if not args.site_is_on(spec_site):
            continue
        if site.name not in s_sites:
            raise ValueError(
                f"{site.map_field} is set, but the models have no {site.name} attention (sites: {sorted(s_sites)}). "
                f"Remove {site.map_field} or set its weight to 0."
            )
        try:
            pairs = resolve_layer_map(
                getattr(args, spec_site.map_field), len(s_sites[site.name]), len(t_sites[site.name])
            )
        except ValueError as err:
            raise ValueError(f"{spec_site.map_field} ({site.name} attention): {err}") from None
        _check_heads(
            site.name, s_sites[site.name][pairs[0][0]].heads, t_sites[site.name][pairs[0][1]].heads, args.head_grouping
        )
        _check_windows(site.name, spec_site.map_field, pairs, s_sites[site.name], t_sites[site.name])
        if spec_site is not site:
            site = AttentionSite(site.name, spec_site.map_field, spec_site.weight_field, site.term)
        out.append((site, pairs))
    return out


def _check_layers(layers: list[AttentionLayer], side: str, args) -> None:
    """Refuse mapped layers the recording path cannot reproduce, before training starts."""
    for layer in layers:
        if layer.refused:
            raise NotImplementedError(
                f"The {side}'s {type(layer.module).__name__} passes {list(layer.refused)} to its attention "
                "function; recorded layers do not reproduce them, and dropping them would make the recorded "
                "attention and the model's output wrong. Map only layers without them, or set attention_weight=0 "
                "to distill logits only."
            )
        if layer.probabilities is not None and args.attention_loss == "mse_scores":
            raise ValueError(
                f"The {side}'s {type(layer.module).__name__} computes attention in its own code: its probabilities "
                "can be read, its pre-softmax scores cannot. Use attention_loss='kl' or 'mse_probs'."
            )
        if layer.call is not None and args.gradient_checkpointing:
            raise ValueError(
                f"The {side} calls one {type(layer.module).__name__} at every depth (shared layers, as in ALBERT); "
                "gradient checkpointing calls it again during backward, so a depth's attention cannot be told "
                "apart. Set gradient_checkpointing=False for this pair."
            )


def check_attention_sites(student: PreTrainedModel, teacher: PreTrainedModel, args) -> None:
    """Raise ``ValueError`` naming the fix when ``args``'s attention sites do not fit the two models."""
    site_layer_maps(student, teacher, args)


def _reach(layer: AttentionLayer) -> float:
    return float("inf") if layer.sliding_window is None else layer.sliding_window


def _check_windows(site: str, map_field: str, pairs, s_layers, t_layers) -> None:
    """Refuse a student layer whose sliding window is narrower than its teacher layer's: the teacher would put
    attention where the student cannot look, and the loss would compare masked entries."""
    bad = [(s, t) for s, t in pairs if _reach(s_layers[s]) < _reach(t_layers[t])]
    if not bad:
        return
    s, t = bad[0]

    def nearest(i: int, j: int) -> int | None:  # the teacher layer nearest to j that student layer i can follow
        fits = [k for k, layer in enumerate(t_layers) if _reach(layer) <= _reach(s_layers[i])]
        return min(fits, key=lambda k: abs(k - j)) if fits else None

    suggestion = ",".join(f"{i}:{nearest(i, j)}" for i, j in pairs if nearest(i, j) is not None)
    raise ValueError(
        f"{map_field} ({site} attention) maps student layer {s} (sliding window {s_layers[s].sliding_window}) to "
        f"teacher layer {t} (sliding window {t_layers[t].sliding_window}): the teacher attends where the student "
        "cannot. Map "
        f"sliding-window student layers to teacher layers with the same or a narrower window, e.g. "
        f"{map_field}={suggestion!r}."
    )


def _check_heads(site: str, s_heads: int, t_heads: int, head_grouping: str) -> None:
    if s_heads == t_heads or (head_grouping == "mean" and t_heads % s_heads == 0):
        return
    divisors = [d for d in range(1, t_heads + 1) if t_heads % d == 0]
    reason = "head_grouping='strict'" if head_grouping == "strict" else "it is not a multiple of the student's"
    raise ValueError(
        f"Teacher {site} attention has {t_heads} heads and the student's {s_heads}, and {reason}. Options: give the "
        f"student a head count that divides {t_heads} ({divisors}) with head_grouping='mean' (teacher heads are "
        "averaged in groups), or set that site's attention weight to 0 and transfer MiniLMv2's self-attention "
        "relations instead (relation_weight > 0, relation_heads: any head counts), or leave attention out."
    )
