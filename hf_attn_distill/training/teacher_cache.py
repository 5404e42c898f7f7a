"""Teacher logits computed once per training example and memory-mapped, for multi-epoch logit KD.

With ``attention_weight=0`` the teacher contributes only its logits, and in eval mode those are a
fixed function of the example. Computing them once and reading them back each epoch removes the
teacher forward from every later step. Rows are keyed by the example's position in the training
dataset (an index column the trainer adds), so shuffling and any batch size are fine.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from transformers.utils.logging import tqdm

__all__ = ["CACHE_INDEX_COLUMN", "TeacherLogitsCache", "prepare_logits_cache", "weights_checksum"]

CACHE_INDEX_COLUMN = "teacher_cache_index"
_DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes and bytes), part of cache keys."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherLogitsCache:
    """A ``[num_examples, num_classes]`` array of teacher logits in ``folder/logits.npy`` (memory-mapped).

    Args:
        folder: where ``logits.npy`` and ``meta.json`` live.
        key: identifies what was cached (teacher, dataset fingerprint); a cache with another key is
            rebuilt, never silently reused.
    """

    def __init__(self, folder: str | Path, key: dict):
        self.folder = Path(folder)
        self.key = key
        self._array: np.ndarray | None = None

    @property
    def is_complete(self) -> bool:
        meta = self.folder / "meta.json"
        return meta.exists() and json.loads(meta.read_text()) == {**self.key, "complete": True}

    def build(
        self,
        batches: Iterable[dict],
        forward: Callable[[dict], torch.Tensor],
        num_examples: int,
        dtype: str = "float16",
    ) -> None:
        """Fill the cache: ``forward(batch)`` returns ``[B, C]`` teacher logits; each batch carries
        ``CACHE_INDEX_COLUMN`` with the rows it covers."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "meta.json").unlink(missing_ok=True)
        array = None
        filled = np.zeros(num_examples, dtype=bool)
        for batch in tqdm(batches, desc="Teacher logits cache", unit="batch"):
            index = batch[CACHE_INDEX_COLUMN].cpu().numpy()
            logits = forward(batch)
            if logits.dim() != 2:
                raise ValueError(
                    f"The teacher-logit cache stores one logit vector per example, got logits of shape "
                    f"{tuple(logits.shape)}; token-level tasks must run without teacher_logits_cache."
                )
            if array is None:
                array = np.lib.format.open_memmap(
                    self.folder / "logits.npy", mode="w+", dtype=_DTYPES[dtype], shape=(num_examples, logits.shape[-1])
                )
            array[index] = logits.float().cpu().numpy()
            filled[index] = True
        if array is None or not filled.all():
            raise ValueError(f"Teacher-logit cache covers {int(filled.sum())} of {num_examples} examples.")
        array.flush()
        (self.folder / "meta.json").write_text(json.dumps({**self.key, "complete": True}))
        self._array = None

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """Teacher logits (float32) of the examples at ``index`` ``[B]``, on ``index``'s device."""
        if self._array is None:
            if not self.is_complete:
                raise RuntimeError(f"Teacher-logit cache in {self.folder} is missing or incomplete; build it first.")
            self._array = np.load(self.folder / "logits.npy", mmap_mode="r")
        rows = self._array[index.cpu().numpy()]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(index.device)


def prepare_logits_cache(trainer) -> TeacherLogitsCache:
    """For a :class:`~hf_attn_distill.DistillTrainer` with ``teacher_logits_cache``: index its training set (an
    index column is added to ``trainer.train_dataset``), then compute the teacher's logits once on the main process
    (or reuse a matching cache) while the others wait."""
    import datasets

    dataset, args, teacher = trainer.train_dataset, trainer.args, trainer.teacher_model
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError("teacher_logits_cache needs train_dataset to be a datasets.Dataset (rows are keyed by index).")
    if "start_positions" in inspect.signature(teacher.forward).parameters:
        raise ValueError(
            "teacher_logits_cache stores one sequence-level `logits` vector per example; a question-answering "
            "teacher returns start/end logits per token. Drop teacher_logits_cache for QA."
        )
    key = {
        "teacher": str(getattr(teacher.config, "_name_or_path", "")),
        "teacher_weights_checksum": weights_checksum(teacher),
        "dataset_fingerprint": dataset._fingerprint,
        "num_examples": len(dataset),
        "dtype": args.teacher_logits_cache_dtype,
    }
    if CACHE_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(CACHE_INDEX_COLUMN, list(range(len(dataset))))
    trainer.train_dataset = dataset
    cache = TeacherLogitsCache(args.teacher_logits_cache, key)
    if not cache.is_complete and trainer.is_world_process_zero():
        loader = torch.utils.data.DataLoader(
            trainer._remove_unused_columns(dataset, description="teacher cache"),
            batch_size=args.per_device_eval_batch_size,
            collate_fn=trainer.data_collator,
        )

        @torch.inference_mode()
        def forward(batch):
            inputs = {k: v.to(args.device) for k, v in batch.items() if k in trainer.teacher_input_names}
            return teacher(**inputs)["logits"]

        cache.build(loader, forward, len(dataset), args.teacher_logits_cache_dtype)
    trainer.accelerator.wait_for_everyone()
    return cache
