"""Selective attention capture through the transformers ``AttentionInterface``.

``output_attentions=True`` forces the slow eager path on *every* layer and returns probabilities
*after* attention dropout. Instead we register one attention implementation, ``"hf_attn_distill"``:
layers nobody records run PyTorch's ``scaled_dot_product_attention`` exactly like ``"sdpa"``; the
few layers an :class:`AttentionRecorder` watches compute their scores explicitly and store the
pre-dropout log-probabilities (or raw scores) for the loss, or take the loss inside their softmax.
The matching mask function (the one ``"sdpa"`` uses) is registered too, otherwise transformers would
silently drop the padding mask.

Three things a recorded layer survives:

- **gradient checkpointing**: a recorder stays active until :meth:`AttentionRecorder.stop`, so a layer
  re-run in backward takes the same path and saves the same tensors. With ``use_reentrant=True`` the
  first forward runs without autograd; the layer then records the loss value, and its recomputation in
  backward receives the loss's gradient through a side channel filled by the loss node of
  :meth:`AttentionRecorder.collect` (which autograd runs first: it is the newest node of the graph);
- **torch.compile**: a module's recording state lives in a per-module object that never changes
  identity, and the recording branch is excluded from compilation (``torch.compiler.disable``), so
  unrecorded layers compile and recorded ones run eagerly without recompilations;
- **extra attention inputs**: T5's ``position_bias`` is added to the scores as ``"sdpa"`` adds it; a
  ``sliding_window`` (ModernBERT's local layers, Qwen2) is honoured through the mask it comes with, exactly as
  ``"sdpa"`` honours it; logit soft-capping and attention sinks are refused with an error, never dropped;
- **models that compute attention in their own code** (DeBERTa-v2/v3): the probabilities are read, with their
  gradient, where they enter the attention dropout (:class:`~hf_attn_distill.AttentionLayer.probabilities`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_attn_distill.attention.fused import TransferTarget, attention_blocks, softmax_with_transfer_loss
from hf_attn_distill.attention.masks import ATTENTION_LOSSES, recorded_quantity
from hf_attn_distill.attention.streamed import AttentionMask, AttentionRows, streamed_transfer
from hf_attn_distill.losses import attention_kl_loss, attention_mse_loss, group_teacher_heads

__all__ = [
    "ATTN_IMPLEMENTATION",
    "POINT_ATTR",
    "UNSUPPORTED_ATTENTION_KWARGS",
    "AttentionRecorder",
    "Capture",
    "CaptureMissedError",
    "StateRecorder",
    "enable_attention_capture",
    "probability_rows",
    "recording_attention_forward",
    "set_attention_implementation",
]

ATTN_IMPLEMENTATION = "hf_attn_distill"
POINT_ATTR = "_hf_attn_distill_point"
# Attention inputs that change the attention pattern in ways the recording path does not reproduce.
UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")
_MIN = torch.finfo(torch.float32).min


class _Slot:
    """What one recorded layer (a module, or one call of a shared module) fills: ``records[index]``, with the
    attention loss ``loss``, towards ``target`` (``None``: record the attention itself)."""

    __slots__ = ("deferred", "index", "loss", "records", "rows", "target")

    def __init__(self) -> None:
        self.rows = False  # without autograd and target: record AttentionRows (what recomputes the attention)
        self.records: list | None = None
        self.index = 0
        self.loss = "kl"
        self.target: TransferTarget | None = None
        self.deferred: _GradCell | None = None


class _CapturePoint:
    """Capture state of one attention module, with two typed slots: the attention slots (``slots``: keyed by
    the module's call number in a forward, ``None`` for every call; what an :class:`AttentionRecorder` reads or
    computes) and the state slot (``states``: the ``(query, key, value)`` of call ``state_call`` that a
    :class:`StateRecorder` reads). ``probe`` collects call descriptions for site discovery. The object keeps its
    identity while attached."""

    def __init__(self) -> None:
        self.slots: dict[int | None, _Slot] = {}
        self.calls = 0
        self.states: list | None = None
        self.state_call: int | None = None
        self.probe: list | None = None

    @property
    def active(self) -> bool:
        return bool(self.slots)

    def take(self) -> tuple[int, _Slot | None]:
        """Count one call; return its number (since the last start) and the slot recording it, if any."""
        call = self.calls
        self.calls += 1
        slot = self.slots.get(None)
        return call, (slot if slot is not None else self.slots.get(call))

    def reset(self) -> None:
        self.slots.clear()
        self.calls = 0
        self.states, self.state_call = None, None


def point_of(module: nn.Module) -> _CapturePoint:
    """The capture point attached to ``module``, attached now if it has none."""
    point = getattr(module, POINT_ATTR, None)
    if point is None:
        point = _CapturePoint()
        setattr(module, POINT_ATTR, point)
    return point


class CaptureMissedError(RuntimeError):
    """Recorded attention modules were not called through the ``"hf_attn_distill"`` implementation."""


class _GradCell:
    """Holds the gradient of a layer loss computed without autograd (reentrant checkpointing)."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


