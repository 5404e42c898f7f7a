"""Non-finite values (NaN, inf) stop a distillation run at the step they appear, naming where they came from.

Without this, a teacher whose outputs overflow (fp16 is the usual cause) trains the student into NaN weights while
``train()`` finishes "successfully": transformers leaves non-finite losses out of the logged ``loss`` (which then
reads 0) and still applies their gradients. :class:`NonFiniteWatch` flags, per source, whether the teacher's
outputs or a term of the loss were non-finite, and the first step at which they were. On CPU it raises at once
(reading a flag costs nothing there); on an accelerator the flags stay on the device and are read where the
``Trainer`` already synchronises, at each training log and when training ends, so no step waits for the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["NonFiniteError", "NonFiniteWatch"]


class NonFiniteError(FloatingPointError):
    """Training met NaN or inf; the message names the source, the step, the teacher's dtype and the fixes."""


class NonFiniteWatch:
    """Per-source flags of non-finite values seen in training steps.

    ``update(step, teacher_outputs, terms)`` checks every floating-point tensor the teacher returned (``teacher
    logits``, ``teacher hidden_states``, ...) and every loss term (``loss_kd``, ``loss_attn_enc``, ...);
    ``check()`` raises :class:`NonFiniteError` when any was flagged. ``immediate`` (default: when the tensors are on
    the CPU) checks inside ``update``; otherwise call ``check()`` where the host synchronises anyway."""

    def __init__(self, teacher_dtype: torch.dtype | None, immediate: bool | None = None):
        self.teacher_dtype = teacher_dtype
        self.immediate = immediate
        self._flags: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # source -> (seen, first step or -1)
        self._immediate = True

    def update(self, step: int, teacher_outputs: Mapping | None, terms: Mapping[str, torch.Tensor]) -> None:
        checked = [(f"teacher {key}", value) for key, value in _tensors(teacher_outputs)]
        checked += [(name, value) for name, value in terms.items() if torch.is_tensor(value)]
        device = None
        for source, value in checked:
            bad = ~torch.isfinite(value.detach()).all()
            seen, first = self._flags.get(source) or (torch.zeros_like(bad), torch.full_like(bad, -1, dtype=torch.long))
            first = torch.where(bad & (first < 0), torch.full_like(first, step), first)
            self._flags[source] = (seen | bad, first)
            device = bad.device
        self._immediate = self.immediate if self.immediate is not None else device is None or device.type == "cpu"
        if self._immediate:
            self.check()

    def check(self) -> None:
        """Raise :class:`NonFiniteError` when a source was flagged (this reads the flags: one synchronisation)."""
        if not self._flags:
            return
        sources = list(self._flags)
        seen = torch.stack([self._flags[s][0] for s in sources]).tolist()
        if not any(seen):
            return
        firsts = torch.stack([self._flags[s][1] for s in sources]).tolist()
        bad = {source: first for source, flagged, first in zip(sources, seen, firsts) if flagged}
        raise NonFiniteError(self.message(bad, deferred=not self._immediate))

    def reset(self) -> None:
        self._flags.clear()

    def message(self, bad: dict[str, int], deferred: bool = False) -> str:
        """What went non-finite, where first, and what to try; ``deferred``: found at a later synchronisation, so
        the steps since were applied."""
        step = min(bad.values())
        teacher = [s for s in bad if s.startswith("teacher ")]
        terms = [s for s in bad if not s.startswith("teacher ")]
        dtype = str(self.teacher_dtype).removeprefix("torch.") if self.teacher_dtype is not None else "?"
        if teacher:
            what = (
                f"the teacher's outputs ({', '.join(teacher)}; the teacher runs in {dtype})"
                + (f", and so {', '.join(terms)}" if terms else "")
                + ". Run the teacher in float32 or bfloat16 (teacher_dtype='float32' / 'bfloat16', or load it so): "
                "float16 activations overflow in many models. Check the teacher alone on this batch."
            )
        else:
            what = (
                f"{', '.join(terms)}, computed from the student's outputs (the teacher's were finite; it runs in "
                f"{dtype}). Lower the learning rate, clip gradients (max_grad_norm), train in float32 or bfloat16 "
                "rather than fp16, or lower the temperature."
            )
        applied = (
            "The steps since were applied: resume from a checkpoint saved before it."
            if deferred
            else "Nothing of that step was applied."
        )
        return (
            f"Non-finite values (NaN or inf) at step {step} in {what} {applied} To keep "
            "transformers' behaviour instead (training goes on; the logged loss shows nan), set nonfinite_check=False."
        )


def _tensors(outputs: Mapping | None):
    """``(key, tensor)`` of every floating-point tensor in ``outputs``, tuples (hidden states) included."""
    if outputs is None:
        return
    for key, value in outputs.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for item in values:
            if torch.is_tensor(item) and item.is_floating_point():
                yield key, item
