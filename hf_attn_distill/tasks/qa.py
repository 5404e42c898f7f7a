"""Extractive question answering: SQuAD-format data, features with overflowing windows, span post-processing.

The feature and post-processing logic follows transformers' ``examples/pytorch/question-answering``
(``run_qa.py`` / ``utils_qa.py``), plus what distillation needs: every feature carries ``kd_mask``, the
positions an answer can take (context tokens, and the CLS token for SQuAD v2), so the start/end logit KD
compares teacher and student there only (:data:`~hf_attn_distill.terms.base.KD_MASK_COLUMN`).
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import EvalPrediction, PreTrainedTokenizerBase

from hf_attn_distill.tasks.metrics import compute_squad_metrics
from hf_attn_distill.terms.base import KD_MASK_COLUMN

__all__ = [
    "QACollator",
    "QAMetrics",
    "QA_COLUMNS",
    "check_qa_columns",
    "load_squad_json",
    "misplaced_answers",
    "postprocess_qa_predictions",
    "prepare_train_features",
    "prepare_validation_features",
]

logger = logging.getLogger(__name__)

QA_COLUMNS = ("id", "question", "context", "answers")


def load_squad_json(path: str | Path) -> datasets.Dataset:
    """A SQuAD-format file as a flat ``datasets.Dataset`` with ``id, title, context, question, answers``.

    Accepts the official nested format (``{"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}``,
    v1.1 or v2.0 with ``is_impossible``) and flat JSON lines already in the Hub ``squad`` layout.
    ``answers`` is ``{"text": [...], "answer_start": [...]}``; unanswerable questions have empty lists.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    if not (isinstance(data, dict) and isinstance(data.get("data"), list)):
        raise ValueError(
            f"{path} is not SQuAD-format JSON: expected {{'data': [{{'title', 'paragraphs': [...]}}]}} or JSON lines "
            "with id/question/context/answers."
        )
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows["id"].append(str(qa["id"]))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(context)
                rows["question"].append(qa["question"])
                rows["answers"].append(
                    {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]}
                )
    if not rows["id"]:
        raise ValueError(f"{path} holds no questions.")
    return datasets.Dataset.from_dict(rows)


def check_qa_columns(dataset: datasets.Dataset, split: str, columns: Mapping[str, str]) -> None:
    """Raise naming the flag to set when ``dataset`` lacks a question, context, answers or id column."""
    for flag, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"Split '{split}' has no column {column!r} (columns: {dataset.column_names}); set {flag} to one of them."
            )


def _truncate_questions(questions: list[str], tokenizer: PreTrainedTokenizerBase, max_query_length: int) -> list[str]:
    """Questions cut after their first ``max_query_length`` tokens (``run_qa.py``'s ``max_query_length``)."""
    out = []
    for question in questions:
        question = question.lstrip()  # leading spaces make some tokenizers waste the whole window
        enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) > max_query_length:
            question = question[: enc["offset_mapping"][max_query_length - 1][1]]
        out.append(question)
    return out


def _encode(examples, tokenizer, max_seq_length, doc_stride, max_query_length, columns, pad_to_max_length):
    question_col, context_col = columns["question"], columns["context"]
    pad_on_right = tokenizer.padding_side == "right"
    questions = _truncate_questions(examples[question_col], tokenizer, max_query_length)
    contexts = examples[context_col]
    encoded = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return encoded, 1 if pad_on_right else 0


def _kd_mask(sequence_ids: list, context_index: int, cls_index: int, version_2: bool) -> list[int]:
    mask = [1 if s == context_index else 0 for s in sequence_ids]
    if version_2:
        mask[cls_index] = 1
    return mask


def _answer_span(offsets, sequence_ids, context_index, start_char, end_char) -> tuple[int, int] | None:
    """Token span of characters ``[start_char, end_char)`` if it lies inside this window's context, else ``None``."""
    context = [i for i, s in enumerate(sequence_ids) if s == context_index]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, end


def _answer_is_placed(context: str, answers: Mapping) -> bool:
    """Whether the first answer text sits at its ``answer_start`` in ``context`` (or there is no answer)."""
    if not answers["text"]:
        return True
    text, start = answers["text"][0], answers["answer_start"][0]
    return 0 <= start and context[start : start + len(text)] == text


def misplaced_answers(dataset: datasets.Dataset, columns: Mapping[str, str] | None = None) -> list[str]:
    """Ids of examples whose first answer's ``answer_start`` does not point at its text."""
    columns = {"context": "context", "answers": "answers", "id": "id", **(columns or {})}
    return [
        str(qid)
        for qid, context, answers in zip(
            dataset[columns["id"]], dataset[columns["context"]], dataset[columns["answers"]]
        )
        if not _answer_is_placed(context, answers)
    ]