class _DeferredLoss(torch.autograd.Function):
    """Returns ``value``; in backward, stores the incoming gradient in ``cell`` for the layer's recomputation."""

    @staticmethod
    def forward(ctx, anchor, value, cell):
        ctx.cell = cell
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.cell.grad = grad
        return None, None, None


class _InjectLossGrad(torch.autograd.Function):
    """Identity on the attention output; in backward, feeds ``cell.grad`` to the recomputed layer loss."""

    @staticmethod
    def forward(ctx, out, loss, cell):
        ctx.cell = cell
        return out.clone()

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.cell.grad is None:
            raise RuntimeError(
                "The attention-transfer loss of a checkpointed layer got no gradient before its recomputation. "
                "Use activation_checkpointing_kwargs (gradient_checkpointing_kwargs on older transformers)="
                "{'use_reentrant': False}, the transformers default."
            )
        return grad_out, ctx.cell.grad, None


def _layer_parts(layer) -> tuple[nn.Module, int | None, nn.Module | None]:
    """``(module, call, probabilities module)`` of a module or an :class:`~hf_attn_distill.AttentionLayer`."""
    return getattr(layer, "module", layer), getattr(layer, "call", None), getattr(layer, "probabilities", None)


class AttentionRecorder:
    """Records attention of chosen layers during forward passes.

    Args:
        modules: the layers to watch, in the order their records are returned: attention modules, or
            :class:`~hf_attn_distill.AttentionLayer` objects from :func:`~hf_attn_distill.find_attention_sites`
            (which also name one call of a module shared across depth, as in ALBERT, and the probabilities of
            attention computed in the model's own code, as in DeBERTa).
        loss: the attention loss the records are for (``ATTENTION_LOSSES``); it decides what is recorded:
            log-probabilities (``log_softmax`` of masked scores) or, for ``"mse_scores"``, raw pre-softmax
            ``q k^T * scaling (+ position bias)`` before masking.

    ``with recorder.record() as records: model(**inputs)``: afterwards ``records`` holds one ``[B, H, Q, K]``
    float32 tensor per layer (with gradient, when the forward had one). With ``record(targets=[...])``
    (one :class:`~hf_attn_distill.attention.fused.TransferTarget` per layer, typically the teacher's records
    of the same batch) each layer instead computes its transfer loss inside its softmax and ``records``
    holds one scalar loss per layer: no ``[B, H, Q, K]`` tensor outlives the layer.

    With gradient checkpointing the layers run again during backward, so recording must stay active
    until backward ends: use ``records = recorder.start(targets)``, the forward, ``recorder.collect()``,
    ``loss.backward()``, then ``recorder.stop()`` (what :class:`~hf_attn_distill.DistillTrainer` does).
    A shared module's calls are counted from :meth:`start`, so layers of shared modules cannot be recorded under
    gradient checkpointing (the recomputation calls the module again).
    """

    def __init__(self, modules: Sequence, loss: str = "kl", rows: bool = False):
        if loss not in ATTENTION_LOSSES:
            raise ValueError(f"loss must be one of {ATTENTION_LOSSES}, got {loss!r}")
        self.layers = list(modules)
        parts = [_layer_parts(layer) for layer in self.layers]
        self.modules = [module for module, _, _ in parts]
        self.calls = [call for _, call, _ in parts]
        self.probabilities = [probs for _, _, probs in parts]
        keys = [(id(module), call) for module, call, _ in parts]
        shared = {id(m) for m, c, _ in parts if c is not None} & {id(m) for m, c, _ in parts if c is None}
        if len(set(keys)) != len(keys) or shared:
            raise ValueError(
                "The same attention layer appears twice: a module called at several depths (as in ALBERT) is "
                "recorded per call; pass the AttentionLayer objects of find_attention_sites, one per depth."
            )
        if loss == "mse_scores" and any(p is not None for p in self.probabilities):
            module = next(m for m, _, p in parts if p is not None)
            raise ValueError(
                f"{type(module).__name__} computes attention in its own code: its probabilities can be read, its "
                "pre-softmax scores cannot. Use attention_loss='kl' or 'mse_probs'."
            )
        self.loss, self.rows = loss, rows
        self.points = [point_of(module) for module in self.modules]
        self.slots = [_Slot() for _ in self.modules]
        self._records: list | None = None
        self._hooks: list = []

    def start(self, targets: Sequence[TransferTarget] | None = None) -> list:
        """Activate recording; returns the list the layers fill (one entry per layer)."""
        if targets is not None and len(targets) != len(self.modules):
            raise ValueError(f"Got {len(targets)} transfer targets for {len(self.modules)} recorded modules.")
        records: list = [None] * len(self.modules)
        self._remove_hooks()
        for index, (point, slot, call, probs) in enumerate(
            zip(self.points, self.slots, self.calls, self.probabilities)
        ):
            slot.records, slot.index, slot.loss, slot.rows = records, index, self.loss, self.rows and probs is None
            slot.target = targets[index] if targets is not None else None
            slot.deferred = None
            point.slots[call] = slot
            point.calls = 0
            if probs is not None and not any(h[0] is probs for h in self._hooks):
                self._hooks.append(
                    (probs, probs.register_forward_pre_hook(_probability_hook(point, self.modules[index])))
                )
        self._records = records
        return records

    def collect(self) -> list:
        """Check every layer recorded, and connect losses computed without autograd to the graph.

        Call once after the forward, with autograd enabled if a backward follows.
        """
        records = self._records
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            self.stop()
            raise CaptureMissedError(
                f"Attention layers {missing} of the recorder were not called through the '{ATTN_IMPLEMENTATION}' "
                "attention implementation during the forward, so nothing was recorded. Either the model computes "
                "these attentions in its own code rather than through transformers' AttentionInterface, or its "
                "attention implementation was changed after enable_attention_capture(). Set attention_weight=0 "
                "to distill logits only."
            )
        if torch.is_grad_enabled():
            anchor = None
            for index, slot in enumerate(self.slots):
                if slot.deferred is not None and not records[index].requires_grad:
                    if anchor is None:
                        anchor = torch.zeros((), requires_grad=True)
                    records[index] = _DeferredLoss.apply(anchor, records[index], slot.deferred)
        return records

    def stop(self) -> None:
        """Deactivate recording and drop references to records and targets."""
        for point, slot, call in zip(self.points, self.slots, self.calls):
            if point.slots.get(call) is slot:
                del point.slots[call]
            slot.records, slot.target, slot.deferred = None, None, None
        self._remove_hooks()
        self._records = None

    def _remove_hooks(self) -> None:
        for _, handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextlib.contextmanager
    def record(
        self, enabled: bool = True, targets: Sequence[TransferTarget] | None = None
    ) -> Iterator[list[torch.Tensor | None]]:
        """Context manager around one forward pass (no gradient checkpointing: see the class docstring)."""
        if not enabled:
            yield [None] * len(self.modules)
            return
        records = self.start(targets)
        try:
            yield records
            records[:] = self.collect()
        finally:
            self.stop()


