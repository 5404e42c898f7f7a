"""Task metrics computed locally, also loadable as ``evaluate`` modules shipped inside the package.

``evaluate.load("accuracy")`` needs the Hub; :func:`load_metric` hands ``evaluate.load`` the folder of
our own module instead (``evaluate`` resolves a local folder before the Hub), so it works offline and
computes with the tested functions below.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import EvalPrediction

__all__ = ["METRIC_MODULES", "accuracy", "compute_classification_metrics", "load_metric"]

METRIC_MODULES = Path(__file__).resolve().parent / "evaluate_modules"


def load_metric(name: str):
    """``evaluate.load`` of one of this package's metric modules (``"accuracy"``), offline."""
    import evaluate

    folder = METRIC_MODULES / name
    if not (folder / f"{name}.py").is_file():
        available = sorted(p.name for p in METRIC_MODULES.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"No metric module {name!r} in hf_attn_distill; available: {available}.")
    return evaluate.load(str(folder))


def accuracy(predictions, references) -> float:
    """Fraction of ``predictions`` equal to ``references`` (1-D sequences of class ids)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape.")
    if predictions.size == 0:
        raise ValueError("accuracy of an empty set is undefined.")
    return float((predictions == references).mean())


def compute_classification_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` for ``Trainer``: accuracy of the arg-max class."""
    logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
    return {"accuracy": accuracy(np.argmax(logits, axis=-1), eval_pred.label_ids)}