def _labels(encoded, i, answers, context, context_index, cls_index, locate):
    """``(start, end)`` token labels of feature ``i``: the answer span, or CLS when the window lacks it.

    With ``locate``, an answer whose ``answer_start`` is misplaced is looked up by its text in the context
    (evaluation); training features never see misplaced answers (they raise first).
    """
    if not answers["text"]:
        return cls_index, cls_index
    text, start_char = answers["text"][0], answers["answer_start"][0]
    if not _answer_is_placed(context, answers):
        start_char = context.find(text) if locate else -1
        if start_char < 0:
            return cls_index, cls_index
    span = _answer_span(
        encoded["offset_mapping"][i], encoded.sequence_ids(i), context_index, start_char, start_char + len(text)
    )
    return span if span is not None else (cls_index, cls_index)


def _cls_index(input_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> int:
    return input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0


def prepare_train_features(
    examples: Mapping[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    version_2: bool = False,
    columns: Mapping[str, str] | None = None,
    pad_to_max_length: bool = True,
) -> dict[str, list]:
    """Tokenize a batch of examples into training features (``datasets.map(batched=True)``).

    Long contexts become several windows of ``max_seq_length`` tokens whose contexts overlap by
    ``doc_stride`` tokens, each padded to ``max_seq_length`` (or, without ``pad_to_max_length``, left as long
    as it is, for :class:`QACollator` to pad per batch). Each feature gets ``start_positions``/``end_positions`` (the answer's tokens,
    or the CLS token when this window does not contain the answer or the question has none) and
    ``kd_mask``. An example whose ``answer_start`` does not point at its answer text raises: drop such
    examples first (:func:`misplaced_answers`), a wrong label is never produced.
    """
    columns = {"question": "question", "context": "context", "answers": "answers", "id": "id", **(columns or {})}
    contexts, all_answers = examples[columns["context"]], examples[columns["answers"]]
    bad = [str(q) for q, c, a in zip(examples[columns["id"]], contexts, all_answers) if not _answer_is_placed(c, a)]
    if bad:
        raise ValueError(
            f"{len(bad)} training examples have an answer_start that does not point at their answer text "
            f"(e.g. {bad[:3]}). Fix them or drop them first (hf_attn_distill.tasks.qa.misplaced_answers)."
        )
    encoded, context_index = _encode(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length, columns, pad_to_max_length
    )
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    out = {k: v for k, v in encoded.items() if k != "offset_mapping"}
    out.update(start_positions=[], end_positions=[], **{KD_MASK_COLUMN: []})
    for i, sample in enumerate(sample_mapping):
        cls_index = _cls_index(encoded["input_ids"][i], tokenizer)
        start, end = _labels(encoded, i, all_answers[sample], contexts[sample], context_index, cls_index, False)
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out[KD_MASK_COLUMN].append(_kd_mask(encoded.sequence_ids(i), context_index, cls_index, version_2))
    return out


def prepare_validation_features(
    examples: Mapping[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    version_2: bool = False,
    columns: Mapping[str, str] | None = None,
    pad_to_max_length: bool = True,
) -> dict[str, list]:
    """Tokenize a batch of examples into evaluation features.

    Like :func:`prepare_train_features` (labels included, so evaluation reports the loss terms), plus
    ``example_id`` and ``offset_mapping`` with ``None`` outside the context, which
    :func:`postprocess_qa_predictions` needs to map logits back to answer text. A misplaced
    ``answer_start`` is looked up by the answer text (CLS labels if the text is not in the context); the
    scores compare answer texts, so no example is dropped from evaluation.
    """
    columns = {"question": "question", "context": "context", "answers": "answers", "id": "id", **(columns or {})}
    contexts, all_answers = examples[columns["context"]], examples[columns["answers"]]
    encoded, context_index = _encode(
        examples, tokenizer, max_seq_length, doc_stride, max_query_length, columns, pad_to_max_length
    )
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    out = {k: v for k, v in encoded.items() if k != "offset_mapping"}
    out.update(example_id=[], offset_mapping=[], start_positions=[], end_positions=[], **{KD_MASK_COLUMN: []})
    for i, sample in enumerate(sample_mapping):
        sequence_ids = encoded.sequence_ids(i)
        cls_index = _cls_index(encoded["input_ids"][i], tokenizer)
        start, end = _labels(encoded, i, all_answers[sample], contexts[sample], context_index, cls_index, True)
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out[KD_MASK_COLUMN].append(_kd_mask(sequence_ids, context_index, cls_index, version_2))
        out["example_id"].append(str(examples[columns["id"]][sample]))
        out["offset_mapping"].append(
            [o if s == context_index else None for o, s in zip(encoded["offset_mapping"][i], sequence_ids)]
        )
    return out


@dataclass
class QACollator:
    """Pads a batch of QA features (from ``pad_to_max_length=False``) to its longest window, on the right.

    Model inputs are padded by the tokenizer (``input_ids`` with its pad token, ``attention_mask`` and
    ``token_type_ids`` with 0), :data:`~hf_attn_distill.terms.base.KD_MASK_COLUMN` with 0, so a padded position
    is neither attended to nor distilled. Fixed-length features pass through unchanged, as with
    ``default_data_collator``. With ``train_sampling_strategy="group_by_length"``, batches hold windows of
    similar length and carry little padding.

    Args:
        tokenizer: the tokenizer that made the features (padding side right).
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for GPU tensor cores).
    """

    tokenizer: PreTrainedTokenizerBase
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[Mapping]) -> dict[str, torch.Tensor]:
        if self.tokenizer.padding_side != "right":
            raise ValueError("QACollator pads on the right: set tokenizer.padding_side = 'right'.")
        kd_masks = [f.get(KD_MASK_COLUMN) for f in features]
        rest = [{k: v for k, v in f.items() if k != KD_MASK_COLUMN} for f in features]
        batch = dict(
            self.tokenizer.pad(rest, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        )
        if any(m is not None for m in kd_masks):
            if any(m is None for m in kd_masks):
                raise ValueError(f"Some features of this batch have a {KD_MASK_COLUMN!r} column and some do not.")
            length = batch["input_ids"].shape[1]
            mask = torch.zeros(len(features), length, dtype=torch.long)
            for row, m in enumerate(kd_masks):
                mask[row, : len(m)] = torch.as_tensor(m, dtype=torch.long)
            batch[KD_MASK_COLUMN] = mask
        return batch


def postprocess_qa_predictions(
    examples: datasets.Dataset,
    features: datasets.Dataset,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    version_2: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
    columns: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Answer text per example id from the start/end logits of its features (``utils_qa.py``'s algorithm).

    For each example, the ``n_best_size`` best start and end positions of each of its features give
    candidate spans; spans outside the context, with ``end < start`` or longer than ``max_answer_length``
    tokens are discarded, and the best ``start + end`` score wins. With ``version_2``, the empty answer
    wins when the best CLS score (``start[cls] + end[cls]``, minimum over features) exceeds the best span
    score by more than ``null_score_diff_threshold``.

    Args:
        examples: the examples (``id``, ``context`` columns).
        features: their features from :func:`prepare_validation_features`, in the order of the logits.
        start_logits, end_logits: ``[num_features, seq_len]``.
    """
    columns = {"context": "context", "id": "id", **(columns or {})}
    if len(features) != len(start_logits) or len(start_logits) != len(end_logits):
        raise ValueError(
            f"Got {len(start_logits)} start and {len(end_logits)} end logit rows for {len(features)} features; "
            "predict on exactly the features of these examples, in order."
        )
    features_of = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        features_of[example_id].append(index)
    offsets_all = features["offset_mapping"]
    answers: dict[str, str] = {}
    for example in examples:
        example_id = str(example[columns["id"]])
        context = example[columns["context"]]
        best_text, best_score, null_score = "", None, None
        for index in features_of.get(example_id, []):
            starts, ends, offsets = start_logits[index], end_logits[index], offsets_all[index]
            cls_index = 0  # BERT-style models put CLS first (as utils_qa.py assumes)
            feature_null = float(starts[cls_index] + ends[cls_index])
            null_score = feature_null if null_score is None else min(null_score, feature_null)
            top_starts = np.argsort(starts)[-1 : -n_best_size - 1 : -1]
            top_ends = np.argsort(ends)[-1 : -n_best_size - 1 : -1]
            for s in top_starts:
                for e in top_ends:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(starts[s] + ends[e])
                    if best_score is None or score > best_score:
                        best_score, best_text = score, context[offsets[s][0] : offsets[e][1]]
        if version_2 and (
            best_score is None or (null_score is not None and null_score - best_score > null_score_diff_threshold)
        ):
            best_text = ""
        answers[example_id] = best_text
    return answers


class QAMetrics:
    """``compute_metrics`` for ``Trainer``: post-process start/end logits of the evaluation features into
    answers and score them with SQuAD EM/F1 (percent).

    The trainer must evaluate exactly ``features`` in order (the default sequential evaluation sampler).
    ``last_predictions`` keeps the answers of the last call.
    """

    def __init__(
        self,
        examples: datasets.Dataset,
        features: datasets.Dataset,
        version_2: bool = False,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
        columns: Mapping[str, str] | None = None,
    ):
        self.examples, self.features = examples, features
        self.version_2 = version_2
        self.options = dict(
            n_best_size=n_best_size,
            max_answer_length=max_answer_length,
            null_score_diff_threshold=null_score_diff_threshold,
        )
        self.columns = {"context": "context", "id": "id", "answers": "answers", **(columns or {})}
        self.last_predictions: dict[str, str] = {}

    def references(self) -> dict[str, list[str]]:
        return {str(e[self.columns["id"]]): list(e[self.columns["answers"]]["text"]) for e in self.examples}

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = eval_pred.predictions
        if not isinstance(predictions, (tuple, list)) or len(predictions) < 2:
            raise ValueError("QAMetrics needs (start_logits, end_logits) predictions from a question-answering model.")
        start_logits, end_logits = predictions[0], predictions[1]
        self.last_predictions = postprocess_qa_predictions(
            self.examples, self.features, start_logits, end_logits, self.version_2, columns=self.columns, **self.options
        )
        scores = compute_squad_metrics(self.last_predictions, self.references())
        return {k: v for k, v in scores.items() if k not in ("total", "missing")}
