"""Model cards for distilled students, rendered from the template shipped in ``hf_attn_distill/templates/``."""

from __future__ import annotations

import string
from pathlib import Path

from torch import nn

__all__ = ["DEFAULT_TEMPLATE", "count_parameters", "render_model_card", "write_model_card"]

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "templates" / "distilled_student.md"


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.1f}M"
    return str(value)


def render_model_card(fields: dict, settings: dict | None = None, template: str | Path | None = None) -> str:
    """Fill a ``$placeholder`` template; every placeholder must be given (missing ones raise ``KeyError``)."""
    path = Path(template) if template is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {path} not found. The default ships inside the package "
            "(hf_attn_distill/templates/); reinstall the package, or pass template= a file of your own."
        )
    values = {k: _fmt(v) for k, v in fields.items()}
    rows = [f"| {k} | {_fmt(v)} |" for k, v in (settings or {}).items()]
    values["settings_table"] = "\n".join(rows) if rows else "| (none) | |"
    return string.Template(path.read_text()).substitute(values)


def write_model_card(output_dir: str | Path, fields: dict, settings: dict | None = None, template=None) -> Path:
    """Render the card and write it as ``README.md`` in ``output_dir``; return its path."""
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(fields, settings, template))
    return path
