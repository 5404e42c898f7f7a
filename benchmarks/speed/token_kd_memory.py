#!/usr/bin/env python
"""Peak memory of token-level logit KD at a translation vocabulary: reference formula vs chunked kernel.

Forward + backward of the KD term alone on ``[batch, target_len, vocab]`` float32 logits (the student's
with gradient), each method in a fresh subprocess; the peak RSS above what was resident once both logit
tensors existed (Linux VmHWM, reset first; CUDA: max allocated above the logits). Default shape: batch 16,
64 target tokens, 58,101 entries (the vocabulary of Marian opus-mt-de-en). Writes
``benchmarks/results/token_kd_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


METHODS = ("reference", "chunked")


def worker(spec: dict) -> dict:
    import torch

    from benchmarks.speed.step import proc_status_mb, reset_peak_rss
    from hf_attn_distill import logit_kd_loss
    from hf_attn_distill.terms.token_kd import token_kd_loss

    torch.manual_seed(0)
    shape = (spec["batch"], spec["target_len"], spec["vocab"])
    student = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(shape)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[:, shape[1] * 3 // 4 :] = False  # a quarter of the positions are padding
    reset_peak_rss()
    base = proc_status_mb("VmRSS")
    fn = logit_kd_loss if spec["method"] == "reference" else token_kd_loss
    loss = fn(student, teacher, 2.0, mask)
    loss.backward()
    peak = proc_status_mb("VmHWM")
    logits_mb = student.numel() * 4 / 2**20
    return {"loss": loss.item(), "peak_above_logits_mb": peak - base, "one_logits_tensor_mb": logits_mb}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--target_len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=58101)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "token_kd_memory"))
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(worker(json.loads(args._worker))), flush=True)
        return {}
    from hf_attn_distill.utils.profiling import machine_info

    rows = []
    for method in METHODS:
        spec = {"method": method, "batch": args.batch, "target_len": args.target_len, "vocab": args.vocab}
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.speed.token_kd_memory", "--_worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        rows.append({**spec, **json.loads(line[len("RESULT ") :])})
        print(rows[-1], flush=True)
    out = {
        "machine": machine_info(),
        "rows": rows,
        "same_loss": abs(rows[0]["loss"] - rows[1]["loss"]) <= 1e-5 * abs(rows[0]["loss"]),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"Machine: {out['machine']}",
        "",
        f"KD forward + backward on [{args.batch}, {args.target_len}, {args.vocab}] float32 logits "
        f"(one such tensor: {rows[0]['one_logits_tensor_mb']:.0f} MB), 3/4 of the tokens valid.",
        "",
        "| method | loss | peak memory above the logits (MB) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['loss']:.6f} | {r['peak_above_logits_mb']:.0f} |" for r in rows]
    Path(args.output + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
