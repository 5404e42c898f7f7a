"""Causal language modelling: data (plain text packed into blocks, prompt/completion and chat records with the
loss on completions only), padding, and held-out metrics (perplexity of both models, their KL, top-1 agreement)
computed a chunk of tokens at a time, without ``[tokens, vocab]`` logits.

Records and their labels (``-100``: no loss; the model shifts labels by one):

- ``text``: documents joined with the tokenizer's end-of-sequence token and cut into ``block_size`` blocks (the
  last block may be shorter); every token is a label.
- ``prompt`` / ``completion``: one example each, ``prompt + completion + eos``, truncated to ``block_size``; the
  prompt's tokens are masked.
- ``messages`` (``[{"role", "content"}, ...]``): one example each, rendered with the tokenizer's chat template;
  the tokens of ``assistant`` turns are labels (not the header that prompts them), all others masked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_attn_distill.terms.lm_head import HeadTap, next_token_mask

__all__ = [
    "LM_FORMATS",
    "LMCollator",
    "chat_example",
    "completion_example",
    "generate_answers",
    "lm_format",
    "lm_metrics",
    "pack_texts",
    "prompt_of",
]

LM_FORMATS = ("text", "prompt_completion", "messages")


def lm_format(columns: Iterable[str]) -> str:
    """Which record format a dataset's columns hold (:data:`LM_FORMATS`), or a ``ValueError`` naming the fix."""
    columns = set(columns)
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "text" in columns:
        return "text"
    raise ValueError(
        f"LM data needs a 'text' column (plain text), 'prompt' and 'completion' columns, or a 'messages' column "
        f"(chat); this data has {sorted(columns)}."
    )


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def pack_texts(texts: Iterable[str], tokenizer, block_size: int) -> list[list[int]]:
    """Documents tokenized, each followed by the end-of-sequence token (when the tokenizer has one), joined and cut
    into blocks of ``block_size`` tokens; the last block keeps what is left."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        if text and text.strip():
            stream += _ids(tokenizer(text, add_special_tokens=False)) + eos
    return [stream[i : i + block_size] for i in range(0, len(stream), block_size)]


def completion_example(prompt: str, completion: str, tokenizer, block_size: int) -> dict[str, list[int]]:
    """``prompt + completion + eos`` truncated to ``block_size``, labels on the completion only."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = _ids(tokenizer(prompt, add_special_tokens=False))
    completion_ids = _ids(tokenizer(completion, add_special_tokens=False)) + eos
    ids = (prompt_ids + completion_ids)[:block_size]
    labels = ([-100] * len(prompt_ids) + completion_ids)[:block_size]
    return {"input_ids": ids, "labels": labels}


def chat_example(messages: list[dict[str, str]], tokenizer, block_size: int) -> dict[str, list[int]]:
    """A conversation rendered with the tokenizer's chat template, truncated to ``block_size``; the tokens each
    ``assistant`` turn adds are labels, except the header the template puts before an answer
    (``add_generation_prompt``); the rest is masked. The template must render a conversation as the rendering of
    its first turns followed by what the next turn adds (checked)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The data has 'messages' but the tokenizer has no chat template: set tokenizer.chat_template (and save "
            "it with the teacher's tokenizer), or give 'prompt'/'completion' records."
        )
    ids: list[int] = []
    labels: list[int] = []
    for turn in range(len(messages)):
        rendered = _ids(tokenizer.apply_chat_template(messages[: turn + 1], tokenize=True))
        if rendered[: len(ids)] != ids:
            raise ValueError(
                "The tokenizer's chat template does not render a conversation as its first turns followed by the "
                "next turn, so the assistant's tokens cannot be told apart: give 'prompt'/'completion' records."
            )
        start = len(ids)
        if messages[turn].get("role") == "assistant" and turn > 0:
            # the header the template adds to prompt an answer (add_generation_prompt) is not the answer
            header = _ids(tokenizer.apply_chat_template(messages[:turn], tokenize=True, add_generation_prompt=True))
            if rendered[: len(header)] == header:
                labels += [-100] * (len(header) - start)
                start = len(header)
        added = rendered[start:]
        labels += added if messages[turn].get("role") == "assistant" else [-100] * len(added)
        ids = rendered
    return {"input_ids": ids[:block_size], "labels": labels[:block_size]}


def prompt_of(ids: Sequence[int], labels: Sequence[int], purpose: str) -> list[int]:
    """A record's prompt: its tokens before the first labelled one. A record without one (plain text, where every
    token is a label) is refused: ``purpose`` (what needs prompts) answers prompts only."""
    first = next((i for i, label in enumerate(labels) if label != -100), len(ids))
    if first == 0:
        raise ValueError(
            f"{purpose} answers prompts, but a record has no prompt (plain text: every token is a label): use "
            "prompt/completion or chat records."
        )
    return list(ids[:first])


@torch.no_grad()
def generate_answers(
    model: nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int | None, max_new_tokens: int, **sampling
) -> list[list[int]]:
    """``model``'s answers to ``prompts`` (one left-padded batch, in eval mode), each cut after its first
    ``eos_id``; ``sampling``: further ``generate`` arguments (``do_sample``, ``temperature``, ``num_beams``)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        mask[row, width - len(prompt) :] = 1
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            **sampling,
        )[:, width:]
    finally:
        model.train(was_training)
    answers = []
    for tokens in out.tolist():
        cut = tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)
        answers.append(tokens[:cut])
    return answers


