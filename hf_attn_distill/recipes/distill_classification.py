#!/usr/bin/env python
"""Distill (or fine-tune) a sequence classifier: GLUE-style single sentences or sentence pairs.

Examples::

    # 1. fine-tune a teacher (no distillation)
    python -m hf_attn_distill.recipes.distill_classification --training_mode finetune \
        --teacher_model_name_or_path bert-base-uncased --dataset_name glue --dataset_config_name sst2 \
        --output_dir out/teacher --num_train_epochs 3 --do_train --do_eval

    # 2. distill it into a 4-layer student initialised from teacher layers 2,5,8,11
    python -m hf_attn_distill.recipes.distill_classification --teacher_model_name_or_path out/teacher \
        --student_teacher_layers 2,5,8,11 --dataset_name glue --dataset_config_name sst2 \
        --output_dir out/student --attention_loss kl --layer_map uniform --do_train --do_eval

    # or everything from a YAML/JSON file
    python -m hf_attn_distill.recipes.distill_classification recipes/configs/sst2_student.yaml

Local data: ``--train_file``/``--validation_file``/``--test_file`` (csv, tsv, json, jsonl) with
``--text_column``, optional ``--text_pair_column`` and ``--label_column``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from hf_attn_distill.config import DistillConfig
from hf_attn_distill.tasks.metrics import compute_classification_metrics
from hf_attn_distill.trainer import DistillTrainer
from hf_attn_distill.training.batches import check_lengths, position_limits
from hf_attn_distill.training.eval_order import InOrderTrainer

from . import common
from .common import ModelArguments, build_student, check_tokenizers

logger = logging.getLogger(__name__)


@dataclass
class ClassificationModelArguments(ModelArguments):
    """Model arguments plus the label count of a classification head."""

    num_labels: int | None = field(
        default=None,
        metadata={"help": "Number of classes when the model has no classification head yet (default: from data)."},
    )


@dataclass
class DataArguments:
    """Which data, which columns, how to tokenize."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset, e.g. 'glue' (with --dataset_config_name sst2)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file: csv, tsv, json or jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(default=None, metadata={"help": "Local test file; evaluated if it has labels."})
    validation_split: str = field(default="validation", metadata={"help": "Split name used for evaluation."})
    test_split: str = field(default="test", metadata={"help": "Split name used for the final test."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the (first) text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column with the second text of a pair."})
    label_column: str = field(default="label", metadata={"help": "Column with the class label."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})

    def __post_init__(self):
        if not self.dataset_name and not self.train_file and not self.validation_file:
            raise ValueError("Give --dataset_name or local --train_file/--validation_file.")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {self.max_seq_length}")


def parse_args(
    args: list[str] | None = None, prog: str | None = None
) -> tuple[ClassificationModelArguments, DataArguments, DistillConfig]:
    """Parse the command line, or a single YAML/JSON file of the same arguments."""
    return common.parse_args((ClassificationModelArguments, DataArguments, DistillConfig), args, prog)


def load_raw_datasets(data: DataArguments) -> datasets.DatasetDict:
    if data.dataset_name:
        return datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    files = {"train": data.train_file, data.validation_split: data.validation_file, data.test_split: data.test_file}
    files = {k: v for k, v in files.items() if v}
    suffixes = {Path(f).suffix for f in files.values()}
    if len(suffixes) != 1:
        raise ValueError(f"All local files must have one format, got {sorted(suffixes)}.")
    suffix = suffixes.pop()
    if suffix not in (".tsv", ".csv", ".json", ".jsonl"):
        raise ValueError(f"Unsupported file type {suffix!r}: use csv, tsv, json or jsonl.")
    try:
        if suffix in (".tsv", ".csv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            # SST-2 style TSV has unbalanced quotes: never treat quotes specially in TSV.
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            return datasets.load_dataset("csv", data_files=files, delimiter=delimiter, quoting=quoting)
        return datasets.load_dataset("json", data_files=files)
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        raise ValueError(
            f"A data file is empty (no rows after the header): {sorted(Path(f).name for f in files.values())}."
        ) from err


def check_columns(raw: datasets.DatasetDict, data: DataArguments) -> None:
    for split, ds in raw.items():
        needed = {"--text_column": data.text_column, "--text_pair_column": data.text_pair_column}
        if split == "train":
            needed["--label_column"] = data.label_column
        for flag, column in needed.items():
            if column and column not in ds.column_names:
                raise ValueError(
                    f"Split '{split}' has no column {column!r} (columns: {ds.column_names}); set {flag} to one of them."
                )


def label_names(raw: datasets.DatasetDict, data: DataArguments) -> list | None:
    """Sorted label values when labels are strings (mapped to ids), ``None`` when they are ints already."""
    feature = raw["train"].features[data.label_column] if "train" in raw else None
    if isinstance(feature, datasets.ClassLabel):
        return None
    values = sorted({v for ds in raw.values() if data.label_column in ds.column_names for v in ds[data.label_column]})
    return values if values and isinstance(values[0], str) else None


def tokenize(raw: datasets.DatasetDict, tokenizer, data: DataArguments, names: list | None) -> datasets.DatasetDict:
    def encode(batch):
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        enc = tokenizer(batch[data.text_column], pairs, truncation=True, max_length=data.max_seq_length)
        if data.label_column in batch:
            labels = batch[data.label_column]
            enc["labels"] = [names.index(v) for v in labels] if names else [int(v) for v in labels]
        return enc

    return datasets.DatasetDict(
        {
            split: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
            for split, ds in raw.items()
        }
    )


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the recipe; returns the metrics dict it also saves to ``output_dir``."""
    model_args, data_args, training_args = parse_args(args, prog)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args)
    common.check_not_empty(raw)
    check_columns(raw, data_args)
    names = label_names(raw, data_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.teacher_model_name_or_path)
    check_tokenizers(model_args, tokenizer)
    tokenized = tokenize(raw, tokenizer, data_args, names)
    for split, limit in (
        ("train", data_args.max_train_samples),
        (data_args.validation_split, data_args.max_eval_samples),
        (data_args.test_split, data_args.max_test_samples),
    ):
        if limit is not None and split in tokenized:
            tokenized[split] = tokenized[split].select(range(min(limit, len(tokenized[split]))))
    if "train" in tokenized:
        num_labels = model_args.num_labels or (len(names) if names else int(max(tokenized["train"]["labels"])) + 1)
    else:
        num_labels = model_args.num_labels

    label_kwargs = {"num_labels": num_labels} if num_labels else {}
    if names:
        label_kwargs.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    teacher = AutoModelForSequenceClassification.from_pretrained(model_args.teacher_model_name_or_path, **label_kwargs)
    check_lengths({"input_ids": data_args.max_seq_length}, position_limits(teacher), {"input_ids": "--max_seq_length"})
    for split, ds in tokenized.items():
        if "labels" in ds.column_names and len(ds):
            high, low = max(ds["labels"]), min(ds["labels"])
            if low < 0 or high >= teacher.config.num_labels:
                raise ValueError(
                    f"Split '{split}' has label {high if high >= teacher.config.num_labels else low}, outside 0.."
                    f"{teacher.config.num_labels - 1} (num_labels={teacher.config.num_labels}): fix the labels or set "
                    "--num_labels to the number of classes."
                )
    distill = model_args.training_mode == "distill"
    head_kwargs = dict(
        num_labels=teacher.config.num_labels, id2label=teacher.config.id2label, label2id=teacher.config.label2id
    )
    model = (
        build_student(model_args, teacher, AutoModelForSequenceClassification, **head_kwargs)
        if model_args.has_student
        else teacher
    )

    common_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get(data_args.validation_split),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None
        ),
        compute_metrics=compute_classification_metrics,
    )
    trainer = DistillTrainer(teacher_model=teacher, **common_kwargs) if distill else InOrderTrainer(**common_kwargs)

    evaluations = []
    for split, prefix, wanted in (
        (data_args.validation_split, "eval", training_args.do_eval),
        (data_args.test_split, "test", training_args.do_predict),
    ):
        if not wanted or split not in tokenized:
            continue
        if "labels" not in tokenized[split].column_names:
            logger.warning("Split '%s' has no labels; skipping its evaluation.", split)
            continue
        evaluations.append(common.Evaluation(prefix, tokenized[split]))

    def sample():
        example = raw[data_args.validation_split if data_args.validation_split in raw else "train"][0]
        pair = example[data_args.text_pair_column] if data_args.text_pair_column else None
        return tokenizer(
            example[data_args.text_column],
            pair,
            truncation=True,
            max_length=data_args.max_seq_length,
            return_tensors="pt",
        )

    return common.run(
        trainer,
        common_kwargs,
        model_args,
        training_args,
        tokenizer,
        evaluations,
        ("accuracy",),
        sample,
        lambda metrics, example: write_card(
            trainer, model_args, data_args, training_args, teacher, model, metrics, example
        ),
    )


def write_card(trainer, model_args, data_args, training_args, teacher, model, metrics, sample) -> None:
    test = any(k.startswith("test_") for k in metrics)
    eval_file = data_args.test_file if test else data_args.validation_file
    common.write_card(
        trainer,
        model_args,
        training_args,
        teacher,
        model,
        metrics,
        sample=sample,
        **common.describe_data(
            data_args.dataset_name,
            data_args.train_file,
            eval_file,
            "test" if test else "validation",
            data_args.dataset_config_name,
            model_args.card_dataset_id,
        ),
    )


if __name__ == "__main__":
    main()
