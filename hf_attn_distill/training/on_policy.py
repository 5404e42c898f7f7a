"""On-policy distillation of causal LMs (GKD, Agarwal et al. 2024): batches whose completions the student samples.

With ``lmbda > 0`` the trainer replaces that fraction of its training micro-batches, before their accumulation
window is counted, by :func:`on_policy_batch`: each row's prompt (everything before its first labelled token) with
a completion the student generates; the teacher then scores those tokens and only its terms train on them (the
batch carries :data:`~hf_attn_distill.terms.base.ON_POLICY_COLUMN`, so the hard-label loss skips it).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_attn_distill.tasks.lm import generate_answers, prompt_of
from hf_attn_distill.terms.base import ON_POLICY_COLUMN

__all__ = ["is_on_policy_step", "on_policy_batch", "prompts_of"]


def prompts_of(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt: its tokens (padding left out, on either side) before the first labelled one; a row without
    one is refused, naming the data on-policy distillation needs."""
    masks = batch["attention_mask"].bool().tolist() if "attention_mask" in batch else None
    prompts = []
    for row, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
        if masks is not None:
            ids = [t for t, keep in zip(ids, masks[row]) if keep]
            labels = [t for t, keep in zip(labels, masks[row]) if keep]
        prompts.append(prompt_of(ids, labels, "On-policy distillation (lmbda > 0)"))
    return prompts


def on_policy_batch(
    student,
    batch: dict[str, Any],
    max_new_tokens: int,
    temperature: float,
    pad_id: int,
    eos_id: int | None,
) -> dict[str, torch.Tensor]:
    """``batch`` with each row's completion replaced by one the student samples from its prompt (right-padded; the
    completion ends at the first ``eos_id``): ``input_ids``, ``attention_mask``, ``labels`` (the prompt masked)
    and the on-policy marker."""
    prompts = prompts_of(batch)
    device = batch["input_ids"].device
    answers = generate_answers(
        student, prompts, pad_id, eos_id, max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0
    )
    length = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens = torch.tensor(prompt + answer, device=device)
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        labels[row, len(prompt) : len(tokens)] = tokens[len(prompt) :]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        ON_POLICY_COLUMN: torch.ones(len(prompts), dtype=torch.bool, device=device),
    }


def is_on_policy_step(seed: int, step: int, micro_batch: int, lmbda: float) -> bool:
    """Whether micro-batch ``micro_batch`` of optimizer step ``step`` is on-policy: a draw of its own generator,
    seeded from ``seed`` and its position, so every process and every rerun make the same choice."""
    if lmbda <= 0:
        return False
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro_batch)
    return float(torch.rand((), generator=generator)) < lmbda
