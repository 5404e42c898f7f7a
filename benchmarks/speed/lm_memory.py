#!/usr/bin/env python
"""Memory and time of an LM logit-distillation loss at large vocabularies: full logits vs chunked from hidden states.

One forward + backward of the forward-KL term (T = 2) between a student and a teacher output head of a real width
(random weights), from their last hidden states ``[batch, tokens, hidden]``, each method in a fresh subprocess:

- ``naive``: both models' full ``[tokens, vocab]`` logits, then :func:`~hf_attn_distill.token_divergence`;
- ``token_kd``: the full logits, then the package's chunked :func:`~hf_attn_distill.terms.token_kd.token_kd_loss`
  (no float32 copies of them, but the logits themselves);
- ``chunked``: :func:`~hf_attn_distill.chunked_lm_divergence`, a chunk of tokens at a time through both heads,
  forward and backward: no ``[tokens, vocab]`` tensor;
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` (``jsd_beta=0``: forward KL) where it installs and runs (it is
  written in Triton; on a CPU it does not run, and the row says why);
- ``naive_ce_kd`` and ``chunked_ce_kd``: what the trainer computes for a causal LM, ``0.5 * CE + 0.5 * KD``, from the
  full logits, and fused a chunk at a time by :func:`~hf_attn_distill.terms.divergences.lm_head_losses` (one pass
  over the student's head for both terms).

Reported: the peak RSS above what was resident once the hidden states and heads existed (Linux VmHWM, reset first),
the median time of ``--repeats`` steps after one warm-up, and the loss (equal across methods). Defaults: 4 x 1,024
tokens, student width 896 and teacher width 1,536 (Qwen2.5-0.5B and -1.5B), vocabularies 32,000 and 152,064.
Writes ``benchmarks/results/lm_memory.json`` and ``.md``. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("naive", "token_kd", "chunked", "liger", "naive_ce_kd", "chunked_ce_kd")


def limit_address_space(allowance_mb: float | None = None) -> None:
    """Let this process grow by at most ``allowance_mb`` (default: 90% of the memory the machine has available now,
    Linux), so that a method that needs more fails with torch's "can't allocate memory" (its row says so) instead of
    the kernel's out-of-memory killer choosing a process, possibly another one."""
    import resource

    from benchmarks.speed.step import proc_status_mb

    if allowance_mb is None:
        try:
            with open("/proc/meminfo") as f:
                available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return
        allowance_mb = 0.9 * available_kb / 1024
    limit = int((proc_status_mb("VmSize") + allowance_mb) * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.speed.step import proc_status_mb, reset_peak_rss
    from hf_attn_distill import chunked_lm_divergence, token_divergence
    from hf_attn_distill.terms.divergences import LMHeadSettings, lm_head_losses
    from hf_attn_distill.terms.token_kd import token_kd_loss

    torch.manual_seed(0)
    tokens = spec["batch"] * spec["tokens"]
    s_head = torch.nn.Linear(spec["student_hidden"], spec["vocab"], bias=False)
    t_head = torch.nn.Linear(spec["teacher_hidden"], spec["vocab"], bias=False).requires_grad_(False)
    s_hidden = torch.randn(tokens, spec["student_hidden"], requires_grad=True)
    t_hidden = torch.randn(tokens, spec["teacher_hidden"])
    targets = torch.randint(0, spec["vocab"], (tokens,))
    method = spec["method"]
    chunk = spec.get("chunk_tokens", 0)
    if method == "liger":
        try:
            import liger_kernel.transformers as liger_transformers
        except ImportError as err:
            return {"skipped": f"liger-kernel is not installed ({err.name})"}
        # the module's name for it (liger-kernel 0.5-0.8: LigerFusedLinearJSD)
        liger_class = getattr(liger_transformers, "LigerFusedLinearJSD", None)
        if liger_class is None:
            return {"skipped": "this liger-kernel has no LigerFusedLinearJSD"}
        liger = liger_class(jsd_beta=0.0, temperature=2.0)

    def step() -> float:
        s_hidden.grad = None
        s_head.weight.grad = None
        if method == "chunked":
            loss = chunked_lm_divergence(
                s_hidden, s_head, t_hidden, t_head, None, "forward_kl", temperature=2.0, chunk_tokens=chunk
            )
        elif method == "chunked_ce_kd":
            settings = LMHeadSettings("forward_kl", 2.0, chunk_tokens=chunk, ce_weight=0.5, kd_weight=0.5)
            ce, kd = lm_head_losses(s_hidden, s_head, t_hidden, t_head, targets, settings)
            loss = (0.5 * ce + 0.5 * kd) / tokens
        elif method == "naive_ce_kd":
            s_logits, t_logits = s_head(s_hidden), t_head(t_hidden)
            kd = token_divergence(s_logits, t_logits, "forward_kl", temperature=2.0).mean() * 4.0
            loss = 0.5 * F.cross_entropy(s_logits.float(), targets) + 0.5 * kd
        elif method == "liger":
            # no labels: every row counts; its loss is not scaled by T², the other rows' is
            loss = liger(s_hidden, s_head.weight, t_hidden, t_head.weight, None) * 4.0
        else:
            s_logits, t_logits = s_head(s_hidden), t_head(t_hidden)
            if method == "naive":
                loss = token_divergence(s_logits, t_logits, "forward_kl", temperature=2.0).mean() * 4.0
            else:
                loss = token_kd_loss(s_logits[None], t_logits[None], 2.0, None)
        loss.backward()
        return loss.item()

    limit_address_space(spec.get("memory_allowance_mb"))  # the heads and hidden states exist: the step may grow
    try:
        reset_peak_rss()
        base = proc_status_mb("VmRSS")
        loss = step()
        peak = proc_status_mb("VmHWM") - base
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except Exception as err:  # Liger's Triton kernels on a CPU; more memory than the machine has
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        if method == "liger":
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions = f"liger-kernel {version('liger-kernel')} (triton {version('triton')})"
            except PackageNotFoundError:
                versions = "liger-kernel"
            why = f"{versions} installed, its kernel fails: {why}"
        return {"skipped": why}
    logits_mb = tokens * spec["vocab"] * 4 / 2**20
    return {"loss": loss, "peak_mb": peak, "step_s": statistics.median(times), "one_logits_tensor_mb": logits_mb}


def markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}",
        "",
        f"Forward KL (T = 2; `*_ce_kd`: 0.5 CE + 0.5 KL) forward + backward, {result['batch']} x {result['tokens']} tokens, student width "
        f"{result['student_hidden']}, teacher width {result['teacher_hidden']}; peak memory above the hidden states and "
        f"heads; median of {result['repeats']} steps after one.",
        "",
        "| vocab | method | loss | peak MB | one [tokens, vocab] float32 tensor (MB) | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['vocab']:,} | {r['method']} | not run: {r['skipped']} | | | |")
        else:
            lines.append(
                f"| {r['vocab']:,} | {r['method']} | {r['loss']:.6f} | {r['peak_mb']:.0f} | "
                f"{r['one_logits_tensor_mb']:.0f} | {r['step_s']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def summary_tables(result: dict) -> str:
    """The two tables benchmarks/README.md shows (peak MB, then seconds a step, per vocabulary and method, Liger
    left out: it says why in its row of the full table); a method that could not allocate its tensors reads "did
    not fit"."""
    methods = [m for m in METHODS if m != "liger"]
    by = {(r["vocab"], r["method"]): r for r in result["rows"]}
    vocabs = list(dict.fromkeys(r["vocab"] for r in result["rows"]))

    def cell(vocab, method, key, fmt):
        r = by.get((vocab, method))
        if r is None:
            return "-"
        if "skipped" in r:
            return "did not fit" if "allocate memory" in r["skipped"] and key == "peak_mb" else "-"
        return fmt(r[key])

    tokens = result["batch"] * result["tokens"]
    memory = [
        "| vocab | one `[tokens, vocab]` float32 tensor | " + " | ".join(f"`{m}`" for m in methods) + " |",
        "|---" * (len(methods) + 2) + "|",
    ]
    memory += [
        f"| {v:,} | {tokens * v * 4 / 2**20:,.0f} | "
        + " | ".join(cell(v, m, "peak_mb", lambda x: f"{x:,.0f}") for m in methods)
        + " |"
        for v in vocabs
    ]
    time = ["| vocab | " + " | ".join(f"`{m}` s" for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]
    time += [
        f"| {v:,} | " + " | ".join(cell(v, m, "step_s", lambda x: f"{x:.2f}") for m in methods) + " |" for v in vocabs
    ]
    return "\n".join(memory) + "\n\n" + "\n".join(time) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--student_hidden", type=int, default=896)
    parser.add_argument("--teacher_hidden", type=int, default=1536)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk_tokens", type=int, default=0, help="Rows per chunk of the chunked methods (0: the package's choice)."
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "lm_memory"))
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(worker(json.loads(args._worker))), flush=True)
        return {}
    from hf_attn_distill.utils.profiling import machine_info

    shape = {
        k: getattr(args, k) for k in ("batch", "tokens", "student_hidden", "teacher_hidden", "repeats", "chunk_tokens")
    }
    output = Path(args.output + ".json")
    machine = machine_info()
    measured = {}  # measured rows of an earlier run of this shape on this machine kind: not measured again
    if output.exists():
        earlier = json.loads(output.read_text())
        if earlier.get("machine") == machine and all(earlier.get(k) == v for k, v in shape.items()):
            measured = {(r["vocab"], r["method"]): r for r in earlier["rows"] if "loss" in r}
    rows = []
    for vocab in args.vocabs:
        for method in args.methods:
            spec = {"method": method, "vocab": vocab, **shape}
            if (vocab, method) in measured:  # a method that failed or was skipped is tried again
                rows.append(measured[vocab, method])
                print(f"{method} at {vocab:,}: kept from an earlier run", flush=True)
                continue
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.speed.lm_memory", "--_worker", json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is not None:
                rows.append({**spec, **json.loads(line[len("RESULT ") :])})
            else:  # the worker died: say how, and go on with the other methods
                killed = " (killed: out of memory on this machine)" if proc.returncode == -9 else ""
                tail = (proc.stderr.strip().splitlines() or [""])[-1][:160]
                rows.append(
                    {**spec, "skipped": f"the process exited with code {proc.returncode}{killed} {tail}".strip()}
                )
            print(rows[-1], flush=True)
            result = {"machine": machine, **shape, "rows": rows}
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=2) + "\n")
            Path(args.output + ".md").write_text(markdown(result))
    result = {"machine": machine, **shape, "rows": rows}
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
