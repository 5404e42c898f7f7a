"""Task metrics computed locally, also loadable as ``evaluate`` modules shipped inside the package.

``evaluate.load("accuracy")`` needs the Hub; :func:`load_metric` hands ``evaluate.load`` the folder of
our own module instead (``evaluate`` resolves a local folder before the Hub), so it works offline and
computes with the tested functions below.
"""

from __future__ import annotations

import collections
import re
import string
from pathlib import Path

import numpy as np
from transformers import EvalPrediction

__all__ = [
    "METRIC_MODULES",
    "TranslationMetrics",
    "accuracy",
    "compute_classification_metrics",
    "compute_squad_metrics",
    "compute_translation_metrics",
    "load_metric",
    "normalize_answer",
    "squad_exact_match",
    "squad_f1",
]

METRIC_MODULES = Path(__file__).resolve().parents[1] / "evaluate_modules"


def load_metric(name: str):
    """``evaluate.load`` of one of this package's metric modules (``"accuracy"``, ``"squad"``), offline."""
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


# ---- SQuAD exact match and F1 (the official v1.1 / v2.0 evaluation scripts' definitions) ----

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (official SQuAD rule)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    An empty ``references`` list means "no answer" (SQuAD v2): only an empty prediction matches.
    """
    references = references or [""]
    return float(max(normalize_answer(prediction) == normalize_answer(r) for r in references))


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:  # v2: an empty side scores 1 only if both are empty
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, references: list[str]) -> float:
    """Best bag-of-tokens F1 of the normalised prediction against any reference (empty list = no answer)."""
    return max(_token_f1(prediction, r) for r in (references or [""]))


def compute_squad_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """``exact_match`` and ``f1`` in percent over every question in ``references``, as the official scripts.

    A question without a prediction scores 0 (and is counted in ``missing``). When some references are
    empty (SQuAD v2 unanswerable questions), ``HasAns_*`` and ``NoAns_*`` give the split.
    """
    if not references:
        raise ValueError("compute_squad_metrics needs at least one reference question.")
    unknown = set(predictions) - set(references)
    if unknown:
        raise ValueError(f"{len(unknown)} predictions have ids not in the references, e.g. {sorted(unknown)[:3]}.")
    em, f1 = {}, {}
    for qid, refs in references.items():
        pred = predictions.get(qid)
        em[qid] = 0.0 if pred is None else squad_exact_match(pred, refs)
        f1[qid] = 0.0 if pred is None else squad_f1(pred, refs)
    out = {
        "exact_match": 100.0 * sum(em.values()) / len(em),
        "f1": 100.0 * sum(f1.values()) / len(f1),
        "total": float(len(references)),
        "missing": float(len(set(references) - set(predictions))),
    }
    has_ans = [q for q, refs in references.items() if refs]
    no_ans = [q for q, refs in references.items() if not refs]
    if no_ans:
        for name, ids in (("HasAns", has_ans), ("NoAns", no_ans)):
            out[f"{name}_total"] = float(len(ids))
            if ids:
                out[f"{name}_exact"] = 100.0 * sum(em[q] for q in ids) / len(ids)
                out[f"{name}_f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
    return out


# ---- translation: BLEU and chrF with sacrebleu ----


def compute_translation_metrics(
    hypotheses: list[str], references: list[str], lowercase: bool = True
) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, default ``13a`` tokenization) of detokenized hypotheses against one
    reference each, as given. ``lowercase=True`` scores case-insensitively: for students of an uncased
    vocabulary (all-MiniLM-L6-v2) cased BLEU would only count the casing they cannot produce."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references.")
    if not references:
        raise ValueError("BLEU of an empty set is undefined.")
    bleu = BLEU(lowercase=lowercase).corpus_score(hypotheses, [references])
    chrf = CHRF(lowercase=lowercase).corpus_score(hypotheses, [references])
    return {"bleu": bleu.score, "chrf": chrf.score}


class TranslationMetrics:
    """``compute_metrics`` for generation-based evaluation: decode the generated ids with ``tokenizer`` and score
    them with :func:`compute_translation_metrics` against ``references``, the raw target sentences of the
    evaluated split in order (set the attribute before each ``evaluate``); without them, against the labels
    decoded back to text (cut to the label length and normalised by the tokenizer). Also reports ``gen_len``,
    the mean generated length in tokens."""

    def __init__(self, tokenizer, lowercase: bool = True, references: list[str] | None = None):
        self.tokenizer, self.lowercase, self.references = tokenizer, lowercase, references

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        pad = self.tokenizer.pad_token_id
        predictions = np.where(predictions < 0, pad, predictions)
        labels = np.where(eval_pred.label_ids < 0, pad, eval_pred.label_ids)
        hyps = [t.strip() for t in self.tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        if self.references is not None:
            if len(self.references) != len(hyps):
                raise ValueError(
                    f"{len(hyps)} translations for {len(self.references)} references: set "
                    "TranslationMetrics.references to the raw targets of the evaluated split."
                )
            refs = list(self.references)
        else:
            refs = [t.strip() for t in self.tokenizer.batch_decode(labels, skip_special_tokens=True)]
        scores = compute_translation_metrics(hyps, refs, self.lowercase)
        scores["gen_len"] = float(np.mean([np.count_nonzero(p != pad) for p in predictions]))
        return scores