class LMCollator:
    """Right-pads ``input_ids`` with the tokenizer's pad token (its end-of-sequence token when it has none),
    ``labels`` with ``-100``; builds ``attention_mask``. Examples without ``labels`` learn every token."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(features), width, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(f["labels"] if f.get("labels") is not None else f["input_ids"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def lm_metrics(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[dict[str, torch.Tensor]],
    vocab_rows: int | None = None,
    chunk_tokens: int = 1024,
    prefix: str = "eval",
) -> dict[str, float]:
    """Held-out metrics on the tokens that have a (next-token) label, computed from both models' last hidden states
    ``chunk_tokens`` tokens at a time: ``{prefix}_perplexity`` and ``{prefix}_loss_nll`` of the student (its own
    cross-entropy, over its whole vocabulary); with a teacher, ``teacher_{prefix}_perplexity`` on the same tokens,
    ``{prefix}_kl_to_teacher`` (``KL(p_teacher || p_student)`` at temperature 1, per token, over the first
    ``vocab_rows`` rows of both vocabularies) and ``{prefix}_top1_agreement`` (the fraction of tokens whose most
    likely next token is the same); ``{prefix}_tokens`` counts them."""
    models = [("student", student)] + ([("teacher", teacher)] if teacher is not None else [])
    modes = [(model, model.training) for _, model in models]
    taps = {name: HeadTap(model.get_output_embeddings()) for name, model in models}
    for tap in taps.values():
        tap.register()
    for model, _ in modes:
        model.eval()
    sums = {"nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0.0}
    tokens = 0
    try:
        for batch in batches:
            device = next(student.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            hidden = {}
            for name, model in models:
                taps[name].arm()
                model(**inputs)
                hidden[name] = taps[name].take(name)
                taps[name].disarm()
            mask = next_token_mask(batch)
            targets = batch["labels"][:, 1:][mask]
            rows = {name: h[:, :-1][mask] for name, h in hidden.items()}
            tokens += targets.numel()
            for start in range(0, targets.numel(), chunk_tokens):
                part = slice(start, start + chunk_tokens)
                logits = {name: taps[name].head(rows[name][part]).float() for name in rows}
                sums["nll"] += F.cross_entropy(logits["student"], targets[part], reduction="sum").item()
                if teacher is None:
                    continue
                sums["teacher_nll"] += F.cross_entropy(logits["teacher"], targets[part], reduction="sum").item()
                s, t = logits["student"][:, :vocab_rows], logits["teacher"][:, :vocab_rows]
                log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
                sums["kl"] += (log_t.exp() * (log_t - log_s)).sum().item()
                sums["agree"] += (s.argmax(-1) == t.argmax(-1)).sum().item()
    finally:
        for tap in taps.values():
            tap.remove()
        for model, training in modes:
            model.train(training)
    if tokens == 0:
        raise ValueError("The evaluation data has no labelled tokens: nothing to measure perplexity on.")
    metrics = {
        f"{prefix}_loss_nll": sums["nll"] / tokens,
        f"{prefix}_perplexity": math.exp(sums["nll"] / tokens),
        f"{prefix}_tokens": tokens,
    }
    if teacher is not None:
        metrics[f"teacher_{prefix}_perplexity"] = math.exp(sums["teacher_nll"] / tokens)
        metrics[f"{prefix}_kl_to_teacher"] = sums["kl"] / tokens
        metrics[f"{prefix}_top1_agreement"] = sums["agree"] / tokens
    return metrics
