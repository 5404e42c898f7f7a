#!/usr/bin/env python
"""What the causal-LM modes cost on this machine: an off-policy logit-KD step, an on-policy (GKD, ``lmbda``) step
whose completions the student samples first, and sequence-level KD's one-off generation of the teacher's answers.

A Llama teacher of ``quality_lm``'s shape (``--layers`` layers, width ``--hidden``, 8 query / 2 key-value heads,
random weights: every answer runs to ``--new_tokens`` tokens) and its half-depth student (teacher layers 1, 3, 5 of 6),
``--records`` prompt/completion records of ``--prompt_tokens`` + ``--new_tokens`` random words over a
``--vocab``-word vocabulary, through ``hf-attn-distill lm``:

- ``off_policy``: forward KL + hard labels on the records (``lmbda=0``), the mean step time;
- ``on_policy``: ``lmbda=1``, every batch's completions sampled by the student (``--new_tokens`` tokens), scored
  by the teacher, the mean step time;
- ``seq_kd``: :func:`~hf_attn_distill.tasks.sequence_kd.sequence_kd_dataset`, the teacher's greedy answers to
  every record (paid once, then cached), seconds per record; its training steps cost what ``off_policy``'s do.

Writes ``benchmarks/results/lm_modes.json`` and ``.md``. Time it on a quiet machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[2]
MODES = ("off_policy", "on_policy", "seq_kd")


@dataclass
class LMModesArguments:
    layers: int = field(default=6, metadata={"help": "Teacher depth (the student has every other layer)."})
    hidden: int = field(default=256, metadata={"help": "Width of both models."})
    vocab: int = field(default=8192, metadata={"help": "Vocabulary (words) of tokenizer and models."})
    prompt_tokens: int = field(default=64, metadata={"help": "Prompt tokens per record."})
    new_tokens: int = field(default=64, metadata={"help": "Completion tokens (and tokens generated) per record."})
    batch_size: int = field(default=8, metadata={"help": "Records per step and per generation batch."})
    records: int = field(default=64, metadata={"help": "Records (seq_kd generates an answer to each)."})
    steps: int = field(default=8, metadata={"help": "Training steps timed per mode (after one warm-up)."})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": f"Any of {MODES}."})
    output: str = field(default=str(ROOT / "benchmarks" / "results" / "lm_modes"), metadata={"help": "Stem."})


def build(args: LMModesArguments, folder: Path) -> tuple[Path, Path]:
    """A word-level tokenizer and a random Llama teacher in ``folder/teacher``; ``folder/train.jsonl``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(args.vocab - 3)]
    backend = Tokenizer(
        models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}, "<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=args.prompt_tokens + args.new_tokens + 8, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    teacher = folder / "teacher"
    LlamaForCausalLM(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> str:
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    data = folder / "train.jsonl"
    rows = [{"prompt": text(args.prompt_tokens), "completion": text(args.new_tokens)} for _ in range(args.records)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return teacher, data


def student_layers(args: LMModesArguments) -> str:
    """The teacher layers the student keeps: every other one, from layer 1 (``1,3,5`` of 6)."""
    return ",".join(str(i) for i in range(1, args.layers, 2))


def step_seconds(args: LMModesArguments, teacher: Path, data: Path, out: Path, *extra: str) -> float:
    """Mean seconds of a training step of ``hf-attn-distill lm`` on the records after its first: the difference of
    the trainer's ``train_runtime`` over ``--steps + 1`` and over 1 step, divided by ``--steps``."""
    from hf_attn_distill.recipes import distill_lm

    def runtime(steps: int) -> float:
        argv = [
            "--teacher_model_name_or_path", str(teacher), "--student_teacher_layers", student_layers(args),
            "--train_file", str(data), "--block_size", str(args.prompt_tokens + args.new_tokens + 1),
            "--output_dir", str(out / str(steps)), "--do_train", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(args.batch_size), "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--print_summary", "false", "--layer_map", "none",
            "--divergence", "forward_kl", *extra,
        ]  # fmt: skip
        return distill_lm.main(argv)["train_runtime"]

    return (runtime(args.steps + 1) - runtime(1)) / args.steps


def seq_kd_seconds(args: LMModesArguments, teacher: Path, data: Path, cache: Path) -> float:
    """Wall seconds of :func:`sequence_kd_dataset` on the records (greedy, ``--new_tokens`` new tokens)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_distill.tasks.lm import completion_example
    from hf_attn_distill.tasks.sequence_kd import sequence_kd_dataset

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    block = args.prompt_tokens + args.new_tokens + 1
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list(
        [completion_example(r["prompt"], r["completion"], tokenizer, block) for r in rows]
    )
    start = time.perf_counter()
    sequence_kd_dataset(
        model, tokenizer, dataset, cache, num_beams=1, max_length=args.new_tokens, batch_size=args.batch_size
    )
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Machine: {result['machine']}",
        "",
        f"Llama teacher {s['layers']} x {s['hidden']} (8 / 2 heads), student its layers {student_layers(LMModesArguments(**{**s, 'output': ''}))}, vocabulary "
        f"{s['vocab']:,}; records of {s['prompt_tokens']} prompt + {s['new_tokens']} completion tokens, batch "
        f"{s['batch_size']}; mean of {s['steps']} steps after the first.",
        "",
        "| mode | cost | relative to an off-policy step |",
        "|---|---|---|",
    ]
    rows = result["rows"]
    base = rows.get("off_policy", {}).get("step_s")
    for mode, r in rows.items():
        if "step_s" in r:
            rel = f"{r['step_s'] / base:.2f}x" if base else "-"
            lines.append(f"| `{mode}` | {r['step_s']:.3f} s / step | {rel} |")
        else:
            per_batch = r["s_per_record"] * s["batch_size"]
            rel = f"{per_batch / base:.2f}x a step, per batch of records, once" if base else "-"
            lines.append(f"| `{mode}` (teacher's answers, once) | {r['s_per_record']:.3f} s / record | {rel} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(LMModesArguments).parse_args_into_dataclasses(argv)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        raise ValueError(f"Unknown modes {sorted(unknown)}; choose from {MODES}.")
    from hf_attn_distill.utils.profiling import machine_info

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher, data = build(args, folder)
        for mode in args.modes:
            if mode == "seq_kd":
                seconds = seq_kd_seconds(args, teacher, data, folder / "answers")
                rows[mode] = {"s_per_record": seconds / args.records, "records": args.records}
            else:
                extra = (
                    ["--lmbda", "1.0", "--on_policy_max_new_tokens", str(args.new_tokens)]
                    if mode == "on_policy"
                    else []
                )
                rows[mode] = {"step_s": step_seconds(args, teacher, data, folder / mode, *extra), "steps": args.steps}
            print(mode, rows[mode], flush=True)
    result = {"machine": machine_info(), "settings": asdict(args) | {"output": None}, "rows": rows}
    Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.output + ".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
