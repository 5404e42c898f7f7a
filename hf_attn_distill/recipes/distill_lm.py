#!/usr/bin/env python
"""Distill (or fine-tune) a decoder-only language model: Llama, Qwen2, Mistral, GPT-2 and other ``AutoModelForCausalLM``.

Examples::

    # a student of every other layer of the teacher, logit KD with the generalized JSD and attention transfer
    python -m hf_attn_distill.recipes.distill_lm --teacher_model_name_or_path Qwen/Qwen2.5-0.5B \
        --student_teacher_layers 0,2,4,6,8,10,12,14,16,18,20,22 --train_file train.txt --validation_file val.txt \
        --block_size 512 --divergence jsd --jsd_beta 0.5 --output_dir out/student --do_train --do_eval

    # the same as one command, or from a YAML/JSON file of the same arguments
    hf-attn-distill lm my_lm_student.yaml

Data (``--train_file``/``--validation_file``): plain text (``.txt``, packed into ``--block_size`` blocks), or JSON
lines with a ``text`` field (packed), ``prompt``/``completion`` fields or a chat ``messages`` list (one example per
record, loss on the completion / the assistant turns only; see :mod:`~hf_attn_distill.tasks.lm`). Evaluation
writes the student's ``eval_perplexity``, the teacher's ``teacher_eval_perplexity`` on the same tokens, their KL
``eval_kl_to_teacher`` and ``eval_top1_agreement`` to ``eval_results.json``, computed without full logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_attn_distill.config import DistillConfig
from hf_attn_distill.hub.model_card import distillation_method
from hf_attn_distill.tasks.lm import LMCollator, chat_example, completion_example, lm_format, lm_metrics, pack_texts
from hf_attn_distill.tasks.sequence_kd import sequence_kd_dataset
from hf_attn_distill.trainer import DistillTrainer
from hf_attn_distill.training.batches import check_lengths, position_limits
from hf_attn_distill.training.eval_order import InOrderTrainer
from hf_attn_distill.training.pairing import shared_vocab_rows

from . import common
from .common import ModelArguments, build_student, check_tokenizers

logger = logging.getLogger(__name__)

__all__ = ["LMDataArguments", "LMModelArguments", "load_lm_splits", "main", "parse_args"]


@dataclass
class LMModelArguments(ModelArguments):
    """Model arguments plus sequence-level KD of a causal LM."""

    sequence_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD (Kim & Rush 2016): train on the teacher's answers to the training prompts "
            "(generated once, cached on disk) instead of the given completions; needs prompt/completion or chat data."
        },
    )
    sequence_kd_num_beams: int = field(default=1, metadata={"help": "Beams of the teacher's answers (1: greedy)."})
    sequence_kd_max_new_tokens: int = field(default=128, metadata={"help": "Longest teacher answer, in tokens."})
    sequence_kd_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the teacher's answers are cached (default: output_dir/teacher_answers)."}
    )


@dataclass
class LMDataArguments:
    """Which text, in which blocks."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with a 'text' column."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: .txt (packed), or .json/.jsonl records (text, prompt/completion or messages)."
        },
    )
    validation_file: str | None = field(default=None, metadata={"help": "Held-out data, same formats."})
    validation_split: str = field(default="validation", metadata={"help": "Hub split used for evaluation."})
    block_size: int = field(
        default=512,
        metadata={"help": "Tokens per packed block and the longest record; at most the models' positions."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N held-out blocks."})

    def __post_init__(self):
        if not self.dataset_name and not self.train_file and not self.validation_file:
            raise ValueError("Give --dataset_name or local --train_file/--validation_file.")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2 (a token and the one it predicts), got {self.block_size}")
        for path in (self.train_file, self.validation_file):
            if path and Path(path).suffix not in (".txt", ".json", ".jsonl"):
                raise ValueError(f"Unsupported file type of {Path(path).name}: use .txt, .json or .jsonl.")


def parse_args(args: list[str] | None = None, prog: str | None = None):
    """Parse the command line, or a single YAML/JSON file of the same arguments."""
    return common.parse_args((LMModelArguments, LMDataArguments, DistillConfig), args, prog)


def _raw(data: LMDataArguments) -> datasets.DatasetDict:
    if data.dataset_name:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
        return datasets.DatasetDict({k: raw[k] for k in ("train", data.validation_split) if k in raw})
    splits = {}
    for split, path in (("train", data.train_file), (data.validation_split, data.validation_file)):
        if path:
            loader = "text" if Path(path).suffix == ".txt" else "json"
            splits[split] = datasets.load_dataset(loader, data_files={split: path})[split]
    return datasets.DatasetDict(splits)


def load_lm_splits(data: LMDataArguments, tokenizer) -> datasets.DatasetDict:
    """Each split as ``input_ids``/``labels`` examples (:mod:`~hf_attn_distill.tasks.lm`); a split without one
    labelled next token is refused, naming the fix."""
    out = {}
    for split, ds in _raw(data).items():
        kind = lm_format(ds.column_names)
        if kind == "text":
            blocks = pack_texts(ds["text"], tokenizer, data.block_size)
            examples = [{"input_ids": b, "labels": b} for b in blocks]
        elif kind == "prompt_completion":
            examples = [completion_example(r["prompt"], r["completion"], tokenizer, data.block_size) for r in ds]
        else:
            examples = [chat_example(r["messages"], tokenizer, data.block_size) for r in ds]
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        examples = examples[:limit] if limit is not None else examples
        if not any(label != -100 for e in examples for label in e["labels"][1:]):
            raise ValueError(
                f"Split '{split}' has no token to learn: {len(examples)} examples, none with a labelled next token "
                "(completions cut off by --block_size, empty completions or assistant turns, or an empty file). "
                "Raise --block_size, shorten the prompts, or check the data."
            )
        out[split] = datasets.Dataset.from_list(examples)
    return datasets.DatasetDict(out)


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the recipe; returns the metrics dict it also saves to ``output_dir``."""
    model_args, data_args, training_args = parse_args(args, prog)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.teacher_model_name_or_path)
    check_tokenizers(model_args, tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(model_args.teacher_model_name_or_path)
    check_lengths({"input_ids": data_args.block_size}, position_limits(teacher), {"input_ids": "--block_size"})
    splits = load_lm_splits(data_args, tokenizer)
    distill = model_args.training_mode == "distill"
    if model_args.sequence_kd:
        if not distill or "train" not in splits:
            raise ValueError("--sequence_kd needs --training_mode distill and training data.")
        answered = sequence_kd_dataset(
            teacher,
            tokenizer,
            splits["train"],
            model_args.sequence_kd_cache_dir or str(Path(training_args.output_dir) / "teacher_answers"),
            num_beams=model_args.sequence_kd_num_beams,
            max_length=model_args.sequence_kd_max_new_tokens,
            batch_size=training_args.per_device_eval_batch_size,
        )
        splits["train"] = answered.map(
            lambda e: {k: e[k][: data_args.block_size] for k in ("input_ids", "labels")}, desc="Truncating"
        )
    model = build_student(model_args, teacher, AutoModelForCausalLM) if model_args.has_student else teacher
    check_lengths({"input_ids": data_args.block_size}, position_limits(model), {"input_ids": "--block_size"})
    collator = LMCollator(tokenizer, pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None)
    common_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=splits.get("train"),
        eval_dataset=splits.get(data_args.validation_split),
        processing_class=tokenizer,
        data_collator=collator,
    )
    trainer = DistillTrainer(teacher_model=teacher, **common_kwargs) if distill else InOrderTrainer(**common_kwargs)
    held_out = splits.get(data_args.validation_split)
    measured_teacher = teacher if distill and model_args.evaluate_teacher and not common.is_sharded(trainer) else None
    # the teacher comparisons run over the rows both vocabularies share (a padded one: the tokenizer's), as training
    vocab_rows = shared_vocab_rows(model, measured_teacher, tokenizer) if measured_teacher is not None else None

    def perplexities() -> dict:
        if common.is_sharded(trainer):  # a sharded model's forward needs every process: the trainer's terms only
            logger.warning(
                "The models are sharded: eval_perplexity and the teacher comparisons are not measured; the "
                "student's perplexity is exp(eval_loss_ce)."
            )
            return {}
        loader = DataLoader(held_out, batch_size=training_args.per_device_eval_batch_size, collate_fn=collator)
        return lm_metrics(model, measured_teacher, loader, vocab_rows, max(1, training_args.lm_chunk_tokens or 1024))

    evaluations = []
    if training_args.do_eval and held_out is not None:
        evaluations.append(common.Evaluation("eval", held_out, extra=perplexities))
    model_args.evaluate_teacher = False  # the teacher's perplexity comes from lm_metrics, on the same tokens

    def sample():
        source = held_out if held_out is not None else splits.get("train")
        if source is None or not len(source):
            return None
        ids = source[0]["input_ids"][:64]
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}

    def card(metrics, example):
        common.write_card(
            trainer,
            model_args,
            training_args,
            teacher,
            model,
            metrics,
            sample=example,
            extra_settings={"block_size": data_args.block_size, "sequence_kd": model_args.sequence_kd or None},
            method=distillation_method(training_args, sequence_kd=True) if distill and model_args.sequence_kd else None,
            citations=("hinton2015", "minilm", *(("kim2016",) if model_args.sequence_kd else ())),
            **common.describe_data(
                data_args.dataset_name,
                data_args.train_file,
                data_args.validation_file,
                "validation",
                data_args.dataset_config_name,
                model_args.card_dataset_id,
            ),
        )

    return common.run(trainer, common_kwargs, model_args, training_args, tokenizer, evaluations, (), sample, card)


if __name__ == "__main__":
    main()
