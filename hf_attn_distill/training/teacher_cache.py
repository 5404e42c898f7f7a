"""Teacher logits computed once per training example and memory-mapped, for multi-epoch logit KD.

With ``attention_weight=0`` the teacher contributes only its logits, and in eval mode those are a
fixed function of the example. Computing them once and reading them back each epoch removes the
teacher forward from every later step. Rows are keyed by the example's position in the training
dataset (an index column the trainer adds), so shuffling and any batch size are fine.

:class:`TeacherLogitsCache` keeps one logit vector per example (sequence-level tasks);
:class:`TeacherTopKCache` keeps, for every position of every example of a causal LM, the ids of the teacher's
``k`` most likely next tokens and their log-probabilities at the training temperature (computed from the
teacher's hidden states a chunk of positions at a time, so its full logits never exist either).
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

__all__ = [
    "CACHE_INDEX_COLUMN",
    "complete_cache_meta",
    "TeacherLogitsCache",
    "TeacherTopKCache",
    "prepare_logits_cache",
    "weights_checksum",
]

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


def complete_cache_meta(folder: str | Path | None) -> dict | None:
    """What a finished teacher-output cache in ``folder`` records (its key), or ``None`` when there is none."""
    meta = Path(folder) / "meta.json" if folder else None
    if meta is None or not meta.exists():
        return None
    recorded = json.loads(meta.read_text())
    return recorded if recorded.get("complete") else None


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
                    f"{tuple(logits.shape)}: for a causal LM set teacher_logits_top_k (e.g. 64), other token-level tasks "
                    "must run without teacher_logits_cache."
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


class TeacherTopKCache:
    """Per-position top-k teacher outputs of token-level examples, memory-mapped: ``ids.npy`` ``[tokens, k]``
    (uint16 when the vocabulary fits, else int32), ``log_probs.npy`` ``[tokens, k]`` and ``offsets.npy``
    ``[examples + 1]`` (example ``i`` holds rows ``offsets[i]:offsets[i + 1]``, one per input position).

    Args:
        folder: where the arrays and ``meta.json`` live.
        key: identifies what was cached (teacher, dataset, ``k``, temperature); another key rebuilds it.
    """

    FILES = ("ids.npy", "log_probs.npy", "offsets.npy")

    def __init__(self, folder: str | Path, key: dict):
        self.folder = Path(folder)
        self.key = key
        self._arrays: tuple[np.ndarray, ...] | None = None

    @property
    def is_complete(self) -> bool:
        meta = self.folder / "meta.json"
        return meta.exists() and json.loads(meta.read_text()) == {**self.key, "complete": True}

    @property
    def bytes_per_token(self) -> int:
        ids, log_probs, _ = self._load()
        return ids.shape[1] * (ids.dtype.itemsize + log_probs.dtype.itemsize)

    def build(
        self,
        batches: Iterable[dict],
        forward: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
        lengths: list[int],
        k: int,
        vocab: int,
        dtype: str = "float16",
    ) -> None:
        """Fill the cache: ``forward(batch)`` returns ``(ids, log_probs)`` ``[B, T, k]`` for a right-padded batch
        whose ``CACHE_INDEX_COLUMN`` names its examples; ``lengths`` are every example's token count."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "meta.json").unlink(missing_ok=True)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        id_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
        ids = np.lib.format.open_memmap(self.folder / "ids.npy", mode="w+", dtype=id_dtype, shape=(total, k))
        log_probs = np.lib.format.open_memmap(
            self.folder / "log_probs.npy", mode="w+", dtype=_DTYPES[dtype], shape=(total, k)
        )
        filled = np.zeros(len(lengths), dtype=bool)
        for batch in tqdm(batches, desc="Teacher top-k cache", unit="batch"):
            top_ids, top_log_probs = forward(batch)
            for row, index in enumerate(batch[CACHE_INDEX_COLUMN].tolist()):
                start, end = offsets[index], offsets[index + 1]
                ids[start:end] = top_ids[row, : end - start].cpu().numpy().astype(id_dtype)
                log_probs[start:end] = top_log_probs[row, : end - start].float().cpu().numpy()
                filled[index] = True
        if not filled.all():
            raise ValueError(f"Teacher top-k cache covers {int(filled.sum())} of {len(lengths)} examples.")
        ids.flush()
        log_probs.flush()
        np.save(self.folder / "offsets.npy", offsets)
        (self.folder / "meta.json").write_text(json.dumps({**self.key, "complete": True}))
        self._arrays = None

    def _load(self) -> tuple[np.ndarray, ...]:
        if self._arrays is None:
            if not self.is_complete:
                raise RuntimeError(f"Teacher top-k cache in {self.folder} is missing or incomplete; build it first.")
            self._arrays = tuple(np.load(self.folder / name, mmap_mode="r") for name in self.FILES)
        return self._arrays

    def lookup(self, index: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, log_probs)`` ``[B, T, k]`` (long, float32; padding positions: id 0, log-probability 0)
        for the examples at ``index`` laid out as the batch's ``attention_mask`` ``[B, T]`` says: right padding,
        each example's length its cached length (anything else is refused: the rows would not line up)."""
        ids, log_probs, offsets = self._load()
        batch, width = attention_mask.shape
        k = ids.shape[1]
        out_ids = torch.zeros(batch, width, k, dtype=torch.long)
        out_log_probs = torch.zeros(batch, width, k)
        lengths = attention_mask.sum(-1).tolist()
        for row, example in enumerate(index.tolist()):
            start, end = int(offsets[example]), int(offsets[example + 1])
            n = end - start
            if n != lengths[row] or not bool(attention_mask[row, :n].all()):
                raise ValueError(
                    f"Example {example} has {n} cached positions but its batch row has {lengths[row]} tokens "
                    "or is not right-padded: a top-k cache needs the same "
                    "tokenization and right padding (padding_side='right') at build time and in training."
                )
            out_ids[row, :n] = torch.from_numpy(np.array(ids[start:end], dtype=np.int64))
            out_log_probs[row, :n] = torch.from_numpy(np.array(log_probs[start:end], dtype=np.float32))
        device = attention_mask.device
        return out_ids.to(device), out_log_probs.to(device)


