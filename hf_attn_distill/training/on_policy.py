"""On-policy distillation of causal LMs (GKD, Agarwal et al. 2024): batches whose completions the student samples.

With ``lmbda > 0`` the trainer replaces that fraction of its training micro-batches, before their accumulation
window is counted, by :func:`on_policy_batch`: each row's prompt (everything before its first labelled token) with
a completion the student generates; the teacher then scores those tokens and only its terms train on them (the
batch carries :data:`~hf_attn_distill.terms.base.ON_POLICY_COLUMN`, so the hard-label loss skips it).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_attn_distill.terms.base import ON_POLICY_COLUMN

__all__ = ["is_on_policy_step", "on_policy_batch", "prompts_of"]


def prompts_of(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first labelled next token (``labels != -100``); a row without a
    prompt (plain text: every token is a label) is refused, naming the data it needs."""
    ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
    prompts = []
    for row in range(ids.shape[0]):
        labelled = (labels[row] != -100).nonzero()
        first = int(labelled[0]) if len(labelled) else int(mask[row].sum()) if mask is not None else ids.shape[1]
        if first == 0:
            raise ValueError(
                "On-policy distillation (lmbda > 0) samples completions of prompts, but a batch row has no prompt "
                "(its first token is already a label: plain text). Use prompt/completion or chat records, or lmbda=0."
            )
        prompts.append(ids[row, :first].tolist())
    return prompts


@torch.no_grad()
def on_policy_batch(
    student,
    batch: dict[str, Any],
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_id: int | None,
) -> dict[str, torch.Tensor]:
    """``batch`` with each row's completion replaced by one the student samples from its prompt (left-padded for
    generation, right-padded again after; the completion ends at the first ``eos_id``): ``input_ids``,
    ``attention_mask``, ``labels`` (the prompt masked) and the on-policy marker."""
    prompts = prompts_of(batch)
    device = batch["input_ids"].device
    width = max(len(p) for p in prompts)
    left = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    left_mask = torch.zeros_like(left)
    for row, prompt in enumerate(prompts):
        left[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        left_mask[row, width - len(prompt) :] = 1
    was_training = student.training
    student.eval()
    try:
        generated = student.generate(
            input_ids=left,
            attention_mask=left_mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )[:, width:]
    finally:
        student.train(was_training)
    rows = []
    for prompt, completion in zip(prompts, generated.tolist()):
        kept = []
        for token in completion:
            kept.append(token)
            if token == eos_id:
                break
        rows.append((prompt, kept))
    length = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, completion) in enumerate(rows):
        tokens = torch.tensor(prompt + completion, device=device)
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        labels[row, len(prompt) : len(tokens)] = tokens[len(prompt) :]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        ON_POLICY_COLUMN: torch.ones(len(rows), dtype=torch.bool, device=device),
    }


def is_on_policy_step(seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """Whether micro-batch ``micro_batch`` of optimizer step ``step`` is on-policy: a draw of its own generator,
    seeded from ``seed`` and its position, so every process and every rerun make the same choice."""
    if lmbda <= 0:
        return False
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro_batch)
    return float(torch.rand((), generator=generator)) < lmbda
