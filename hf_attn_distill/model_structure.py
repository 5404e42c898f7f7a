"""Where the transformer layers and their self-attention modules live inside a model."""

from __future__ import annotations

from torch import nn

__all__ = ["find_attention_modules", "find_encoder_layers"]


def find_encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, module list)`` of the encoder's transformer layers."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == num_layers and "decoder" not in name
    ]
    if not candidates:
        shared = getattr(config, "num_hidden_groups", None) is not None
        reason = (
            "it shares one layer module across depth, so a layer's attention cannot be recorded on its own"
            if shared
            else "pass the attention modules explicitly to AttentionRecorder"
        )
        raise ValueError(
            f"Could not find the list of {num_layers} transformer layers in {type(model).__name__}: {reason}. "
            "Set attention_weight=0 to distill logits only."
        )
    return candidates[0]


def find_attention_modules(model: nn.Module) -> list[nn.Module]:
    """Return the self-attention module of each encoder layer, in layer order.

    A self-attention module is the submodule of a layer whose class name ends in ``SelfAttention``
    (BERT, RoBERTa, ELECTRA, DistilBERT, XLM-R, ...), or failing that one named ``self_attn``.
    """
    modules = []
    for index, layer in enumerate(find_encoder_layers(model)[1]):
        found = [m for m in layer.modules() if type(m).__name__.endswith("SelfAttention")]
        if not found:
            found = [m for name, m in layer.named_modules() if name.split(".")[-1] == "self_attn"]
        if len(found) != 1:
            raise ValueError(
                f"Layer {index} of {type(model).__name__} has {len(found)} self-attention modules, expected 1; "
                "pass the attention modules explicitly to AttentionRecorder."
            )
        modules.append(found[0])
    return modules
