"""Sequence-level knowledge distillation (Kim & Rush, 2016): train the student on the teacher's outputs.

The teacher translates every training source once (beam search, or greedy with one beam); the student is then
trained on those outputs instead of (or, with word-level KD and attention transfer, as well as with) the
references. A causal-LM teacher answers every record's prompt (its tokens before the first labelled one) instead,
and the example becomes the prompt followed by that answer (the prompt still masked). The translations are cached on disk (gzip-compressed token ids, with the settings that made them in
``meta.json``) and reused only while the teacher weights, the tokenized sources and the generation settings are
the same, on any machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.logging import tqdm

from hf_attn_distill.tasks.lm import generate_answers, prompt_of
from hf_attn_distill.terms.lm_head import is_causal_lm
from hf_attn_distill.training.teacher_cache import weights_checksum

__all__ = ["sequence_kd_dataset"]


def _causal_prompts(dataset: datasets.Dataset) -> list[list[int]]:
    """Each record's prompt: its tokens before the first labelled one."""
    if "labels" not in dataset.column_names:
        raise ValueError("Sequence-level KD of a causal LM needs prompt/completion or chat records (labels).")
    return [prompt_of(ids, labels, "Sequence-level KD") for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def _strip(tokens: list[int], start: int | None, pad: int | None, eos: int | None) -> list[int]:
    """Generated ids without the decoder start token, the padding, or anything after the first ``eos``."""
    if tokens and start is not None and tokens[0] == start:
        tokens = tokens[1:]
    out = []
    for t in tokens:
        if t == pad and t != eos:
            break
        out.append(t)
        if t == eos:
            break
    return out


def _write(path: Path, value) -> None:
    """``value`` as gzip-compressed JSON, written whole or not at all (a stop mid-write leaves the old file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(json.dumps(value, separators=(",", ":")).encode(), mtime=0))
    tmp.replace(path)


def _sources_checksum(sources) -> str:
    """SHA-256 of the token ids of every source, in order: the same on every machine for the same data."""
    digest = hashlib.sha256()
    for ids in sources:
        digest.update(json.dumps(list(ids), separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()


@torch.inference_mode()
def sequence_kd_dataset(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: datasets.Dataset,
    cache_dir: str | Path,
    num_beams: int = 4,
    max_length: int = 64,
    batch_size: int = 32,
    save_every: int = 20,
) -> datasets.Dataset:
    """``dataset`` (with ``input_ids``) with ``labels`` replaced by the teacher's translations of its sources; for a
    causal-LM teacher, each record's prompt followed by the teacher's answer (at most ``max_length`` new tokens) as
    ``input_ids``, the answer as ``labels``.

    Translations come from ``cache_dir`` when its key (teacher weights checksum, a checksum of the tokenized sources,
    generation settings) matches; otherwise they are generated (teacher in eval mode, beam search) and cached. Every
    ``save_every`` batches the translations so far are kept (``partial.json.gz``), so a generation stopped midway
    resumes where it stopped (with the same key) instead of starting over.
    """
    if "input_ids" not in dataset.column_names:
        raise ValueError("sequence-level KD needs a tokenized dataset with an input_ids column.")
    causal = is_causal_lm(teacher)
    sources = _causal_prompts(dataset) if causal else dataset["input_ids"]
    key = {
        "teacher": type(teacher).__name__,
        "teacher_weights_checksum": weights_checksum(teacher),
        "sources_sha256": _sources_checksum(sources),
        "num_examples": len(dataset),
        "num_beams": num_beams,
        "max_length": max_length,
    }
    folder = Path(cache_dir)
    meta, data = folder / "meta.json", folder / "translations.json.gz"
    partial = folder / "partial.json.gz"  # what an interrupted generation had done: resumed, not redone
    if meta.exists() and data.exists() and json.loads(meta.read_text()) == key:
        labels = json.loads(gzip.decompress(data.read_bytes()))
    else:
        config = teacher.generation_config
        start, pad, eos = config.decoder_start_token_id, config.pad_token_id, config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        if causal:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad if pad is not None else eos
        was_training = teacher.training
        teacher.eval()
        labels = []
        if partial.exists():
            kept = json.loads(gzip.decompress(partial.read_bytes()))
            labels = kept["labels"] if kept.get("key") == key else []
        folder.mkdir(parents=True, exist_ok=True)
        device = next(teacher.parameters()).device
        with tqdm(
            total=len(dataset),
            desc=f"Teacher {'answers' if causal else 'translations'} (sequence-level KD)",
            unit="record",
        ) as bar:
            bar.update(len(labels))
            for index, first in enumerate(range(len(labels), len(dataset), batch_size)):
                rows = sources[first : first + batch_size]
                if causal:
                    labels += generate_answers(
                        teacher, rows, pad, eos, max_length, num_beams=num_beams, do_sample=False
                    )
                else:
                    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(device)
                    generated = teacher.generate(**batch, num_beams=num_beams, max_length=max_length)
                    labels += [_strip(seq, start, pad, eos) for seq in generated.tolist()]
                bar.update(len(rows))
                if (index + 1) % save_every == 0 and len(labels) < len(dataset):
                    _write(partial, {"key": key, "labels": labels})
        teacher.train(was_training)
        meta.unlink(missing_ok=True)
        _write(data, labels)
        meta.write_text(json.dumps(key, indent=1))
        partial.unlink(missing_ok=True)
    if causal:
        rows = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in zip(sources, labels)]
        return datasets.Dataset.from_list(rows)
    if "labels" in dataset.column_names:
        dataset = dataset.remove_columns("labels")
    return dataset.add_column("labels", labels)
