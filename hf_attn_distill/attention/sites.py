"""Where a model's attention is, learnt from the attention calls themselves.

:func:`find_attention_sites` runs the model once (eval mode, no gradients, a 7-token probe input; 5 target
tokens for an encoder-decoder) and watches every call of the attention function. For models that dispatch
through transformers' ``AttentionInterface`` a call is one call of the ``"hf_attn_distill"`` implementation;
for models that compute attention in their own code (DeBERTa-v2/v3) it is a dropout module fed attention
probabilities (4-D, non-negative rows that sum to 1). Each call tells which module made it, the query and key
lengths, how many query and key/value heads it passes, whether it is causal (from the mask it gets) and which
attention inputs the recording path cannot reproduce. No projection names, head attributes or layer classes are
read, so fused-QKV (GPT-2, ModernBERT) and grouped-query (Llama, Qwen2) models need no special case.

Calls sort into *sites*: in an encoder-decoder, source-length queries over source keys are ``"encoder"``,
target over target ``"decoder"`` and target over source ``"cross"``; otherwise causal calls are ``"decoder"``
(a decoder-only LM) and the rest ``"encoder"``. Within a site, call order is depth, so a module called at every
depth (ALBERT's shared layer) is one :class:`AttentionLayer` per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from hf_attn_distill.attention.capture import POINT_ATTR, Capture, point_of, probability_rows

__all__ = [
    "SITES",
    "AttentionLayer",
    "find_attention_modules",
    "find_attention_sites",
    "find_encoder_layers",
    "find_layer_stacks",
    "probe_inputs",
]

SITES = ("encoder", "decoder", "cross")
PROBE_SOURCE_LENGTH, PROBE_TARGET_LENGTH = 7, 5


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One depth of one attention site.

    Attributes:
        module: the module that calls the attention function (or owns the probabilities' dropout).
        call: which of ``module``'s calls in one forward this depth is; ``None`` when the module is called once.
        heads: query heads the attention function receives.
        kv_heads: key/value heads it receives (fewer under grouped-query attention).
        causal: the call's mask hides every future key.
        probabilities: for attention computed in the model's own code, the dropout module its probabilities
            pass through (capture reads them there); ``None`` for ``AttentionInterface`` calls.
        refused: attention inputs of the call that the recording path does not reproduce (``softcap``, sinks).
        sliding_window: the ``sliding_window`` the call passes (local layers of ModernBERT, Qwen2), else ``None``.
    """

    module: nn.Module
    call: int | None
    heads: int
    kv_heads: int
    causal: bool
    probabilities: nn.Module | None = None
    refused: tuple[str, ...] = ()
    sliding_window: int | None = None


def _vocab_sizes(config) -> tuple[int, int]:
    def size(c):
        value = getattr(c, "vocab_size", None)
        if not isinstance(value, int):
            text = c.get_text_config() if hasattr(c, "get_text_config") else None
            value = getattr(text, "vocab_size", None)
        return value

    encoder = size(getattr(config, "encoder", None) or config) or size(config)
    decoder = size(getattr(config, "decoder", None) or config) or encoder
    if not encoder:
        raise ValueError(f"{type(config).__name__} has no vocab_size: cannot build token inputs to find attention.")
    return encoder, decoder


