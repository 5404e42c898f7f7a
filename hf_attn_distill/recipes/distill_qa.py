#!/usr/bin/env python
"""Distill (or fine-tune) an extractive question-answering model on SQuAD-format data (v1.1 or v2.0).

Flag names follow transformers' ``examples/pytorch/question-answering/run_qa.py``.

Examples::

    # 1. fine-tune a teacher (no distillation) on SQuAD v1.1
    python -m hf_attn_distill.recipes.distill_qa --training_mode finetune --teacher_model_name_or_path bert-base-uncased \
        --train_file ../shared/data/squad/train.json --validation_file ../shared/data/squad/validation.json \
        --output_dir out/qa_teacher --do_train --do_eval --max_seq_length 384 --doc_stride 128

    # 2. distill it into a 3-layer student initialised from teacher layers 1, 3, 5
    python -m hf_attn_distill.recipes.distill_qa --teacher_model_name_or_path out/qa_teacher --student_teacher_layers 1,3,5 \
        --train_file ../shared/data/squad/train.json --validation_file ../shared/data/squad/validation.json \
        --output_dir out/qa_student --do_train --do_eval --evaluate_teacher

Data: ``--dataset_name squad`` (or ``squad_v2`` with ``--version_2_with_negative``) from the Hub, or local
``--train_file``/``--validation_file`` in the official nested SQuAD JSON (or flat JSON lines with ``id``,
``question``, ``context``, ``answers``). Training examples whose ``answer_start`` does not point at their
answer text are dropped, counted and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, default_data_collator, set_seed

from hf_attn_distill.config import DistillConfig
from hf_attn_distill.tasks.qa import (
    QACollator,
    QAMetrics,
    check_qa_columns,
    load_squad_json,
    misplaced_answers,
    prepare_train_features,
    prepare_validation_features,
)
from hf_attn_distill.trainer import DistillTrainer
from hf_attn_distill.training.batches import check_lengths, position_limits
from hf_attn_distill.training.eval_order import InOrderTrainer

from . import common
from .common import ModelArguments, build_student, check_tokenizers

logger = logging.getLogger(__name__)

# Feature columns the post-processing needs but no model takes.
EVAL_ONLY_COLUMNS = ("example_id", "offset_mapping")


@dataclass
class QADataArguments:
    """Which data, and how to cut it into windows and answers (``run_qa.py`` names)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. 'squad' or 'squad_v2'."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(
        default=None, metadata={"help": "Local SQuAD-format JSON (or JSON lines) for training."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local SQuAD-format JSON for evaluation."})
    test_file: str | None = field(
        default=None,
        metadata={
            "help": "Local SQuAD-format JSON scored once at the end with --do_predict (test_* metrics). It may be the "
            "validation file itself: evaluations during training then use the first --max_eval_samples questions "
            "(a cheap learning curve) and --do_predict scores all of them."
        },
    )
    question_column_name: str = field(default="question", metadata={"help": "Column with the question."})
    context_column_name: str = field(default="context", metadata={"help": "Column with the context."})
    answer_column_name: str = field(
        default="answers", metadata={"help": "Column with {'text': [...], 'answer_start': [...]}."}
    )
    id_column_name: str = field(default="id", metadata={"help": "Column with the question id."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context + specials)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens of context shared by consecutive windows."})
    max_query_length: int = field(default=64, metadata={"help": "Questions are cut after this many tokens."})
    pad_to_max_length: bool = field(
        default=True,
        metadata={
            "help": "Pad every window to max_seq_length. False pads each batch to its longest window instead "
            "(QACollator); with --train_sampling_strategy group_by_length, SQuAD batches then carry about a third fewer "
            "tokens at max_seq_length 256."
        },
    )
    version_2_with_negative: bool = field(default=False, metadata={"help": "SQuAD v2: some questions have no answer."})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "v2: answer empty when null score - best span score exceeds this."}
    )
    n_best_size: int = field(default=20, metadata={"help": "Start/end candidates per feature in post-processing."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest answer, in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N examples of --test_file."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        if not self.dataset_name and not self.train_file and not self.validation_file and not self.test_file:
            raise ValueError("Give --dataset_name or local --train_file/--validation_file/--test_file.")
        if self.max_query_length < 1 or self.max_seq_length < 16:
            raise ValueError("max_query_length must be >= 1 and max_seq_length >= 16.")
        room = self.max_seq_length - self.max_query_length - 3  # [CLS] q [SEP] c [SEP]
        if not 0 <= self.doc_stride < room:
            raise ValueError(
                f"doc_stride={self.doc_stride} leaves no new context per window: it must be below max_seq_length - "
                f"max_query_length - 3 = {room}. Lower --doc_stride or --max_query_length, or raise --max_seq_length."
            )

    @property
    def columns(self) -> dict[str, str]:
        return {
            "question": self.question_column_name,
            "context": self.context_column_name,
            "answers": self.answer_column_name,
            "id": self.id_column_name,
        }


def load_raw_datasets(data: QADataArguments) -> datasets.DatasetDict:
    if data.dataset_name:
        return datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    splits = {"train": data.train_file, "validation": data.validation_file, "test": data.test_file}
    return datasets.DatasetDict({split: load_squad_json(path) for split, path in splits.items() if path})


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the recipe; returns the metrics dict it also saves to ``output_dir``."""
    model_args, data_args, training_args = common.parse_args(
        (ModelArguments, QADataArguments, DistillConfig), args, prog
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    if data_args.pad_to_max_length and training_args.train_sampling_strategy == "group_by_length":
        raise ValueError(
            "--train_sampling_strategy group_by_length has nothing to group: with --pad_to_max_length true every "
            "window is max_seq_length tokens long. Add --pad_to_max_length false."
        )
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args)
    flags = {
        "--question_column_name": data_args.question_column_name,
        "--context_column_name": data_args.context_column_name,
        "--answer_column_name": data_args.answer_column_name,
        "--id_column_name": data_args.id_column_name,
    }
    for split, ds in raw.items():
        check_qa_columns(ds, split, flags)
        if len(ds) == 0:
            raise ValueError(f"Split '{split}' is empty.")
    tokenizer = AutoTokenizer.from_pretrained(model_args.teacher_model_name_or_path)
    if tokenizer.padding_side != "right":
        raise ValueError("The QA recipe expects a tokenizer that pads on the right (question first, then context).")
    check_tokenizers(model_args, tokenizer)
    options = dict(
        tokenizer=tokenizer,
        max_seq_length=data_args.max_seq_length,
        doc_stride=data_args.doc_stride,
        max_query_length=data_args.max_query_length,
        version_2=data_args.version_2_with_negative,
        columns=data_args.columns,
        pad_to_max_length=data_args.pad_to_max_length,
    )

    train_features = eval_examples = eval_features = None
    if "train" in raw and training_args.do_train:
        train_examples = raw["train"]
        if data_args.max_train_samples is not None:
            train_examples = train_examples.select(range(min(data_args.max_train_samples, len(train_examples))))
        dropped = set(misplaced_answers(train_examples, data_args.columns))
        if dropped:
            logger.warning(
                "Dropped %d of %d training examples whose answer_start does not point at their answer text (e.g. %s).",
                len(dropped),
                len(train_examples),
                sorted(dropped)[:3],
            )
            ids = train_examples[data_args.id_column_name]
            train_examples = train_examples.select([i for i, q in enumerate(ids) if str(q) not in dropped])
        train_features = train_examples.map(
            prepare_train_features,
            fn_kwargs=options,
            batched=True,
            remove_columns=train_examples.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc="Training features",
        )

    def scored_split(split: str, limit: int | None) -> tuple[datasets.Dataset, datasets.Dataset]:
        examples = raw[split]
        if limit is not None:
            examples = examples.select(range(min(limit, len(examples))))
        features = examples.map(
            prepare_validation_features,
            fn_kwargs=options,
            batched=True,
            remove_columns=examples.column_names,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"{split.capitalize()} features",
        )
        return examples, features

    if "validation" in raw and (training_args.do_eval or training_args.eval_strategy != "no"):
        eval_examples, eval_features = scored_split("validation", data_args.max_eval_samples)
    test_examples = test_features = None
    if training_args.do_predict:
        if "test" not in raw:
            raise ValueError("--do_predict scores --test_file: give one (it may be the validation file).")
        test_examples, test_features = scored_split("test", data_args.max_predict_samples)

    teacher = AutoModelForQuestionAnswering.from_pretrained(model_args.teacher_model_name_or_path)
    check_lengths({"input_ids": data_args.max_seq_length}, position_limits(teacher), {"input_ids": "--max_seq_length"})
    distill = model_args.training_mode == "distill"
    model = build_student(model_args, teacher, AutoModelForQuestionAnswering) if model_args.has_student else teacher
    compute_metrics = None
    if eval_features is not None or test_features is not None:
        compute_metrics = QAMetrics(
            eval_examples if eval_features is not None else test_examples,
            eval_features if eval_features is not None else test_features,
            data_args.version_2_with_negative,
            data_args.n_best_size,
            data_args.max_answer_length,
            data_args.null_score_diff_threshold,
            data_args.columns,
        )
    common_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=train_features,
        eval_dataset=eval_features.remove_columns(list(EVAL_ONLY_COLUMNS)) if eval_features is not None else None,
        processing_class=tokenizer,
        data_collator=default_data_collator if data_args.pad_to_max_length else QACollator(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainer = DistillTrainer(teacher_model=teacher, **common_kwargs) if distill else InOrderTrainer(**common_kwargs)

    def scored_against(examples, features):  # one QAMetrics, shared with the teacher's trainer, per split
        def before():
            compute_metrics.examples, compute_metrics.features = examples, features

        return before

    evaluations = []
    if training_args.do_eval and eval_features is not None:
        evaluations.append(common.Evaluation("eval", before=scored_against(eval_examples, eval_features)))
    if test_features is not None:
        evaluations.append(
            common.Evaluation(
                "test",
                test_features.remove_columns(list(EVAL_ONLY_COLUMNS)),
                scored_against(test_examples, test_features),
            )
        )

    questions = {
        prefix: len(examples)
        for prefix, examples in (("eval", eval_examples), ("test", test_examples))
        if examples is not None
    }

    def sample():
        example = (eval_examples if eval_examples is not None else raw["train"])[0]
        cols = data_args.columns
        sample = tokenizer(
            example[cols["question"]],
            example[cols["context"]],
            truncation="only_second",
            max_length=data_args.max_seq_length,
            return_tensors="pt",
        )
        return sample

    return common.run(
        trainer,
        common_kwargs,
        model_args,
        training_args,
        tokenizer,
        evaluations,
        ("exact_match", "f1", "_exact"),
        sample,
        lambda metrics, example: write_card(
            trainer, model_args, data_args, training_args, teacher, model, metrics, example, questions
        ),
    )


def write_card(trainer, model_args, data_args, training_args, teacher, model, metrics, sample, questions) -> None:
    """The student's card; ``questions`` counts the scored questions by metric prefix (``eval``, ``test``)."""
    tested = any(key.startswith("test_") for key in metrics)  # the card reports test_* metrics when present
    data = common.describe_data(
        data_args.dataset_name,
        data_args.train_file,
        data_args.test_file if tested else data_args.validation_file,
        "test" if tested else "validation",
        data_args.dataset_config_name,
        model_args.card_dataset_id,
    )
    scored = questions.get("test" if tested else "eval")
    if scored is not None:
        data["eval_split"] += f", {scored} questions"
    if data_args.version_2_with_negative:
        data["eval_split"] += " (SQuAD v2 format)"
    extra = {k: getattr(data_args, k) for k in ("max_seq_length", "doc_stride", "version_2_with_negative")}
    common.write_card(
        trainer,
        model_args,
        training_args,
        teacher,
        model,
        metrics,
        sample=sample,
        **data,
        extra_settings=extra,
    )


if __name__ == "__main__":
    main()
