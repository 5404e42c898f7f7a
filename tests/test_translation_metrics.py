"""BLEU and chrF through sacrebleu."""

import numpy as np
import pytest
import sacrebleu
from transformers import EvalPrediction

from hf_attn_distill.tasks.metrics import TranslationMetrics, compute_translation_metrics


def test_identical_text_scores_100():
    refs = ["Two young men are outside.", "A little girl climbs into a playhouse."]
    scores = compute_translation_metrics(refs, refs)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)


def test_matches_sacrebleus_own_example():
    # the hypotheses of sacrebleu's README example, against its first reference stream
    refs = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    scores = compute_translation_metrics(hyps, refs, lowercase=False)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert round(scores["bleu"], 2) == 45.07
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


def test_lowercase_ignores_case_only_when_asked():
    assert compute_translation_metrics(["a dog runs ."], ["A Dog runs ."])["bleu"] == pytest.approx(100.0)
    assert compute_translation_metrics(["a dog runs ."], ["A Dog runs ."], lowercase=False)["bleu"] < 100.0
    with pytest.raises(ValueError, match="hypotheses"):
        compute_translation_metrics(["a"], ["a", "b"])


def test_translation_metrics_against_raw_references(tokenizer):
    refs = ["Two young men are outside.", "A girl climbs into a playhouse."]
    ids = np.array(tokenizer([r.lower() for r in refs], padding=True)["input_ids"])
    labels = np.full_like(ids, -100)
    lowered = TranslationMetrics(tokenizer, references=refs)(EvalPrediction(predictions=ids, label_ids=labels))
    assert lowered["bleu"] == pytest.approx(
        compute_translation_metrics(tokenizer.batch_decode(ids, skip_special_tokens=True), refs)["bleu"]
    )
    cased = TranslationMetrics(tokenizer, lowercase=False, references=refs)(
        EvalPrediction(predictions=ids, label_ids=labels)
    )
    assert cased["bleu"] < lowered["bleu"]
    with pytest.raises(ValueError, match="references"):
        TranslationMetrics(tokenizer, references=refs[:1])(EvalPrediction(predictions=ids, label_ids=labels))


def test_translation_metrics_decode_ids(tokenizer):
    refs = ["two young men are outside .", "a girl climbs into a playhouse ."]
    ids = tokenizer(refs, padding=True)["input_ids"]
    labels = np.array(ids)
    labels[labels == tokenizer.pad_token_id] = -100
    scores = TranslationMetrics(tokenizer)(EvalPrediction(predictions=np.array(ids), label_ids=labels))
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert scores["gen_len"] == pytest.approx(np.mean([len(x) for x in tokenizer(refs)["input_ids"]]))