class StateRecorder:
    """Hands over the ``(query, key, value)`` one attention layer passes to its attention function, while
    started (what relation transfer reads). ``layer``: an attention module or an
    :class:`~hf_attn_distill.AttentionLayer` (one call of a shared module)."""

    def __init__(self, layer):
        self.module, self.call, probabilities = _layer_parts(layer)
        if probabilities is not None:
            raise ValueError(
                f"{type(self.module).__name__} computes attention in its own code, so its queries, keys and values "
                "are not handed to an attention function that could read them. Set relation_weight=0 for this model."
            )
        self.point = point_of(self.module)

    def start(self) -> None:
        self.point.states, self.point.state_call = [None], self.call
        self.point.calls = 0

    def states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value as ``[B, T, D]`` (heads concatenated) from the call since :meth:`start`."""
        seen = self.point.states[0] if self.point.states else None
        if seen is None:
            raise RuntimeError(
                f"{type(self.module).__name__} was not called through the '{ATTN_IMPLEMENTATION}' attention "
                "implementation, so its queries, keys and values cannot be read. Set relation_weight=0 for this model."
            )
        return tuple(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) for x in seen)

    def stop(self) -> None:
        self.point.states, self.point.state_call = None, None


class Capture:
    """Owns everything distillation attaches to the user's models, and takes it off again.

    :meth:`enable` switches a model to the ``"hf_attn_distill"`` attention implementation (remembering what
    every config of it had); :meth:`attention_recorder` / :meth:`state_recorder` attach capture points to the
    modules they watch; :meth:`attach_module` adds a submodule (the hidden-state projection); :meth:`freeze`
    puts the teacher in eval mode without gradients; :meth:`stop` disarms every point (the end of a step); :meth:`release` removes the points
    and restores each model's attention implementation; :meth:`attach` puts the same points back (a later
    ``train`` or ``evaluate``), so their identity, which ``torch.compile`` relies on, never changes.
    """

    def __init__(self) -> None:
        self._models: list[tuple[PreTrainedModel, list[tuple[PretrainedConfig, object]]]] = []
        self._points: list[tuple[nn.Module, _CapturePoint]] = []
        self._submodules: list[tuple[nn.Module, str, nn.Module]] = []
        self._frozen: list[tuple[nn.Module, dict]] = []
        self._recorders: list[AttentionRecorder] = []
        self._taps: list = []
        self.shared: dict[str, object] = {}
        """Objects the objectives of one trainer build once and share (the causal-LM head pass)."""
        self.attached = True

    def add_tap(self, tap) -> None:
        """Keep ``tap`` (an object with ``register()``, ``remove()`` and ``disarm()``, such as
        :class:`~hf_attn_distill.terms.lm_head.HeadTap`) on its module while attached: registered now, disarmed by
        :meth:`stop`, removed by :meth:`release`, registered again by :meth:`attach`."""
        if tap not in self._taps:
            self._taps.append(tap)
            if self.attached:
                tap.register()

    def freeze(self, model: PreTrainedModel) -> None:
        """Eval mode and no gradients (for good: the teacher stays frozen), and no attentions or hidden states
        returned by default until :meth:`release` restores ``model``'s ``output_*`` flags."""
        if not any(m is model for m, _ in self._frozen):
            flags = {k: getattr(model.config, k, None) for k in ("output_attentions", "output_hidden_states")}
            self._frozen.append((model, flags))
        model.eval().requires_grad_(False)
        model.config.output_attentions = False
        model.config.output_hidden_states = False

    def attach_module(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        """Register ``module`` as ``parent.name`` (e.g. the hidden-state projection) until :meth:`release`."""
        if getattr(parent, name, None) is not module:
            parent.add_module(name, module)
        if not any(p is parent and n == name for p, n, _ in self._submodules):
            self._submodules.append((parent, name, module))

    def enable(self, model: PreTrainedModel) -> None:
        """:func:`enable_attention_capture`, remembering the previous implementation of every config of ``model``."""
        if any(m is model for m, _ in self._models):
            return
        configs = [c for c in _configs_of(model)]
        saved = [(c, getattr(c, "_attn_implementation_internal", None)) for c in configs]
        enable_attention_capture(model)
        self._models.append((model, saved))

    def _track(self, layers) -> None:
        """Remember the points of ``layers``' modules that this capture attaches (a point already there belongs
        to whoever attached it, and stays)."""
        for layer in layers:
            module = _layer_parts(layer)[0]
            if getattr(module, POINT_ATTR, None) is None and not any(m is module for m, _ in self._points):
                self._points.append((module, point_of(module)))

    def attention_recorder(self, layers, loss: str = "kl", rows: bool = False) -> AttentionRecorder:
        """An :class:`AttentionRecorder` of ``layers`` (modules or :class:`~hf_attn_distill.AttentionLayer`)."""
        self._track(layers)
        recorder = AttentionRecorder(layers, loss, rows)
        self._recorders.append(recorder)
        return recorder

    def state_recorder(self, layer) -> StateRecorder:
        """A :class:`StateRecorder` of ``layer`` (a module or an :class:`~hf_attn_distill.AttentionLayer`)."""
        self._track([layer])
        return StateRecorder(layer)

    def stop(self) -> None:
        """Disarm every point and recorder: nothing is recorded, no tensor of a step stays referenced, no hook
        stays on a module."""
        for recorder in self._recorders:
            recorder.stop()
        for _, point in self._points:
            point.reset()
        for tap in self._taps:
            tap.disarm()

    def release(self) -> None:
        """Take everything off the models: points and submodules removed, attention implementations and the frozen
        models' ``output_*`` flags restored."""
        if not self.attached:
            return
        self.stop()
        for tap in self._taps:
            tap.remove()
        for module, point in self._points:
            if getattr(module, POINT_ATTR, None) is point:
                delattr(module, POINT_ATTR)
        for parent, name, module in self._submodules:
            if getattr(parent, name, None) is module:
                delattr(parent, name)
        for model, flags in self._frozen:
            for key, value in flags.items():
                if value is not None:
                    setattr(model.config, key, value)
        for _, saved in self._models:
            for config, previous in saved:
                config._attn_implementation_internal = previous
        self.attached = False

    def attach(self) -> None:
        """Put the points and the attention implementation back after :meth:`release`."""
        if self.attached:
            return
        for module, point in self._points:
            setattr(module, POINT_ATTR, point)
        for parent, name, module in self._submodules:
            parent.add_module(name, module)
        for model, _ in self._frozen:
            self.freeze(model)
        for model, _ in self._models:
            _register()
            set_attention_implementation(model, ATTN_IMPLEMENTATION)
        for tap in self._taps:
            tap.register()
        self.attached = True


def _configs_of(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config object reachable from ``model``'s modules (sub-model copies included)."""
    seen: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            seen.setdefault(id(config), config)
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if isinstance(sub, PretrainedConfig):
                    seen.setdefault(id(sub), sub)
    return list(seen.values())


def recording_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"hf_attn_distill"``.

    Modules no recorder watches, and watched modules outside a recording: identical to transformers'
    ``sdpa_attention_forward``. Recorded modules: explicit ``softmax(q k^T * scaling + bias + mask)``,
    with the recorded tensor taken *before* dropout.
    """
    point = getattr(module, POINT_ATTR, None)
    if point is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return _point_attention(point, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


@torch.compiler.disable
def _point_attention(point, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    call, slot = point.take()
    if point.probe is not None:
        point.probe.append(_describe_call(module, query, key, attention_mask, is_causal, kwargs))
    if point.states is not None and point.state_call in (None, call):
        point.states[0] = (query, key, value)
    if slot is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    refused = _refused(kwargs)
    if refused:
        raise NotImplementedError(
            f"{type(module).__name__} passes {refused} to its attention function; recorded layers do not reproduce "
            "them, and dropping them would make the recorded attention and the model's output wrong. Map only "
            "layers without them, or set attention_weight=0 to distill logits only."
        )
    bias = kwargs.get("position_bias")
    records, index, target = slot.records, slot.index, slot.target
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, k_len = query.shape[-2], key.shape[-2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    if target is None and slot.rows and not torch.is_grad_enabled():
        # Teacher side, streaming: keep what recomputes the rows (O(B H L d)); the output is "sdpa"'s, exactly as
        # for unrecorded layers.
        records[index] = AttentionRows(query * scaling, key, bias, _mask_of(attention_mask, causal, compact=True))
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: repeat key/value heads as the model does
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if target is not None and isinstance(target.teacher, AttentionRows):
        # Student side, streaming: output and transfer loss over blocks of query rows.
        out, loss = streamed_transfer(
            query * scaling, key, value, bias, _mask_of(attention_mask, causal, compact=False), target, dropout
        )
        records[index] = _connect_loss(slot, module, loss)
        if slot.deferred is not None and torch.is_grad_enabled():
            out = _InjectLossGrad.apply(out, loss, slot.deferred)
        return out.transpose(1, 2).contiguous(), None
    blocked = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked = ~attention_mask
        attention_mask = None
    elif attention_mask is None and causal:
        blocked = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
    # Queries with every key blocked (padding inside a sliding window): "sdpa" outputs zeros there, so do we.
    dead = blocked.all(-1, keepdim=True) if blocked is not None else None
    dead = dead if dead is not None and bool(dead.any()) else None
    kind = recorded_quantity(slot.loss)
    if target is None and not torch.is_grad_enabled():
        # Teacher side (no autograd): work in cache-sized blocks; only the record is a full-size tensor.
        out, records[index] = _blockwise_attention(query * scaling, key, value, bias, blocked, attention_mask, kind)
        if dead is not None:
            out.masked_fill_(dead, 0.0)
        return out.transpose(1, 2).contiguous(), None
    # Scale the (smaller) query rather than the [B, H, Q, K] scores; compute the softmax in float32.
    scores = torch.matmul(query * scaling, key.transpose(-1, -2)).float()
    if bias is not None:
        scores = scores + bias.float()
    # The plain "scores" record keeps raw scores, so mask a copy; otherwise mask in place (matmul saves no output).
    masked = scores.clone() if kind == "scores" and target is None else scores
    if blocked is not None:
        masked.masked_fill_(blocked, _MIN)
    elif attention_mask is not None:
        masked.add_(attention_mask.float())
    if target is None:
        log_probs = torch.log_softmax(masked, dim=-1)
        records[index] = log_probs if kind == "log_probs" else scores
        probs = log_probs.exp().to(value.dtype)
    else:
        probs, loss = softmax_with_transfer_loss(masked, target)
        probs = probs.to(value.dtype)
        records[index] = _connect_loss(slot, module, loss)
        if slot.deferred is not None and torch.is_grad_enabled():
            probs = _InjectLossGrad.apply(probs, loss, slot.deferred)
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, None


def _connect_loss(slot: _Slot, module: nn.Module, loss: torch.Tensor):
    """What a student layer records for its loss, with reentrant checkpointing in mind: the first pass (no
    autograd) records the value and arms a cell for the loss's gradient; the recomputation routes that gradient
    into its graph (the caller wraps the layer output with :class:`_InjectLossGrad`) and keeps the first record."""
    if module.training and not torch.is_grad_enabled():
        slot.deferred = _GradCell()
        return loss
    if slot.deferred is not None and torch.is_grad_enabled():
        return slot.records[slot.index]
    return loss


def _mask_of(attention_mask: torch.Tensor | None, causal: bool, compact: bool) -> AttentionMask:
    """The :class:`~hf_attn_distill.attention.streamed.AttentionMask` of a call (``compact``: a padding mask as its
    ``[B, K]`` key padding, so nothing of size Q x K is kept)."""
    if attention_mask is None:
        return AttentionMask(causal=causal)
    if attention_mask.dtype != torch.bool:
        return AttentionMask(additive=attention_mask)
    return AttentionMask.compact(~attention_mask, False) if compact else AttentionMask(blocked=~attention_mask)


def _refused(kwargs) -> list[str]:
    return [name for name in UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(name) is not None]


def _future(num_q: int, num_k: int, device) -> torch.Tensor:
    """``[Q, K]``: key ``k`` is in query ``q``'s future (queries aligned to the last keys)."""
    return torch.ones(num_q, num_k, dtype=torch.bool, device=device).triu(num_k - num_q + 1)


def _describe_call(module, query, key, attention_mask, is_causal, kwargs) -> dict:
    """What site discovery learns from one attention call (:mod:`~hf_attn_distill.attention.sites`)."""
    num_q, num_k = query.shape[-2], key.shape[-2]
    future = _future(num_q, num_k, query.device)
    if not bool(future.any()):
        causal = False
    elif attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    else:
        blocked = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask <= _MIN / 2
        causal = bool(blocked.expand(*blocked.shape[:-2], num_q, num_k)[..., future].all())
    return dict(
        module=module,
        queries=num_q,
        keys=num_k,
        heads=query.shape[1],
        kv_heads=key.shape[1],
        causal=causal,
        refused=tuple(_refused(kwargs)),
        probabilities=None,
        sliding_window=kwargs.get("sliding_window"),
    )


def probability_rows(x: torch.Tensor) -> tuple[int, bool] | None:
    """``(heads, causal)`` when ``x`` looks like attention probabilities ``[B, H, Q, K]`` (non-negative rows
    summing to 1), else ``None``: how discovery finds attention computed in a model's own code."""
    if x.dim() != 4 or not x.is_floating_point() or x.shape[-2] < 2 or x.shape[-1] < 2:
        return None
    x = x.detach().float()
    if bool((x < 0).any()) or not torch.allclose(x.sum(-1), torch.ones(()), atol=1e-3):
        return None
    future = _future(x.shape[-2], x.shape[-1], x.device)
    return x.shape[1], bool(future.any()) and bool((x[..., future] == 0).all())


_TINY = torch.finfo(torch.float32).tiny


def _probability_hook(point: _CapturePoint, module: nn.Module):
    """Forward pre-hook for the dropout a model's own attention code passes its probabilities through: records
    them (as log-probabilities) or takes the layer's transfer loss there, before dropout, with the gradient
    reaching the model's scores."""

    def hook(dropout, args):
        _, slot = point.take()
        if slot is None:
            return None
        probs = args[0].float()
        # clamp: masked keys have probability 0; the clamp's gradient is 0 there, so no NaN reaches the scores
        log_probs = probs.clamp_min(_TINY).log()
        target = slot.target
        if target is None:
            slot.records[slot.index] = log_probs
            return None
        if module.training and not torch.is_grad_enabled():
            raise NotImplementedError(
                f"{type(module).__name__} computes attention in its own code; its transfer loss cannot be "
                "recomputed under reentrant checkpointing. Use activation_checkpointing_kwargs "
                "(gradient_checkpointing_kwargs on older transformers)={'use_reentrant': False}."
            )
        teacher = target.teacher
        if isinstance(teacher, AttentionRows):
            quantity = recorded_quantity(target.loss)
            teacher = group_teacher_heads(teacher.materialize(quantity), probs.shape[1], quantity)
        teacher = teacher.detach().float()
        masks = (target.key_mask, target.query_mask, target.causal)
        if target.loss == "kl":
            loss = attention_kl_loss(log_probs, teacher, *masks)
        else:  # "mse_probs" ("mse_scores" is refused when the recorder is built)
            loss = attention_mse_loss(probs, teacher.exp(), *masks)
        slot.records[slot.index] = loss
        return None

    return hook


def _blockwise_attention(query, key, value, bias, blocked, attention_mask, kind):
    """``softmax(q k^T + bias + mask) v`` without autograd, a few (batch, head) blocks at a time.

    Returns the output ``[B, H, Q, D]`` and the full ``[B, H, Q, K]`` record (log-probabilities, or raw
    scores for ``kind="scores"``); the scores and probabilities of each block are cache-sized
    temporaries instead of three extra full-size tensors.
    """
    batch, heads, num_q, _ = query.shape
    num_k = key.shape[-2]
    record = torch.empty(batch, heads, num_q, num_k, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, heads, num_q, value.shape[-1], dtype=value.dtype, device=query.device)
    for bs, hs in attention_blocks(batch, heads, num_q * num_k):
        scores = torch.matmul(query[bs, hs], key[bs, hs].transpose(-1, -2)).float()
        if bias is not None:
            scores += _block_of(bias, bs, hs)
        if kind == "scores":
            record[bs, hs] = scores
        if blocked is not None:
            scores.masked_fill_(_block_of(blocked, bs, hs), _MIN)
        elif attention_mask is not None:
            scores += _block_of(attention_mask, bs, hs)
        log_probs = torch.log_softmax(scores, dim=-1)
        if kind == "log_probs":
            record[bs, hs] = log_probs
        out[bs, hs] = torch.matmul(log_probs.exp_().to(value.dtype), value[bs, hs])
    return out, record


def _block_of(mask: torch.Tensor, bs: slice, hs: slice) -> torch.Tensor:
    """The part of a ``[Q, K]`` or ``[B|1, H|1, Q, K]`` mask or bias that applies to batches ``bs``, heads ``hs``."""
    if mask.dim() == 2:
        return mask
    mask = mask[bs] if mask.shape[0] > 1 else mask
    mask = mask[:, hs] if mask.shape[1] > 1 else mask
    return mask.float() if mask.dtype != torch.bool else mask


def _register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, recording_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def set_attention_implementation(model: PreTrainedModel, name: str) -> None:
    """``model.set_attn_implementation(name)``, also reaching modules that hold their own copy of a sub-model's
    config (the encoder layers of ``EncoderDecoderModel`` read a config object the model's setter does not
    update)."""
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        return  # refused: the caller reports it
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and getattr(config, "_attn_implementation", name) != name:
            config._attn_implementation_internal = name


def enable_attention_capture(model: PreTrainedModel) -> None:
    """Switch ``model`` to the ``"hf_attn_distill"`` attention implementation (in place).

    Outside a recording the model computes exactly what ``"sdpa"`` computes. The setting is not
    written to ``config.json``, so saved models load with the default implementation. Whether the
    model really dispatches its attention through it shows on the first recording
    (:meth:`AttentionRecorder.collect` names the modules that never reported).
    """
    _register()
    try:
        set_attention_implementation(model, ATTN_IMPLEMENTATION)
    except (ValueError, NotImplementedError) as err:
        raise ValueError(
            f"{type(model).__name__} refused the '{ATTN_IMPLEMENTATION}' attention implementation ({err}), so its "
            "attention cannot be captured selectively. Set attention_weight=0 to distill logits only."
        ) from err
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError(
            f"{type(model).__name__} does not let transformers choose its attention implementation (it computes "
            "attention in its own code, not through AttentionInterface), so its attention cannot be captured "
            "selectively. Set attention_weight=0 to distill logits only."
        )
