#!/usr/bin/env python
"""Does bf16 autocast pay on this machine? Times one linear layer of a MiniLM block (384 -> 1536), forward and
forward + backward, float32 vs bf16 autocast, at a few token counts, with 1 and 2 threads.

On CPUs with bf16 matrix instructions (AVX512-BF16, AMX: :func:`hf_attn_distill.utils.hardware.native_bf16`) bf16
autocast is the faster choice; without them the matmuls are emulated and it is many times slower, which is why the
quality benchmarks default to bf16 only where it is native. Writes ``benchmarks/results/bf16_check.json`` and
``.md``; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.quality.runs import write_results
from hf_attn_distill.utils.hardware import native_bf16
from hf_attn_distill.utils.profiling import machine_info

ROOT = Path(__file__).resolve().parents[2]


def time_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def measure(tokens: int, bf16: bool, backward: bool, repeats: int) -> float:
    torch.manual_seed(0)
    layer = torch.nn.Linear(384, 1536)
    x = torch.randn(tokens, 384, requires_grad=backward)

    def step():
        with torch.set_grad_enabled(backward), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        if backward:
            y.float().sum().backward()

    return time_ms(step, repeats)


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine'].split(';')[0]}; bf16 native: {result['native_bf16']}",
        "",
        "| threads | tokens | pass | fp32 ms | bf16 autocast ms | bf16 / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['threads']} | {r['tokens']} | {r['pass']} | {r['fp32_ms']:.2f} | {r['bf16_ms']:.2f} | "
            f"{r['bf16_ms'] / r['fp32_ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "bf16_check"))
    args = parser.parse_args(argv)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for tokens in args.tokens:
            for backward in (False, True):
                fp32, bf16 = (measure(tokens, b, backward, args.repeats) for b in (False, True))
                rows.append(
                    {
                        "threads": threads,
                        "tokens": tokens,
                        "pass": "forward + backward" if backward else "forward",
                        "fp32_ms": fp32,
                        "bf16_ms": bf16,
                    }
                )
    result = {"machine": machine_info(), "native_bf16": native_bf16("cpu"), "rows": rows}
    if args.results:
        write_results(Path(args.results), result, markdown)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
