"""Checkpoints of a distillation run: which ones are complete, and whether one fits the student."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_attn_distill.terms.hidden import PROJECTION_NAME

__all__ = [
    "TRAINER_STATE_NAME",
    "CheckpointMixin",
    "DiskFullError",
    "SaveGuardMixin",
    "disk_space_guard",
    "check_checkpoint_fits",
    "checkpoint_is_complete",
    "last_complete_checkpoint",
    "resolve_resume",
]

logger = logging.getLogger(__name__)
TRAINER_STATE_NAME = "trainer_state.json"


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """A checkpoint is complete once its ``trainer_state.json``, written last by ``Trainer``, parses."""
    try:
        json.loads((Path(folder) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` whose save finished; a save killed midway is skipped."""
    folders = [
        p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()
    ]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if checkpoint_is_complete(folder):
            return str(folder)
        logger.warning("Skipping %s: its save did not finish (no readable %s).", folder, TRAINER_STATE_NAME)
    return None


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """What ``resume_from_checkpoint`` means: ``True`` (or ``"true"``, as the command line passes it) is the last
    *complete* checkpoint of ``output_dir``; ``"false"``/``None`` is a fresh start; a folder must be complete.
    Raises ``ValueError`` naming the fix otherwise."""
    if isinstance(value, str) and value.lower() in ("true", "false") and not Path(value).is_dir():
        value = value.lower() == "true" or None
    if value is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"No complete checkpoint in {output_dir} to resume from.")
        return found
    if isinstance(value, str) and not checkpoint_is_complete(value):
        raise ValueError(
            f"Checkpoint {value} is incomplete (its save was interrupted: no readable trainer_state.json); resume "
            "from an earlier checkpoint, or with resume_from_checkpoint=True to pick the last complete one."
        )
    return value or None


def _checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes stored in a checkpoint's safetensors files, or ``None`` when it holds none."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        if not (folder / name).exists():
            return None
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_checkpoint_fits(folder: str | os.PathLike, model: nn.Module) -> None:
    """Raise ``ValueError`` when the checkpoint in ``folder`` holds a model of another shape than ``model``
    (parameters missing, extra or of other sizes); checkpoints without safetensors weights are not checked."""
    stored = _checkpoint_shapes(Path(folder))
    if stored is None:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in stored and not _tied(model, k))
    extra = sorted(k for k in stored if k not in expected)
    resized = sorted(k for k in stored if k in expected and stored[k] != expected[k])
    if missing or extra or resized:
        detail = "; ".join(
            f"{what}: {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", extra), ("other shape", resized))
            if keys
        )
        raise ValueError(
            f"Checkpoint {folder} holds a student of another shape than this trainer's ({type(model).__name__}, "
            f"{sum(p.numel() for p in model.parameters())} parameters; {detail}): resume with the same student "
            "configuration, or start a new run (resume_from_checkpoint=None)."
        )


def _tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is a tied weight that safetensors checkpoints store once under another name."""
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    names = tied.keys() if isinstance(tied, dict) else tied
    return any(key == name or key.endswith(name) for name in names)


class CheckpointMixin:
    """``Trainer`` overrides of :class:`~hf_attn_distill.DistillTrainer` for checkpoints and export: a resumed
    checkpoint must fit the student (:func:`check_checkpoint_fits`); checkpoints keep the hidden-state projection
    (for resume), the exported student does not."""

    _saving_checkpoint = False

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        check_checkpoint_fits(resume_from_checkpoint, self.accelerator.unwrap_model(model or self.model))
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self._saving_checkpoint = True  # checkpoints keep the hidden-state projection, for resume
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the student as a plain ``from_pretrained`` model: the hidden-state projection, if attached, stays
        out of the export (only checkpoints keep it)."""
        student = self.accelerator.unwrap_model(self.model)
        if getattr(student, PROJECTION_NAME, None) is not None and not self._saving_checkpoint:
            state_dict = student.state_dict() if state_dict is None else state_dict
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f"{PROJECTION_NAME}.")}
        super()._save(output_dir, state_dict)


class DiskFullError(OSError):
    """A checkpoint or model save that ran out of disk space (``errno.ENOSPC``); the message names the folder, the
    free space left, the size the save needed and what to do."""


#: What savers say when the disk fills: the OS error, torch's zip writer (``torch.save``), safetensors' writer.
_OUT_OF_SPACE = ("no space left", "unexpected pos", "file write failed", "os error 28", "code: 28")


def _out_of_space(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(err).lower() for text in _OUT_OF_SPACE):
            return True
        err = err.__cause__ or err.__context__
    return False


def _free_bytes(folder: Path) -> int:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


@contextlib.contextmanager
def disk_space_guard(folder: str | os.PathLike, needed_bytes: Callable[[], int], checkpoint: bool) -> Iterator[None]:
    """Re-raise a save into ``folder`` that ran out of disk space as :class:`DiskFullError` (torch says only
    ``[enforce fail at inline_container.cc] unexpected pos``), naming the folder, the free space of its filesystem,
    ``needed_bytes()`` (what the save writes) and the fixes. A ``checkpoint`` folder left half-written is renamed
    ``<folder>-partial``, which resuming never picks; other errors pass through unchanged."""
    folder = Path(folder)
    try:
        yield
    except Exception as err:
        if not _out_of_space(err):
            raise
        partial = ""
        if checkpoint and folder.exists() and not checkpoint_is_complete(folder):
            target = folder.with_name(f"{folder.name}-partial")
            shutil.rmtree(target, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.rename(target)
                partial = f" The half-written checkpoint is now {target} (resuming skips it; delete it to free space)."
        what = "checkpoint" if checkpoint else "model"
        raise DiskFullError(
            errno.ENOSPC,
            f"The disk filled while saving the {what} to {folder}: {_mb(_free_bytes(folder))} free on its "
            f"filesystem, the save needed about {_mb(needed_bytes())}.{partial} Free space there, keep fewer "
            "checkpoints (save_total_limit), or use another output_dir; then resume with "
            "resume_from_checkpoint=True (the last complete checkpoint). "
            f"[{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}]",
        ) from err


def _tensor_bytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class SaveGuardMixin:
    """A ``Trainer`` mixin: checkpoint and model saves that run out of disk space raise :class:`DiskFullError`
    (:func:`disk_space_guard`) instead of torch's internal error."""

    def _save_bytes(self, checkpoint: bool) -> int:
        model = self.accelerator.unwrap_model(self.model)
        needed = _tensor_bytes(model.state_dict().values())
        optimizer = getattr(self, "optimizer", None)
        if checkpoint and optimizer is not None:
            needed += sum(_tensor_bytes(state.values()) for state in optimizer.state_dict()["state"].values())
        return needed

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with disk_space_guard(folder, lambda: self._save_bytes(checkpoint=True), checkpoint=True):
            super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        folder = output_dir if output_dir is not None else self.args.output_dir
        with disk_space_guard(folder, lambda: self._save_bytes(checkpoint=False), checkpoint=False):
            super().save_model(output_dir, _internal_call)
