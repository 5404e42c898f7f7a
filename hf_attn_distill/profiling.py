"""Size and CPU-latency measurements of saved models, as reported by the demo and benchmarks."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .hardware import cpu_name

__all__ = ["folder_weights_mb", "machine_info", "measure_latency_ms"]


def folder_weights_mb(folder: str | Path) -> float:
    """Size on disk of the weight files (``*.safetensors``/``*.bin``) in a saved model folder, in MB."""
    files = [
        p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin"
    ]
    if not files:
        raise FileNotFoundError(f"No weight files in {folder}.")
    return sum(p.stat().st_size for p in files) / 1e6


@torch.inference_mode()
def measure_latency_ms(folder: str | Path, sentences: list[str], warmup: int = 5, max_length: int = 128) -> float:
    """Median wall time of one single-sentence forward pass (batch 1, CPU, float32) in milliseconds."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    encoded = [tokenizer(s, return_tensors="pt", truncation=True, max_length=max_length) for s in sentences]
    for enc in encoded[:warmup]:
        model(**enc)
    times = []
    for enc in encoded:
        start = time.perf_counter()
        model(**enc)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


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
