#!/usr/bin/env python
"""Task-agnostic distillation: a general-purpose student from a pretrained teacher, on unlabeled text.

As TinyBERT's general distillation, MiniLM and MiniLMv2 do, teacher and student (base models, no task head)
run on plain text and the student learns the teacher's self-attention relations (MiniLMv2, the default), its
attention distributions (``--attention_weight`` with ``--layer_map``) and hidden states (``--hidden_weight``).
There are no labels and no logits. The student is saved as a base model for the task recipes to fine-tune::

    hf-attn-distill general --teacher_model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --student_config_overrides num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024 \
        --train_file corpus.txt --output_dir out/general --max_steps 2000 --do_train
    hf-attn-distill classification --teacher_model_name_or_path out/sst2-teacher \
        --student_model_name_or_path out/general ...

Text: ``--train_file`` / ``--validation_file`` (``.txt``: one document per line; or csv/json/jsonl with
``--text_column``), or a Hub dataset (``--dataset_name``). By default documents are packed into blocks of
``--max_seq_length`` tokens (as BERT pretraining and ``run_mlm.py``'s ``group_texts`` do); ``--pack false`` keeps
one (truncated) document per example. Evaluation on the validation text reports each transfer term.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding, set_seed

from hf_attn_distill.config import DistillConfig
from hf_attn_distill.hub.model_card import distillation_method
from hf_attn_distill.trainer import DistillTrainer
from hf_attn_distill.training.batches import check_lengths, position_limits

from . import common
from .common import ModelArguments, build_student, check_tokenizers

__all__ = ["GeneralDataArguments", "GeneralDistillConfig", "main", "parse_args", "special_tokens", "tokenize"]

logger = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".text")


@dataclass
class GeneralDataArguments:
    """Which text, and how to cut it into examples."""

    train_file: str | None = field(
        default=None, metadata={"help": "Training text: .txt (one document per line), csv, json or jsonl."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Held-out text, same formats."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset of text, e.g. 'wikitext'."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    validation_split: str = field(default="validation", metadata={"help": "Split name used for evaluation."})
    text_column: str = field(default="text", metadata={"help": "Column with the text (csv/json/Hub data)."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example (a packed block, or truncation)."})
    pack: bool = field(
        default=True,
        metadata={"help": "Pack documents into full blocks of max_seq_length tokens; false: one document each."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation examples."})

    def __post_init__(self):
        if not self.dataset_name and not self.train_file and not self.validation_file:
            raise ValueError("Give --train_file (one document per line) or --dataset_name.")
        if self.max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8, got {self.max_seq_length}")


@dataclass
class GeneralDistillConfig(DistillConfig):
    """:class:`~hf_attn_distill.DistillConfig` with task-agnostic defaults: no label or logit terms, MiniLMv2
    relation transfer on. Attention and hidden-state terms are opt-in."""

    alpha_ce: float = field(default=0.0, metadata={"help": "Must stay 0: unlabeled text has no labels."})
    alpha_kd: float = field(default=0.0, metadata={"help": "Must stay 0: base models have no logits."})
    attention_weight: float = field(
        default=0.0, metadata={"help": "Weight of the attention-distribution term (with --layer_map)."}
    )
    relation_weight: float = field(default=1.0, metadata={"help": "Weight of the MiniLMv2 relation term."})

    def __post_init__(self):
        for name in ("alpha_ce", "alpha_kd"):
            if getattr(self, name) != 0:
                raise ValueError(
                    f"{name}={getattr(self, name)}: task-agnostic distillation runs base models on unlabeled text, "
                    f"so there are no labels or logits. Set --{name} 0 (or use a task recipe)."
                )
        super().__post_init__()


def parse_args(
    args: list[str] | None = None, prog: str | None = None
) -> tuple[ModelArguments, GeneralDataArguments, GeneralDistillConfig]:
    """Parse the command line, or a single YAML/JSON file of the same arguments."""
    return common.parse_args((ModelArguments, GeneralDataArguments, GeneralDistillConfig), args, prog)


def load_text(data: GeneralDataArguments) -> datasets.DatasetDict:
    """The text splits (``train``, the validation split), each with a ``text`` column; empty lines dropped."""
    if data.dataset_name:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    else:
        files = {"train": data.train_file, data.validation_split: data.validation_file}
        files = {k: v for k, v in files.items() if v}
        suffixes = {Path(f).suffix for f in files.values()}
        if len(suffixes) != 1:
            raise ValueError(f"All text files must have one format, got {sorted(suffixes)}.")
        suffix = suffixes.pop()
        loaders = {".csv": "csv", ".json": "json", ".jsonl": "json", **dict.fromkeys(TEXT_SUFFIXES, "text")}
        if suffix not in loaders:
            raise ValueError(f"Unsupported text file type {suffix!r}: use .txt (one document per line), csv or json.")
        raw = datasets.load_dataset(loaders[suffix], data_files=files)
    column = (
        "text"
        if not data.dataset_name and Path(data.train_file or data.validation_file).suffix in TEXT_SUFFIXES
        else data.text_column
    )
    out = {}
    for split, ds in raw.items():
        if column not in ds.column_names:
            raise ValueError(
                f"Split '{split}' has no column {column!r} (columns: {ds.column_names}); set --text_column to one."
            )
        ds = (
            ds.select_columns([column]).rename_column(column, "text")
            if column != "text"
            else ds.select_columns(["text"])
        )
        out[split] = ds.filter(lambda row: bool(row["text"] and row["text"].strip()), desc=f"Dropping empty {split}")
    return datasets.DatasetDict(out)


def tokenize(raw: datasets.DatasetDict, tokenizer, data: GeneralDataArguments) -> datasets.DatasetDict:
    """Token examples: packed blocks of ``max_seq_length`` tokens (special tokens included), or one truncated
    document each."""
    if not data.pack:
        return datasets.DatasetDict(
            {
                split: ds.map(
                    lambda b: tokenizer(b["text"], truncation=True, max_length=data.max_seq_length),
                    batched=True,
                    remove_columns=["text"],
                    desc=f"Tokenizing {split}",
                )
                for split, ds in raw.items()
            }
        )
    prefix, suffix = special_tokens(tokenizer)
    body = data.max_seq_length - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"max_seq_length={data.max_seq_length} leaves no room next to the special tokens.")

    def pack(batch):
        ids = [t for text in tokenizer(batch["text"], add_special_tokens=False)["input_ids"] for t in text]
        blocks = [prefix + ids[i : i + body] + suffix for i in range(0, len(ids) - body + 1, body)]  # tail dropped
        return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks]}

    return datasets.DatasetDict(
        {
            split: ds.map(pack, batched=True, batch_size=1000, remove_columns=["text"], desc=f"Packing {split}")
            for split, ds in raw.items()
        }
    )


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after one text (``[CLS]`` / ``[SEP]``, ``<s>`` / ``</s>``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError(f"Cannot tell which special tokens {type(tokenizer).__name__} adds around a text.")


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the recipe; returns the metrics dict it also saves to ``output_dir``."""
    model_args, data_args, training_args = parse_args(args, prog)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    if model_args.training_mode != "distill":
        raise ValueError("The general recipe only distills: --training_mode distill (there is no task to fine-tune).")
    set_seed(training_args.seed)

    raw = load_text(data_args)
    common.check_not_empty(raw)
    tokenizer = AutoTokenizer.from_pretrained(model_args.teacher_model_name_or_path)
    check_tokenizers(model_args, tokenizer)
    tokenized = tokenize(raw, tokenizer, data_args)
    common.check_not_empty(tokenized)
    for split, limit in (
        ("train", data_args.max_train_samples),
        (data_args.validation_split, data_args.max_eval_samples),
    ):
        if limit is not None and split in tokenized:
            tokenized[split] = tokenized[split].select(range(min(limit, len(tokenized[split]))))
    teacher = AutoModel.from_pretrained(model_args.teacher_model_name_or_path)
    check_lengths({"input_ids": data_args.max_seq_length}, position_limits(teacher), {"input_ids": "--max_seq_length"})
    model = build_student(model_args, teacher, AutoModel)
    common_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get(data_args.validation_split),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None
        ),
    )
    trainer = DistillTrainer(teacher_model=teacher, **common_kwargs)
    evaluations = []
    if training_args.do_eval and data_args.validation_split in tokenized:
        evaluations.append(common.Evaluation("eval"))

    def sample():
        text = raw[data_args.validation_split if data_args.validation_split in raw else "train"][0]["text"]
        return tokenizer(text, truncation=True, max_length=data_args.max_seq_length, return_tensors="pt")

    model_args.evaluate_teacher = False  # the teacher has no transfer terms against itself
    return common.run(
        trainer,
        common_kwargs,
        model_args,
        training_args,
        tokenizer,
        evaluations,
        (),
        sample,
        lambda metrics, example: common.write_card(
            trainer,
            model_args,
            training_args,
            teacher,
            model,
            metrics,
            sample=example,
            method=f"task-agnostic distillation on unlabeled text ({distillation_method(training_args)})",
            citations=("tinybert", "minilm", "minilmv2"),
            **common.describe_data(
                data_args.dataset_name,
                data_args.train_file,
                data_args.validation_file,
                "validation",
                data_args.dataset_config_name,
                model_args.card_dataset_id,
            ),
        ),
    )


if __name__ == "__main__":
    main()
