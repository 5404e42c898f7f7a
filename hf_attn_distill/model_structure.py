"""Where a model's transformer layers and attention modules live, grouped by attention *site*.

A site is one kind of attention: ``"encoder"`` (encoder self-attention, or the only stack of an
encoder model), ``"decoder"`` (causal decoder self-attention) and ``"cross"`` (decoder-to-encoder
attention). Discovery reads the module tree, not per-family names:

- an *attention module* is one that directly owns query and key projections (``q_proj``/``k_proj``,
  ``query``/``key``, ``q``/``k``, ``q_lin``/``k_lin``): the module that calls the attention function;
- a *layer list* is an outermost ``nn.ModuleList`` whose every element holds an attention module;
- in each layer the first attention module is self-attention, causal ones (``is_causal``) making the
  decoder site, and a second one is cross-attention.

BERT-family encoders, BART, Marian, T5 and ``EncoderDecoderModel`` (BERT2BERT) all read this way.
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "SITES",
    "attention_heads",
    "find_attention_modules",
    "find_attention_sites",
    "find_encoder_layers",
    "find_layer_stacks",
]

SITES = ("encoder", "decoder", "cross")
_QUERY_NAMES = ("q_proj", "query", "q", "q_lin")
_KEY_NAMES = ("k_proj", "key", "k", "k_lin")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")


def _is_attention(module: nn.Module) -> bool:
    children = dict(module.named_children())
    return any(n in children for n in _QUERY_NAMES) and any(n in children for n in _KEY_NAMES)


def _attention_in(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if _is_attention(m)]


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost module lists whose every element holds at least one attention module, in model order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        if all(_attention_in(layer) for layer in module):
            found.append((name, module))
    return found


def _shared_layers_error(model: nn.Module, num_layers: int, found: int) -> ValueError:
    return ValueError(
        f"{type(model).__name__} runs {num_layers} layers but has {found} layer module(s): it shares one layer module "
        "across depth (as ALBERT does), so a layer's attention cannot be recorded on its own. Set attention_weight=0 "
        "to distill logits only."
    )


def _stacks(model: nn.Module) -> dict[str, tuple[str, nn.ModuleList, list[nn.Module], list[nn.Module] | None]]:
    """``{"encoder"|"decoder": (name, layer list, self-attention modules, cross-attention modules or None)}``."""
    stacks = {}
    for name, layers in _layer_lists(model):
        kinds = []
        for index, layer in enumerate(layers):
            modules = _attention_in(layer)
            if len(modules) > 2:
                raise ValueError(
                    f"Layer {index} of {name} in {type(model).__name__} has {len(modules)} attention modules; expected "
                    "self-attention and at most one cross-attention."
                )
            self_site = "decoder" if getattr(modules[0], "is_causal", False) else "encoder"
            kinds.append((self_site, modules[0], modules[1] if len(modules) == 2 else None))
        self_sites = {k for k, _, _ in kinds}
        if len(self_sites) != 1:
            raise ValueError(f"The layers of {name} in {type(model).__name__} mix causal and bidirectional attention.")
        site = self_sites.pop()
        if site in stacks:
            raise ValueError(f"{type(model).__name__} has two {site} layer stacks; cannot tell which one is meant.")
        crosses = [c for _, _, c in kinds]
        if any(c is not None for c in crosses) and any(c is None for c in crosses):
            raise ValueError(f"Only some layers of {name} in {type(model).__name__} have cross-attention.")
        stacks[site] = (name, layers, [m for _, m, _ in kinds], crosses if crosses[0] is not None else None)
    if not stacks:
        raise ValueError(
            f"Found no transformer layers with attention modules in {type(model).__name__}. Set attention_weight=0 to "
            "distill logits only, or pass the attention modules explicitly to AttentionRecorder."
        )
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None) if not getattr(config, "is_encoder_decoder", False) else None
    if len(stacks) == 1:
        layers = next(iter(stacks.values()))[1]
        if isinstance(expected, int) and expected != len(layers):
            raise _shared_layers_error(model, expected, len(layers))
    return stacks


def find_layer_stacks(model: nn.Module) -> dict[str, tuple[str, nn.ModuleList]]:
    """``{"encoder": (qualified name, layers), "decoder": ...}`` of the stacks ``model`` has."""
    return {stack: (name, layers) for stack, (name, layers, _, _) in _stacks(model).items()}


def find_attention_sites(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Attention modules of each site present in ``model``, in layer order (see the module docstring)."""
    sites: dict[str, list[nn.Module]] = {}
    for stack, (_, _, self_modules, cross_modules) in _stacks(model).items():
        sites[stack] = self_modules
        if cross_modules is not None:
            sites["cross"] = cross_modules
    return sites


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention module of each layer of the encoder (or of the only stack of a decoder-only model)."""
    sites = find_attention_sites(model)
    return sites.get("encoder", sites.get("decoder"))


def find_encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, module list)`` of the transformer layers of an encoder-only model."""
    stacks = find_layer_stacks(model)
    if len(stacks) != 1:
        raise ValueError(f"{type(model).__name__} has an encoder and a decoder; use find_layer_stacks.")
    return next(iter(stacks.values()))


def attention_heads(module: nn.Module) -> int:
    """Number of attention heads of an attention module."""
    for attr in _HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        f"Cannot tell how many heads {type(module).__name__} has (none of {_HEAD_ATTRS}); set attention_weight=0 to "
        "distill logits only."
    )
