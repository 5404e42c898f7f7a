"""Per-term bookkeeping: what gradient accumulation divides by, and the item-weighted means that are logged.

Every objective averages over its own items (:meth:`~hf_attn_distill.terms.base.Objective.count`: examples,
label tokens, valid attention rows or entries, valid tokens). So that ``k`` micro-batches of ``n`` give the
update of one batch of ``k * n``, each micro-batch's mean is scaled by ``items / window items`` before
backward, the window items being summed over the whole accumulation window (and across processes) before its
first micro-batch runs. Logged values (``loss_kd``, ``eval_loss_attn_enc``, ...) are item-weighted means over
the logging window and over all processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hf_attn_distill.terms.base import Objective
from hf_attn_distill.terms.logit import LABEL_KEYS

__all__ = ["TermAccounting", "TermLoggingMixin"]


class TermAccounting:
    """Counts and sums of the terms of ``objectives``.

    Args:
        objectives: the trainer's objectives; their order fixes the layout of every count tensor.
        world_size: number of processes.
        sum_across_processes: ``tensor -> tensor`` summing over processes (called by every process, in the same
            order, whenever ``world_size > 1``).
    """

    def __init__(
        self,
        objectives: Sequence[Objective],
        world_size: int = 1,
        sum_across_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.names = [o.name for o in objectives]
        self._objectives = list(objectives)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.world_size = world_size
        self._sum = sum_across_processes
        self.window_items: torch.Tensor | None = None
        self._sums: dict[str, torch.Tensor | None] = {"train": None, "eval": None}

    def items(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Float ``[terms]``: how many items each term averages over in ``inputs``."""
        reference = next(v for v in inputs.values() if torch.is_tensor(v))
        return torch.stack([o.count(inputs).to(reference.device).float() for o in self._objectives])

    def start_window(self, batches: Sequence[Mapping[str, Any]], device: torch.device) -> None:
        """Sum the items of an accumulation window's micro-batches (over every process) before the first runs."""
        totals = torch.stack([self.items(b).to(device) for b in batches]).sum(0)
        if self.world_size > 1:
            totals = self._sum(totals)
        self.window_items = totals

    def end_window(self) -> None:
        """Forget the window (after training: later calls are single batches)."""
        self.window_items = None

    def scales(self, training: bool, items: torch.Tensor) -> torch.Tensor:
        """Per-term multipliers turning micro-batch means into this micro-batch's share of the window mean."""
        if not training or self.window_items is None:  # evaluation, or compute_loss outside the Trainer loop
            return torch.ones_like(items)
        # DDP averages gradients over processes; multiply back so the result is the global mean.
        return items / self.window_items.to(items.device) * self.world_size

    def scale_of(self, name: str, scales: torch.Tensor) -> torch.Tensor:
        return scales[self._index[name]]

    def add(self, mode: str, terms: Mapping[str, torch.Tensor], items: torch.Tensor) -> None:
        """Add one batch's terms (means over ``items``) to the ``mode`` (``"train"``/``"eval"``) sums."""
        rows = torch.zeros(len(self.names), 3, device=items.device)
        for name, value in terms.items():
            i = self._index[name]
            rows[i] = torch.stack([value.detach().float() * items[i], items[i], torch.ones((), device=items.device)])
        current = self._sums[mode]
        self._sums[mode] = rows if current is None else current + rows.to(current.device)

    def pop_means(self, mode: str, device: torch.device | None = None) -> dict[str, float]:
        """Item-weighted mean of each term added in ``mode`` since the last call, over all processes; resets.

        Every process enters the same cross-process sum, also one that added nothing (its rows are zeros), so a
        process with an empty logging or evaluation window cannot leave the others waiting."""
        rows = self._sums[mode]
        self._sums[mode] = None
        if rows is None:
            rows = torch.zeros(len(self.names), 3, device=device)
        if self.world_size > 1:
            rows = self._sum(rows)
        return {
            name: weighted / max(items, 1.0)
            for name, (weighted, items, seen) in zip(self.names, rows.tolist())
            if seen > 0
        }

    def reset(self, mode: str) -> None:
        self._sums[mode] = None


class TermLoggingMixin:
    """``Trainer`` overrides of :class:`~hf_attn_distill.DistillTrainer` that report each term: training logs get
    the terms averaged over their window (and the scheduled values), ``evaluate``/``predict`` get
    ``{prefix}_loss_*``, and unlabeled evaluation data (task-agnostic distillation) is scored by its transfer
    terms."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and getattr(self, "nonfinite", None) is not None:
            self.nonfinite.check()  # the host synchronises here anyway (the logged loss is read)
        if "loss" in logs:  # a training log: add the terms averaged over its window, and the scheduled values
            logs.update(self.accounting.pop_means("train", self.args.device))
            logs.update(self._scheduled_in_window)  # the values the logged window was trained with
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As ``Trainer``'s; on unlabeled data for a model without labels (task-agnostic distillation), the loss is
        the transfer terms, so ``evaluate()`` reports them instead of nothing."""
        if self.label_names or any(k in inputs for k in LABEL_KEYS):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """Adds ``{prefix}_loss_ce``, ``_loss_kd``, each site's ``_loss_attn_*``, ``_loss_hidden`` and
        ``_loss_relation`` (those that are on) to the metrics of ``evaluate`` and ``predict``."""
        self.accounting.reset("eval")
        with self.attached():
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
        for name, value in self.accounting.pop_means("eval", self.args.device).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output