def probe_inputs(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The input :func:`find_attention_sites` runs: ``PROBE_SOURCE_LENGTH`` tokens, no padding, and for an
    encoder-decoder ``PROBE_TARGET_LENGTH`` decoder tokens (different lengths tell self- from cross-attention)."""
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise ValueError(
            f"{type(model).__name__} takes {model.main_input_name!r}, not token ids: attention transfer is for text "
            "models. Set attention_weight=0."
        )
    source_vocab, target_vocab = _vocab_sizes(model.config)
    device = next(model.parameters()).device

    def ids(length: int, vocab: int) -> torch.Tensor:
        low = min(4, vocab - 1)  # keep clear of the usual special ids
        return ((torch.arange(length) * 7919 + 11) % (vocab - low) + low).unsqueeze(0).to(device)

    inputs = {
        "input_ids": ids(PROBE_SOURCE_LENGTH, source_vocab),
        "attention_mask": torch.ones(1, PROBE_SOURCE_LENGTH, dtype=torch.long, device=device),
    }
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids(PROBE_TARGET_LENGTH, target_vocab)
    return inputs


def _uses_interface(model: nn.Module) -> bool:
    return all(type(m)._can_set_attn_implementation() for m in model.modules() if isinstance(m, PreTrainedModel))


def _probe_calls(model: PreTrainedModel) -> list[dict]:
    """Every attention call of one forward on :func:`probe_inputs`, in call order; ``model`` is left as it was."""
    calls: list[dict] = []
    inputs = probe_inputs(model)
    capture, added, hooks = Capture(), [], []
    interface = _uses_interface(model)
    try:
        if interface:
            capture.enable(model)
            for module in model.modules():
                if getattr(module, POINT_ATTR, None) is None:
                    added.append(module)
                point_of(module).probe = calls
        else:
            parents = {id(child): module for module in model.modules() for child in module.children()}
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    hooks.append(module.register_forward_pre_hook(_dropout_probe(calls, parents[id(module)], module)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            model.train(was_training)
    finally:
        for handle in hooks:
            handle.remove()
        for module in model.modules():
            point = getattr(module, POINT_ATTR, None)
            if point is not None:
                point.probe = None
        for module in added:
            if getattr(module, POINT_ATTR, None) is not None:
                delattr(module, POINT_ATTR)
        capture.release()
    return calls


def _dropout_probe(calls: list, parent: nn.Module, dropout: nn.Module):
    def hook(module, args):
        rows = probability_rows(args[0]) if args and torch.is_tensor(args[0]) else None
        if rows is not None:
            heads, causal = rows
            calls.append(
                dict(
                    module=parent,
                    queries=args[0].shape[-2],
                    keys=args[0].shape[-1],
                    heads=heads,
                    kv_heads=heads,
                    causal=causal,
                    refused=(),
                    probabilities=dropout,
                    sliding_window=None,
                )
            )

    return hook


def find_attention_sites(model: PreTrainedModel) -> dict[str, list[AttentionLayer]]:
    """``{site: [AttentionLayer per depth]}`` for the sites ``model`` has, learnt from one probe forward (see the
    module docstring); ``model`` is left as it was."""
    calls = _probe_calls(model)
    name = type(model).__name__
    if not calls:
        raise ValueError(
            f"{name} made no attention call that could be seen: it neither dispatches through transformers' "
            "AttentionInterface nor passes attention probabilities through a dropout module. Set attention_weight=0 "
            "(and relation_weight=0) to distill logits and hidden states only."
        )
    counts: dict[int, int] = {}
    for call in calls:
        counts[id(call["module"])] = counts.get(id(call["module"]), 0) + 1
    seen: dict[int, int] = {}
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    sites: dict[str, list[AttentionLayer]] = {}
    for call in calls:
        module = call["module"]
        index = seen.get(id(module), 0)
        seen[id(module)] = index + 1
        site = _site_of(call, encoder_decoder, name)
        layer = AttentionLayer(
            module,
            index if counts[id(module)] > 1 else None,
            call["heads"],
            call["kv_heads"],
            call["causal"],
            call["probabilities"],
            call["refused"],
            call["sliding_window"],
        )
        sites.setdefault(site, []).append(layer)
    return sites


def _site_of(call: dict, encoder_decoder: bool, name: str) -> str:
    queries, keys, causal = call["queries"], call["keys"], call["causal"]
    if not encoder_decoder:
        return "decoder" if causal else "encoder"
    source, target = PROBE_SOURCE_LENGTH, PROBE_TARGET_LENGTH
    if (queries, keys) == (source, source) and not causal:
        return "encoder"
    if (queries, keys) == (target, target) and causal:
        return "decoder"
    if (queries, keys) == (target, source) and not causal:
        return "cross"
    raise ValueError(
        f"{name} made an attention call with {queries} queries over {keys} keys (causal={causal}) on a "
        f"{source}-token source and {target}-token target: not encoder self-, causal decoder self- or cross-"
        "attention, so it cannot be mapped. Set attention_weight=0."
    )


def find_attention_modules(model: PreTrainedModel) -> list[AttentionLayer]:
    """Layers of the encoder site (or of the only stack of a decoder-only model), in depth order."""
    sites = find_attention_sites(model)
    return sites.get("encoder", sites.get("decoder"))


def find_layer_stacks(model: PreTrainedModel) -> dict[str, tuple[str, nn.ModuleList]]:
    """``{"encoder": (qualified name, layers), "decoder": ...}``: for each self-attention site, the outermost
    ``nn.ModuleList`` whose every element holds one of the site's attention modules."""
    stacks = {}
    for site, layers in find_attention_sites(model).items():
        if site == "cross":
            continue
        modules = {id(layer.module) for layer in layers}
        for name, candidate in model.named_modules():
            if (
                isinstance(candidate, nn.ModuleList)
                and len(candidate) > 0
                and all(any(id(m) in modules for m in element.modules()) for element in candidate)
            ):
                stacks[site] = (name, candidate)
                break
        else:
            raise ValueError(f"The {site} attention modules of {type(model).__name__} are not in one layer list.")
    return stacks


def find_encoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, module list)`` of the transformer layers of an encoder-only model."""
    stacks = find_layer_stacks(model)
    if len(stacks) != 1:
        raise ValueError(f"{type(model).__name__} has an encoder and a decoder; use find_layer_stacks.")
    return next(iter(stacks.values()))
