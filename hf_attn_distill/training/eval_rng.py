"""Evaluation during training that leaves the training run as it was.

Each pass over an evaluation ``DataLoader`` draws its worker seed from torch's global generator, and a generating
evaluation may sample: a run that evaluates every ``eval_steps`` therefore draws different dropout masks and data
orders afterwards than the same run without evaluations, so adding a learning curve changed the result it
measured. :class:`RNGPreservingEvaluationMixin` restores every generator training reads (torch's CPU and
initialised CUDA generators, Python's ``random``, NumPy's global state) after ``evaluate``: a run with evaluations
trains exactly as the run without them (tested).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["RNGPreservingEvaluationMixin", "preserved_rng_states"]


@contextlib.contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Restore torch's CPU generator, every initialised CUDA generator, Python's ``random`` and NumPy's global state
    to what they were on entry, whatever the block drew."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    py, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(np_state)


class RNGPreservingEvaluationMixin:
    """A ``Trainer`` mixin: ``evaluate`` (also the periodic one of ``eval_strategy="steps"``) leaves the random
    generators as it found them, so evaluating during training does not change what training does next."""

    def evaluate(self, *args, **kwargs):
        with preserved_rng_states():
            return super().evaluate(*args, **kwargs)
