"""Size and CPU-latency measurements of saved models, as reported by the demo and benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_attn_distill.utils.hardware import cpu_name

__all__ = ["folder_weights_mb", "machine_info", "measure_forward_latency_ms", "measure_latency_ms"]


def folder_weights_mb(folder: str | Path) -> float:
    """Size on disk of the weight files (``*.safetensors``/``*.bin``) in a saved model folder, in MB."""
    files = [
        p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin"
    ]
    if not files:
        raise FileNotFoundError(f"No weight files in {folder}.")
    return sum(p.stat().st_size for p in files) / 1e6


@torch.inference_mode()
def measure_forward_latency_ms(
    model: torch.nn.Module, inputs: Mapping | list[Mapping], repeats: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one forward pass in milliseconds: ``model(**x)`` for each ``x`` of ``inputs`` (one
    dict is run ``repeats`` times), after ``warmup`` untimed passes over the first of them; the model is put in
    eval mode for the measurement, and CUDA is synchronised around each pass. The one latency timer of the package
    (model cards, the demo, the notebooks)."""
    batches = [inputs] * repeats if isinstance(inputs, Mapping) else list(inputs)  # a BatchEncoding is a Mapping
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    times = []
    try:
        for i, batch in enumerate(batches[:warmup] + batches):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(**batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= min(warmup, len(batches)):
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1e3


def measure_latency_ms(folder: str | Path, sentences: list[str], warmup: int = 5, max_length: int = 128) -> float:
    """Median wall time of one single-sentence forward pass (batch 1, float32) of the classifier saved in
    ``folder``, over ``sentences`` (:func:`measure_forward_latency_ms`), in milliseconds."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    encoded = [dict(tokenizer(s, return_tensors="pt", truncation=True, max_length=max_length)) for s in sentences]
    return measure_forward_latency_ms(model, encoded, warmup=warmup)


def machine_info() -> str:
    """One line naming the hardware and software a measurement ran on."""
    import os
    import platform

    import transformers

    if torch.cuda.is_available():
        device = f"CUDA {torch.cuda.get_device_name(0)}"
    else:
        device = f"CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{device}; torch {torch.__version__}; transformers {transformers.__version__}; Python {platform.python_version()}"