class IndexCarryingCollator:
    """Wraps a data collator so that the cache index column reaches the batch whatever the collator keeps: the
    index is taken off each feature before ``collator`` sees it and put back as a ``[B]`` tensor."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if not features or CACHE_INDEX_COLUMN not in features[0]:
            return self.collator(features)
        index = torch.tensor([f[CACHE_INDEX_COLUMN] for f in features])
        batch = self.collator([{k: v for k, v in f.items() if k != CACHE_INDEX_COLUMN} for f in features])
        batch[CACHE_INDEX_COLUMN] = index
        return batch


def prepare_logits_cache(trainer) -> TeacherLogitsCache | TeacherTopKCache:
    """For a :class:`~hf_attn_distill.DistillTrainer` with ``teacher_logits_cache``: index its training set (an
    index column is added to ``trainer.train_dataset``), then compute the teacher's logits once on the main process
    (or reuse a matching cache) while the others wait."""
    import datasets

    dataset, args, teacher = trainer.train_dataset, trainer.args, trainer.teacher_model
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError("teacher_logits_cache needs train_dataset to be a datasets.Dataset (rows are keyed by index).")
    if teacher is None:
        return _cache_without_teacher(trainer, dataset)
    if "start_positions" in inspect.signature(teacher.forward).parameters:
        raise ValueError(
            "teacher_logits_cache stores one sequence-level `logits` vector per example; a question-answering "
            "teacher returns start/end logits per token. Drop teacher_logits_cache for QA."
        )
    key = {
        "teacher": str(getattr(teacher.config, "_name_or_path", "")),
        "teacher_weights_checksum": weights_checksum(teacher),
        "teacher_params": sum(p.numel() for p in {id(p): p for p in teacher.parameters()}.values()),
        "dataset_fingerprint": dataset._fingerprint,
        "num_examples": len(dataset),
        "dtype": args.teacher_logits_cache_dtype,
    }
    if CACHE_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(CACHE_INDEX_COLUMN, list(range(len(dataset))))
    trainer.train_dataset = dataset
    if not isinstance(trainer.data_collator, IndexCarryingCollator):
        trainer.data_collator = IndexCarryingCollator(trainer.data_collator)
    if args.teacher_logits_top_k > 0:
        return _prepare_top_k(trainer, dataset, key)
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


def _prepare_top_k(trainer, dataset, key: dict) -> TeacherTopKCache:
    """The top-k cache of a causal-LM teacher (built on the main process, reused when its key matches)."""
    from hf_attn_distill.terms.divergences import lm_chunk_rows
    from hf_attn_distill.terms.lm_head import HeadTap, is_causal_lm

    args, teacher = trainer.args, trainer.teacher_model
    if not is_causal_lm(teacher):
        raise ValueError(
            f"teacher_logits_top_k caches next-token outputs of causal LMs; {type(teacher).__name__} is not one. "
            "Set teacher_logits_top_k=0 (whole logit vectors, sequence-level tasks)."
        )
    head = teacher.get_output_embeddings()
    # a padded vocabulary (Qwen-style): the teacher's distribution over the tokenizer's rows only, as the dense
    # loss compares, so no cached id is a padding row and no padding mass enters the tail
    vocab = getattr(trainer, "vocab_rows", None) or head.out_features
    k = args.teacher_logits_top_k
    if k > vocab:
        raise ValueError(f"teacher_logits_top_k={k} is more than the teacher's {vocab} tokens.")
    key = {**key, "top_k": k, "temperature": args.temperature, "vocab": vocab}
    cache = TeacherTopKCache(args.teacher_logits_cache, key)
    if not cache.is_complete and trainer.is_world_process_zero():
        data = trainer._remove_unused_columns(dataset, description="teacher cache")
        lengths = [len(ids) for ids in dataset["input_ids"]]
        loader = torch.utils.data.DataLoader(
            data, batch_size=args.per_device_eval_batch_size, collate_fn=trainer.data_collator
        )
        tap = HeadTap(head)
        tap.register()
        rows = lm_chunk_rows(vocab)

        @torch.inference_mode()
        def forward(batch):
            inputs = {k_: v.to(args.device) for k_, v in batch.items() if k_ in trainer.teacher_input_names}
            tap.arm()
            teacher(**inputs)
            hidden = tap.take("teacher")
            tap.disarm()
            flat = hidden.reshape(-1, hidden.shape[-1])
            ids, log_probs = [], []
            for start in range(0, flat.shape[0], rows):
                logits = head(flat[start : start + rows])[:, :vocab].float() / args.temperature
                top = torch.log_softmax(logits, -1).topk(k, dim=-1)
                ids.append(top.indices)
                log_probs.append(top.values)
            shape = (*hidden.shape[:2], k)
            return torch.cat(ids).reshape(shape), torch.cat(log_probs).reshape(shape)

        try:
            cache.build(loader, forward, lengths, k, vocab, args.teacher_logits_cache_dtype)
        finally:
            tap.remove()
    trainer.accelerator.wait_for_everyone()
    return cache


def _cache_without_teacher(trainer, dataset) -> TeacherLogitsCache | TeacherTopKCache:
    """The cache a run without the teacher in memory reads: the one in ``teacher_logits_cache``, taken as its key
    says it was built (by a run with the teacher), once it is checked to hold this training set with these
    settings."""
    args = trainer.args
    meta = complete_cache_meta(args.teacher_logits_cache) or {}
    wanted = {
        "dataset_fingerprint": dataset._fingerprint,
        "num_examples": len(dataset),
        "dtype": args.teacher_logits_cache_dtype,
        **({"top_k": args.teacher_logits_top_k, "temperature": args.temperature} if args.teacher_logits_top_k else {}),
    }
    differ = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if differ:
        raise ValueError(
            f"The teacher-output cache in {args.teacher_logits_cache} was built for other data or settings "
            f"(recorded vs this run: {differ}); without the teacher it cannot be rebuilt: pass teacher_model to "
            "build it for this run."
        )
    if CACHE_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(CACHE_INDEX_COLUMN, list(range(len(dataset))))
    trainer.train_dataset = dataset
    if not isinstance(trainer.data_collator, IndexCarryingCollator):
        trainer.data_collator = IndexCarryingCollator(trainer.data_collator)
    key = {k: v for k, v in meta.items() if k != "complete"}
    return (
        TeacherTopKCache(args.teacher_logits_cache, key)
        if "top_k" in meta
        else TeacherLogitsCache(args.teacher_logits_cache, key)
    )
