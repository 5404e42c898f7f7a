#!/usr/bin/env python
"""Distill (or fine-tune) an encoder-decoder translation model; BLEU and chrF with sacrebleu.

Flag names follow transformers' ``examples/pytorch/translation/run_translation.py``.

Examples::

    # 1. a teacher: an EncoderDecoderModel whose encoder and decoder start from one BERT-family checkpoint
    python -m hf_attn_distill.recipes.distill_translation --training_mode finetune --teacher_model_name_or_path <bert folder> \
        --build_encoder_decoder --data_dir ../shared/data/multi30k --source_lang de --target_lang en \
        --output_dir out/mt_teacher --do_train --do_eval --predict_with_generate

    # 2. a student with 3 encoder and 3 decoder layers of the teacher, with attention transfer at every site
    python -m hf_attn_distill.recipes.distill_translation --teacher_model_name_or_path out/mt_teacher \
        --student_teacher_layers 1,3,5 --student_decoder_layers 1,3,5 --data_dir ../shared/data/multi30k \
        --source_lang de --target_lang en --layer_map uniform --decoder_layer_map uniform --cross_layer_map uniform \
        --output_dir out/mt_student --do_train --do_eval --do_predict --predict_with_generate

Data: aligned text files ``{data_dir}/{split}.{lang}`` (one sentence a line), or a Hub dataset with a
``translation`` column (``--dataset_name wmt16 --dataset_config_name de-en``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    EncoderDecoderModel,
    set_seed,
)

from hf_attn_distill.hub.model_card import distillation_method
from hf_attn_distill.seq2seq_trainer import DistillSeq2SeqConfig, DistillSeq2SeqTrainer
from hf_attn_distill.students import student_from_config, student_from_teacher_layers
from hf_attn_distill.tasks.metrics import TranslationMetrics
from hf_attn_distill.tasks.sequence_kd import sequence_kd_dataset
from hf_attn_distill.training.batches import check_lengths, position_limits
from hf_attn_distill.training.eval_order import InOrderSeq2SeqTrainer

from . import common
from .common import ModelArguments, check_tokenizers, parse_overrides

logger = logging.getLogger(__name__)


@dataclass
class TranslationModelArguments(ModelArguments):
    """Model arguments plus what an encoder-decoder needs."""

    student_decoder_layers: str | None = field(
        default=None, metadata={"help": "With --student_teacher_layers: the decoder layers to keep, e.g. '1,3,5'."}
    )
    sequence_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD (Kim & Rush 2016): train on the teacher's beam-search translations of the "
            "training sources (cached on disk) instead of the references; combines with word KD and attention."
        },
    )
    sequence_kd_num_beams: int = field(default=4, metadata={"help": "Beams of the teacher's translations."})
    sequence_kd_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where the teacher's translations are cached (default: output_dir/teacher_translations)."},
    )
    build_encoder_decoder: bool = field(
        default=False,
        metadata={
            "help": "--teacher_model_name_or_path is an encoder checkpoint (e.g. BERT): build an "
            "EncoderDecoderModel with encoder and decoder both initialised from it (cross-attention new)."
        },
    )


@dataclass
class TranslationDataArguments:
    """Which parallel data, which languages, how long (``run_translation.py`` names)."""

    source_lang: str = field(metadata={"help": "Source language id, e.g. 'de' (file suffix of the source side)."})
    target_lang: str = field(metadata={"help": "Target language id, e.g. 'en'."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with aligned {split}.{lang} text files."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with a 'translation' column."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Training split (file stem)."})
    validation_split: str = field(default="val", metadata={"help": "Validation split (file stem)."})
    test_split: str = field(default="test_2016_flickr", metadata={"help": "Test split (file stem)."})
    max_source_length: int = field(default=64, metadata={"help": "Source tokens kept."})
    max_target_length: int = field(default=64, metadata={"help": "Target tokens kept (labels)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation pairs."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test pairs."})
    lowercase_metrics: bool = field(
        default=True, metadata={"help": "Case-insensitive BLEU/chrF (right for uncased vocabularies such as MiniLM's)."}
    )

    def __post_init__(self):
        if not self.data_dir and not self.dataset_name:
            raise ValueError("Give --data_dir (aligned {split}.{lang} files) or --dataset_name.")


def load_parallel_text(data_dir: str | Path, split: str, source_lang: str, target_lang: str) -> datasets.Dataset:
    """``{data_dir}/{split}.{source_lang}`` and ``.{target_lang}`` as a dataset with a ``translation`` column.

    Raises naming the files when their line counts differ or a line is empty.
    """
    paths = [Path(data_dir) / f"{split}.{lang}" for lang in (source_lang, target_lang)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: --data_dir needs {split}.{source_lang} and {split}.{target_lang}."
            )
    sides = [path.read_text(encoding="utf-8").rstrip("\n").split("\n") for path in paths]
    if len(sides[0]) != len(sides[1]):
        raise ValueError(
            f"{paths[0]} has {len(sides[0])} lines and {paths[1]} {len(sides[1])}: parallel files must be aligned line "
            "by line."
        )
    for path, lines in zip(paths, sides):
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty:
            raise ValueError(f"{path} has empty lines (line {empty[0]} and {len(empty) - 1} more); remove the pair.")
    return datasets.Dataset.from_dict({"translation": [{source_lang: s, target_lang: t} for s, t in zip(*sides)]})


def load_raw_datasets(data: TranslationDataArguments) -> datasets.DatasetDict:
    if data.dataset_name:
        raw = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
        for split, ds in raw.items():
            if "translation" not in ds.column_names:
                raise ValueError(
                    f"Split '{split}' of {data.dataset_name} has no 'translation' column: {ds.column_names}."
                )
        return raw
    splits = (data.train_split, data.validation_split, data.test_split)
    return datasets.DatasetDict(
        {
            split: load_parallel_text(data.data_dir, split, data.source_lang, data.target_lang)
            for split in splits
            if (Path(data.data_dir) / f"{split}.{data.source_lang}").exists()
        }
    )


def load_teacher(model_args: TranslationModelArguments, tokenizer):
    if model_args.build_encoder_decoder:
        path = model_args.teacher_model_name_or_path
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
        model.config.decoder_start_token_id = tokenizer.cls_token_id
        model.config.eos_token_id = tokenizer.sep_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
        model.generation_config.eos_token_id = tokenizer.sep_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model
    config = AutoConfig.from_pretrained(model_args.teacher_model_name_or_path)
    if not getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{common.public_model_name(model_args.teacher_model_name_or_path)} is not an encoder-decoder model "
            f"({type(config).__name__}); pass a translation model, or an encoder checkpoint with --build_encoder_decoder."
        )
    return AutoModelForSeq2SeqLM.from_pretrained(model_args.teacher_model_name_or_path)


def build_student(model_args: TranslationModelArguments, teacher):
    if model_args.student_model_name_or_path:
        return AutoModelForSeq2SeqLM.from_pretrained(model_args.student_model_name_or_path)
    if model_args.student_teacher_layers:
        if not model_args.student_decoder_layers:
            raise ValueError("--student_teacher_layers needs --student_decoder_layers too (e.g. '1,3,5').")
        encoder = [int(x) for x in model_args.student_teacher_layers.split(",")]
        decoder = [int(x) for x in model_args.student_decoder_layers.split(",")]
        source = teacher
        if model_args.student_layers_from:
            source = AutoModelForSeq2SeqLM.from_pretrained(model_args.student_layers_from)
        return student_from_teacher_layers(source, encoder, decoder_layers=decoder)
    if isinstance(getattr(teacher.config, "encoder", None), transformers.PretrainedConfig):
        raise ValueError(
            "--student_config_overrides cannot resize an EncoderDecoderModel (its config nests an encoder and a "
            "decoder config); use --student_teacher_layers with --student_decoder_layers."
        )
    return student_from_config(teacher, **parse_overrides(model_args.student_config_overrides))


def tokenize(raw: datasets.DatasetDict, tokenizer, data: TranslationDataArguments, decoder_start: int | None):
    def encode(batch):
        sources = [pair[data.source_lang] for pair in batch["translation"]]
        targets = [pair[data.target_lang] for pair in batch["translation"]]
        enc = tokenizer(sources, max_length=data.max_source_length, truncation=True)
        labels = tokenizer(text_target=targets, max_length=data.max_target_length, truncation=True)["input_ids"]
        # the decoder starts from decoder_start_token_id itself: do not make it predict a leading copy of it
        enc["labels"] = [ids[1:] if decoder_start is not None and ids[:1] == [decoder_start] else ids for ids in labels]
        return enc

    return datasets.DatasetDict(
        {
            split: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
            for split, ds in raw.items()
        }
    )


def main(args: list[str] | None = None, prog: str | None = None) -> dict:
    """Run the recipe; returns the metrics dict it also saves to ``output_dir``."""
    model_args, data_args, training_args = common.parse_args(
        (TranslationModelArguments, TranslationDataArguments, DistillSeq2SeqConfig), args, prog
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    if training_args.generation_max_length is None:
        # as run_translation.py: generate as long as the targets were tokenized, not transformers' generic 20 tokens
        training_args.generation_max_length = data_args.max_target_length
        logger.info(
            "Generating at most --max_target_length=%d tokens (--generation_max_length not set).",
            data_args.max_target_length,
        )

    raw = load_raw_datasets(data_args)
    common.check_not_empty(raw)
    tokenizer = AutoTokenizer.from_pretrained(model_args.teacher_model_name_or_path)
    check_tokenizers(model_args, tokenizer)
    teacher = load_teacher(model_args, tokenizer)
    distill = model_args.training_mode == "distill"
    model = build_student(model_args, teacher) if model_args.has_student else teacher
    check_lengths(
        {"input_ids": data_args.max_source_length, "decoder_input_ids": data_args.max_target_length},
        position_limits(teacher),
        {"input_ids": "--max_source_length", "decoder_input_ids": "--max_target_length"},
    )
    tokenized = tokenize(raw, tokenizer, data_args, model.config.decoder_start_token_id)
    limits = {
        data_args.train_split: data_args.max_train_samples,
        data_args.validation_split: data_args.max_eval_samples,
        data_args.test_split: data_args.max_predict_samples,
    }
    for split, limit in limits.items():
        if limit is not None and split in tokenized:
            tokenized[split] = tokenized[split].select(range(min(limit, len(tokenized[split]))))

    if model_args.sequence_kd:
        if not distill or data_args.train_split not in tokenized:
            raise ValueError("--sequence_kd needs --training_mode distill and training data.")
        cache = model_args.sequence_kd_cache_dir or str(Path(training_args.output_dir) / "teacher_translations")
        tokenized[data_args.train_split] = sequence_kd_dataset(
            teacher,
            tokenizer,
            tokenized[data_args.train_split],
            cache,
            num_beams=model_args.sequence_kd_num_beams,
            max_length=data_args.max_target_length,
            batch_size=training_args.per_device_eval_batch_size,
        )
    common_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=tokenized.get(data_args.train_split),
        eval_dataset=tokenized.get(data_args.validation_split),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=(
            TranslationMetrics(
                tokenizer,
                data_args.lowercase_metrics,
                references(raw, tokenized, data_args.validation_split, data_args),
            )
            if training_args.predict_with_generate
            else None
        ),
    )
    trainer = (
        DistillSeq2SeqTrainer(teacher_model=teacher, **common_kwargs)
        if distill
        else InOrderSeq2SeqTrainer(**common_kwargs)
    )

    def scored_against(split):  # generation metrics score against the split's raw reference sentences
        def before():
            if common_kwargs["compute_metrics"] is not None:
                common_kwargs["compute_metrics"].references = references(raw, tokenized, split, data_args)

        return before

    def generation_settings(prefix: str) -> dict:  # what the generated translations were made with
        if not training_args.predict_with_generate:
            return {}
        beams = training_args.generation_num_beams or model.generation_config.num_beams
        return {
            f"{prefix}_generation_max_length": training_args.generation_max_length,
            f"{prefix}_generation_num_beams": beams,
        }

    evaluations = [
        common.Evaluation(prefix, tokenized[split], scored_against(split), generation_settings(prefix))
        for split, prefix, wanted in (
            (data_args.validation_split, "eval", training_args.do_eval),
            (data_args.test_split, "test", training_args.do_predict),
        )
        if wanted and split in tokenized
    ]

    def sample():
        split = data_args.validation_split if data_args.validation_split in tokenized else data_args.train_split
        row = tokenized[split][0] if split in tokenized and len(tokenized[split]) else None
        if row is None:
            return None
        student = trainer.accelerator.unwrap_model(trainer.model)
        return {
            "input_ids": torch.tensor([row["input_ids"]]),
            "attention_mask": torch.tensor([row["attention_mask"]]),
            "decoder_input_ids": student.prepare_decoder_input_ids_from_labels(labels=torch.tensor([row["labels"]])),
        }

    return common.run(
        trainer,
        common_kwargs,
        model_args,
        training_args,
        tokenizer,
        evaluations,
        ("bleu", "chrf"),
        sample,
        lambda metrics, example: write_card(
            trainer, model_args, data_args, training_args, teacher, model, metrics, example
        ),
        teacher_trainer_class=InOrderSeq2SeqTrainer,
    )


def references(raw, tokenized, split: str, data: TranslationDataArguments) -> list[str] | None:
    """The raw target sentences of ``split``, as many as were kept for evaluation."""
    if split not in raw or split not in tokenized:
        return None
    return [pair[data.target_lang] for pair in raw[split].select(range(len(tokenized[split])))["translation"]]


def write_card(trainer, model_args, data_args, training_args, teacher, model, metrics, sample) -> None:
    test = any(k.startswith("test_") for k in metrics)
    split = data_args.test_split if test else data_args.validation_split
    pair = f"{data_args.source_lang}-{data_args.target_lang}"
    if data_args.dataset_name:
        data = common.describe_data(
            data_args.dataset_name,
            None,
            None,
            "test" if test else "validation",
            data_args.dataset_config_name,
            model_args.card_dataset_id,
        )
    else:  # aligned text files: name the folder and the files, never the path
        folder = Path(data_args.data_dir).name
        source = f" of {model_args.card_dataset_id}" if model_args.card_dataset_id else ""
        data = {
            "dataset": f"local parallel text {pair}{source} ({folder}/{data_args.train_split}.*)",
            "dataset_id": model_args.card_dataset_id,
            "eval_split": f"local files {folder}/{split}.{data_args.source_lang}/.{data_args.target_lang}",
        }
    method = None
    if model_args.training_mode == "distill" and model_args.sequence_kd:
        method = distillation_method(training_args, sequence_kd=True)
    extra = {
        "student_decoder_layers": model_args.student_decoder_layers,
        "sequence_kd": model_args.sequence_kd or None,
        "max_source_length": data_args.max_source_length,
        "max_target_length": data_args.max_target_length,
        **{
            name: metrics.get(f"{'test' if test else 'eval'}_{name}")
            for name in ("generation_max_length", "generation_num_beams")
        },
    }
    common.write_card(
        trainer,
        model_args,
        training_args,
        teacher,
        model,
        metrics,
        sample=sample,
        dataset=data["dataset"],
        dataset_id=data["dataset_id"],
        method=method,
        eval_split=f"{data['eval_split']}, {'lower-cased' if data_args.lowercase_metrics else 'cased'} sacrebleu "
        "BLEU/chrF",
        extra_settings=extra,
        citations=("hinton2015", "kim2016", "tinybert", "minilm"),
    )


if __name__ == "__main__":
    main()
