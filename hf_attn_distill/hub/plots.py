"""Figures of what the student learned: teacher vs student attention maps, and every loss term over training.

Both write PNG files with matplotlib (``pip install matplotlib``, part of the ``plots`` extra) on its
non-interactive backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from hf_attn_distill.attention.capture import Capture

__all__ = ["attention_maps", "log_figures_to_tensorboard", "plot_attention", "plot_loss_curves"]


def _figure(**kwargs):
    """A matplotlib ``Figure`` drawn without pyplot, so the process's backend is left as the user set it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("Plots need matplotlib: pip install matplotlib (or hf_attn_distill[plots]).") from err
    return Figure(**kwargs)


@torch.no_grad()
def attention_maps(model, modules: Sequence[torch.nn.Module], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Attention probabilities ``[H, Q, K]`` of ``modules`` (pre-dropout) for the first example of ``inputs``.

    Capture is attached to ``model`` for this one forward and taken off again (what a running
    :class:`~hf_attn_distill.DistillTrainer` attached stays).
    """
    capture = Capture()
    capture.enable(model)
    was_training = model.training
    model.eval()
    try:
        with capture.attention_recorder(modules).record() as records:
            model(**inputs)
    finally:
        model.train(was_training)
        capture.release()
    return [r[0].exp().float().cpu() for r in records]


def plot_attention(
    teacher_maps: Sequence[torch.Tensor],
    student_maps: Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    path: str | Path,
    query_tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    title: str = "self-attention",
) -> Path:
    """Teacher (top) vs student (bottom) attention for each mapped layer pair and student head.

    ``teacher_maps``/``student_maps``: one ``[H, Q, K]`` probability tensor per pair, teacher heads already
    grouped to the student's count (:func:`~hf_attn_distill.group_teacher_heads` on probabilities). For
    cross-attention pass the target tokens as ``query_tokens`` and the source tokens as ``key_tokens``: each
    map is then a source x target alignment grid.
    """
    if not (len(teacher_maps) == len(student_maps) == len(pairs)) or not pairs:
        raise ValueError(
            "Give one teacher map, one student map and one (student, teacher) layer pair per mapped layer."
        )
    heads = student_maps[0].shape[0]
    fig = _figure(figsize=(2.2 * heads, 4.4 * len(pairs)))
    axes = fig.subplots(2 * len(pairs), heads, squeeze=False)
    for row, ((s_layer, t_layer), t_map, s_map) in enumerate(zip(pairs, teacher_maps, student_maps)):
        if t_map.shape != s_map.shape:
            raise ValueError(f"Teacher map {tuple(t_map.shape)} and student map {tuple(s_map.shape)} differ in shape.")
        for head in range(heads):
            for offset, (who, layer, maps) in enumerate((("teacher", t_layer, t_map), ("student", s_layer, s_map))):
                ax = axes[2 * row + offset][head]
                ax.imshow(maps[head].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
                ax.set_title(f"{who} L{layer} h{head}", fontsize=7)
                ax.set_xticks(range(len(key_tokens)) if key_tokens else [])
                ax.set_yticks(range(len(query_tokens)) if query_tokens else [])
                if key_tokens:
                    ax.set_xticklabels(key_tokens, rotation=90, fontsize=5)
                if query_tokens:
                    ax.set_yticklabels(query_tokens, fontsize=5)
    fig.suptitle(f"{title}: teacher (upper rows) vs student (lower rows)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_loss_curves(log_history: Sequence[Mapping], path: str | Path) -> Path:
    """Every loss term logged during training (``loss``, ``loss_ce``, ``loss_kd``, ``loss_attn_*``) and, when
    present, their evaluation values (``eval_loss*``), against the step."""
    train_keys = sorted({k for e in log_history for k in e if k == "loss" or k.startswith("loss_")})
    eval_keys = sorted({k for e in log_history for k in e if k == "eval_loss" or k.startswith("eval_loss_")})
    if not train_keys and not eval_keys:
        raise ValueError("The log history has no loss terms; train with logging_steps so that terms are logged.")
    fig = _figure(figsize=(7, 4))
    ax = fig.subplots()
    for keys, style in ((train_keys, "-"), (eval_keys, "--")):
        for key in keys:
            points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e]
            if points:
                ax.plot(*zip(*points), style, marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss term")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def log_figures_to_tensorboard(trainer, paths: Sequence[str | Path]) -> Path | None:
    """Add the PNG figures ``paths`` as images (tag ``distillation/<file stem>``, at the trainer's last step) to
    the TensorBoard run of ``trainer``, next to its per-term loss scalars. Does nothing (returns ``None``) unless
    ``report_to`` includes ``"tensorboard"``; returns the run folder written to."""
    from transformers.integrations import TensorBoardCallback

    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if callback is None or not paths:
        return None
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    log_dir = getattr(callback, "logging_dir", None) or str(Path(trainer.args.output_dir) / "runs")
    with SummaryWriter(log_dir=log_dir) as writer:
        for path in paths:
            image = matplotlib.image.imread(str(path))[..., :3]  # RGBA PNG -> RGB, floats in [0, 1]
            writer.add_image(f"distillation/{Path(path).stem}", image, trainer.state.global_step, dataformats="HWC")
    return Path(log_dir)
