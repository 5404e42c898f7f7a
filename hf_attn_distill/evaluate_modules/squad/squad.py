"""``evaluate`` module for SQuAD v1.1/v2.0 exact match and F1, computed by ``hf_attn_distill.tasks.metrics`` (offline)."""

import datasets
import evaluate

from hf_attn_distill.tasks.metrics import compute_squad_metrics

_DESCRIPTION = "SQuAD exact match and F1 in percent (official answer normalisation; v2 HasAns/NoAns split)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": list[str], "answer_start": list[int]}}; an empty
        "text" list marks an unanswerable (v2) question.
Returns:
    exact_match, f1 (percent), total, missing, and for v2 HasAns_/NoAns_ exact, f1 and total.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {"id": datasets.Value("string"), "prediction_text": datasets.Value("string")},
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        preds = {p["id"]: p["prediction_text"] for p in predictions}
        refs = {r["id"]: list(r["answers"]["text"]) for r in references}
        return compute_squad_metrics(preds, refs)
