"""Task metrics computed locally (``evaluate.load`` needs the Hub)."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction

__all__ = ["accuracy", "compute_classification_metrics"]


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
