"""The causal-LM recipe (``hf-attn-distill lm``) end to end on a tiny Llama with grouped-query attention: packed
text, prompt/completion and chat records with their masks, held-out metrics against the full logits, the card, and
bad input refused naming the fix."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_attn_distill.recipes import distill_lm
from hf_attn_distill.tasks.lm import LMCollator, chat_example, completion_example, lm_format, lm_metrics, pack_texts

WORDS = [f"w{i}" for i in range(60)]
CHAT = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def word_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "user": 3, "assistant": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT
    return tokenizer


def sentences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[i] for i in torch.randint(0, 60, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def lm_teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=72,  # padded past the tokenizer's 65 tokens, as large LMs pad theirs
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    folder = tmp_path_factory.mktemp("lm_teacher")
    LlamaForCausalLM(config).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_data")
    (folder / "train.txt").write_text("\n".join(sentences(40, 1)) + "\n")
    (folder / "val.txt").write_text("\n".join(sentences(10, 2)) + "\n")
    return folder


def run_args(teacher, folder, out, *extra):
    return [
        "--teacher_model_name_or_path", teacher, "--student_teacher_layers", "1,3",
        "--train_file", str(folder / "train.txt"), "--validation_file", str(folder / "val.txt"),
        "--block_size", "16", "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--learning_rate", "1e-3",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true",
        "--lm_chunk_tokens", "5", *extra,
    ]  # fmt: skip


def full_logit_metrics(student, teacher, blocks, rows):
    """The held-out metrics from full logits, one block at a time."""
    nll = t_nll = kl = agree = count = 0.0
    with torch.no_grad():
        for ids in blocks:
            x = torch.tensor([ids])
            s, t = student(x).logits[0, :-1].float(), teacher(x).logits[0, :-1].float()
            y = x[0, 1:]
            nll += F.cross_entropy(s, y, reduction="sum").item()
            t_nll += F.cross_entropy(t, y, reduction="sum").item()
            log_s, log_t = F.log_softmax(s[:, :rows], -1), F.log_softmax(t[:, :rows], -1)
            kl += (log_t.exp() * (log_t - log_s)).sum().item()
            agree += (s[:, :rows].argmax(-1) == t[:, :rows].argmax(-1)).sum().item()
            count += len(ids) - 1
    return math.exp(nll / count), math.exp(t_nll / count), kl / count, agree / count, count


def test_the_recipe_distills_packed_text_and_reports_what_the_full_logits_give(lm_teacher_dir, text_files, tmp_path):
    out = tmp_path / "student"
    metrics = distill_lm.main(run_args(lm_teacher_dir, text_files, out, "--divergence", "jsd", "--jsd_beta", "0.3"))
    saved = json.loads((out / "eval_results.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    teacher = AutoModelForCausalLM.from_pretrained(lm_teacher_dir).eval()
    assert student.config.num_hidden_layers == 2 and student.config.num_key_value_heads == 2
    tokenizer = word_tokenizer()
    blocks = pack_texts((text_files / "val.txt").read_text().splitlines(), tokenizer, 16)
    # both embeddings have the same 72 rows: KD and its KL compare all of them, as the trainer does
    ppl, t_ppl, kl, agree, count = full_logit_metrics(student, teacher, blocks, 72)
    assert saved["eval_tokens"] == count
    assert saved["eval_perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert saved["teacher_eval_perplexity"] == pytest.approx(t_ppl, rel=1e-5)
    assert saved["eval_kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    assert saved["eval_top1_agreement"] == pytest.approx(agree)
    assert metrics["eval_perplexity"] == saved["eval_perplexity"] and "eval_loss_kd" in saved
    card = (out / "README.md").read_text()
    assert "divergence" in card and "jsd" in card
    assert str(tmp_path) not in card and "text-generation" in card
    from huggingface_hub import ModelCard

    (result,) = ModelCard.load(out / "README.md", ignore_metadata_errors=False).data.eval_results  # the model-index
    assert (result.task_type, result.metric_type) == ("text-generation", "perplexity")
    assert result.metric_value == pytest.approx(saved["eval_perplexity"], rel=1e-4)
    # the saved student, given as --student_model_name_or_path, evaluates to the same numbers
    again = run_args(lm_teacher_dir, text_files, tmp_path / "again")
    again[again.index("--student_teacher_layers") : again.index("--student_teacher_layers") + 2] = [
        "--student_model_name_or_path",
        str(out),
    ]
    again.remove("--do_train")
    reloaded = distill_lm.main(again)
    for key in ("eval_perplexity", "teacher_eval_perplexity", "eval_kl_to_teacher", "eval_top1_agreement"):
        assert reloaded[key] == pytest.approx(saved[key], rel=1e-6), key


def test_prompt_completion_and_chat_records_learn_only_the_answers():
    tokenizer = word_tokenizer()
    ids = tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"]
    done = completion_example("w1 w2", "w3", tokenizer, 16)
    assert done == {"input_ids": [*ids, 1], "labels": [-100, -100, ids[2], 1]}
    assert completion_example("w1 w2", "w3", tokenizer, 2)["labels"] == [-100, -100]  # cut off: nothing to learn
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    chat = chat_example(messages, tokenizer, 16)
    rendered = tokenizer("user w1 w2 <eos> assistant w3 <eos>", add_special_tokens=False)["input_ids"]
    assert chat["input_ids"] == rendered
    assert chat["labels"] == [-100] * 5 + rendered[5:]  # the user turn and the assistant header are masked
    assert [lm_format(c) for c in (["text"], ["prompt", "completion"], ["messages", "id"])] == [
        "text",
        "prompt_completion",
        "messages",
    ]
    with pytest.raises(ValueError, match="needs a 'text' column"):
        lm_format(["sentence"])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_example(messages, tokenizer, 16)


def test_masked_tokens_do_not_count_in_the_metrics(lm_teacher_dir):
    """lm_metrics on prompt/completion examples: the mean over the completion tokens only, as the full logits give."""
    tokenizer = word_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(lm_teacher_dir).eval()
    examples = [
        completion_example("w1 w2 w3", "w4 w5", tokenizer, 16),
        completion_example("w9", "w8 w7 w6", tokenizer, 16),
    ]
    batch = LMCollator(tokenizer)(examples)
    got = lm_metrics(model, None, [batch], chunk_tokens=2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    want = F.cross_entropy(logits[keep], labels[keep])
    assert got["eval_tokens"] == int(keep.sum()) == 3 + 4
    assert got["eval_perplexity"] == pytest.approx(math.exp(want.item()), rel=1e-5)


@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
def test_jsonl_records_train_through_the_recipe(kind, lm_teacher_dir, tmp_path):
    """Records through the recipe: the held-out tokens are the completions / assistant turns only."""
    pairs = list(zip(sentences(12, 3), sentences(12, 4)))
    if kind == "prompt_completion":
        rows = [{"prompt": p, "completion": c} for p, c in pairs]
    else:
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in pairs]
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = run_args(lm_teacher_dir, tmp_path, tmp_path / "out")
    args[args.index("--train_file") + 1] = str(tmp_path / "train.jsonl")
    args[args.index("--validation_file") + 1] = str(tmp_path / "val.jsonl")
    metrics = distill_lm.main([*args, "--block_size", "40"])
    tokenizer = word_tokenizer()
    if kind == "prompt_completion":
        examples = [completion_example(r["prompt"], r["completion"], tokenizer, 40) for r in rows]
    else:
        examples = [chat_example(r["messages"], tokenizer, 40) for r in rows]
    answers = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in pairs]  # + <eos>
    counted = [sum(1 for y in e["labels"][1:] if y != -100) for e in examples]
    assert counted == answers  # nothing of the prompts, every answer token and its end
    assert metrics["eval_tokens"] == sum(answers)


def test_bad_input_is_refused_naming_the_fix(lm_teacher_dir, text_files, tmp_path):
    with pytest.raises(ValueError, match="--block_size"):
        distill_lm.main(run_args(lm_teacher_dir, text_files, tmp_path / "a", "--block_size", "100"))
    short = run_args(lm_teacher_dir, text_files, tmp_path / "a2")  # a student with fewer positions than the teacher
    short[short.index("--student_teacher_layers") : short.index("--student_teacher_layers") + 2] = [
        "--student_config_overrides",
        "num_hidden_layers=2,max_position_embeddings=8",
    ]
    with pytest.raises(ValueError, match="LlamaForCausalLM has only 8 positions.*--block_size"):
        distill_lm.main(short)
    long_prompts = [{"prompt": " ".join(WORDS[:20]), "completion": "w1"}] * 3
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in long_prompts) + "\n")
    args = run_args(lm_teacher_dir, text_files, tmp_path / "b")
    args[args.index("--train_file") + 1] = str(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="no token to learn.*Raise --block_size"):
        distill_lm.main(args)
    with pytest.raises(ValueError, match="jsd_beta must be in"):
        distill_lm.main(run_args(lm_teacher_dir, text_files, tmp_path / "c", "--jsd_beta", "1.5"))
    with pytest.raises(ValueError, match="has no prompt.*prompt/completion or chat records"):
        distill_lm.main(run_args(lm_teacher_dir, text_files, tmp_path / "d", "--lmbda", "1.0"))
    with pytest.raises(
        ValueError, match="Sequence-level KD answers prompts, but a record has no prompt.*use prompt/completion"
    ):
        distill_lm.main(run_args(lm_teacher_dir, text_files, tmp_path / "e", "--sequence_kd"))
    for flags, message in (
        (["--lmbda", "1.5"], "must be in \\[0, 1\\]"),
        (["--lmbda", "0.5", "--alpha_kd", "0"], "set alpha_kd > 0"),
        (["--lmbda", "0.5", "--teacher_logits_cache", "c", "--layer_map", "none"], "drop teacher_logits_cache"),
    ):
        with pytest.raises(ValueError, match=message):
            distill_lm.main(run_args(lm_teacher_dir, text_files, tmp_path / "f", *flags))


def test_on_policy_batches_are_the_students_own_answers_and_train_on_kd_alone(lm_teacher_dir, tmp_path, monkeypatch):
    """lmbda=1: every batch's completions are sampled from the student (at a temperature near 0: its greedy
    answers), the hard-label loss is absent and loss_kd is the KL on those answers."""
    from hf_attn_distill.training import on_policy

    rows = [{"prompt": p, "completion": c} for p, c in zip(sentences(8, 5), sentences(8, 6))]
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    made = []
    original = on_policy.on_policy_batch

    def record(student, batch, *args):
        out = original(student, batch, *args)
        with torch.no_grad():
            greedy = student.generate(
                input_ids=batch["input_ids"][:1, : int((batch["labels"][0] != -100).nonzero()[0])],
                do_sample=False,
                max_new_tokens=args[0],
                pad_token_id=args[2],
                eos_token_id=args[3],
            )
        made.append((out, greedy, {k: v.clone() for k, v in student.state_dict().items()}))
        return out

    monkeypatch.setattr("hf_attn_distill.trainer.on_policy_batch", record)
    args = run_args(lm_teacher_dir, tmp_path, tmp_path / "out", "--lmbda", "1.0", "--on_policy_temperature", "1e-4")
    args[args.index("--train_file") + 1] = str(tmp_path / "train.jsonl")
    args[args.index("--validation_file") + 1] = str(tmp_path / "val.jsonl")
    args[args.index("--max_steps") + 1] = "1"
    args += ["--logging_steps", "1", "--block_size", "40", "--on_policy_max_new_tokens", "6", "--do_eval", "false"]
    distill_lm.main(args)
    (batch, greedy, weights), *_ = made
    assert batch["on_policy"].all()
    prompt = int((batch["labels"][0] != -100).nonzero()[0])
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert first == greedy[0].tolist()[: len(first)]  # the student's own (greedy) answer, cut at <eos>
    assert (batch["labels"][0, :prompt] == -100).all() and len(first) - prompt <= 6
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    log = next(e for e in state["log_history"] if "loss_kd" in e)
    assert "loss_ce" not in log
    student = AutoModelForCausalLM.from_pretrained(lm_teacher_dir)
    from hf_attn_distill import student_from_teacher_layers

    student = student_from_teacher_layers(student, [1, 3])
    student.load_state_dict(weights)
    teacher = AutoModelForCausalLM.from_pretrained(lm_teacher_dir)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    keep = batch["labels"][:, 1:] != -100
    from hf_attn_distill import token_divergence

    want = token_divergence(s[keep], t[keep], "forward_kl", 2.0).mean() * 4
    # a KL of near-identical models (~1e-3) through the streamed attention path: float32 rounding is absolute
    assert log["loss_kd"] == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_sequence_kd_trains_on_the_teachers_greedy_answers(lm_teacher_dir, tmp_path):
    rows = [{"prompt": p, "completion": c} for p, c in zip(sentences(6, 7), sentences(6, 8))]
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = run_args(lm_teacher_dir, tmp_path, tmp_path / "out", "--sequence_kd", "--sequence_kd_max_new_tokens", "5")
    args[args.index("--train_file") + 1] = str(tmp_path / "train.jsonl")
    args[args.index("--validation_file") + 1] = str(tmp_path / "val.jsonl")
    distill_lm.main([*args, "--block_size", "40"])
    import gzip

    answers = json.loads(gzip.decompress((tmp_path / "out" / "teacher_answers" / "translations.json.gz").read_bytes()))
    teacher = AutoModelForCausalLM.from_pretrained(lm_teacher_dir).eval()
    tokenizer = word_tokenizer()
    for row, answer in zip(rows, answers):
        prompt = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            greedy = teacher.generate(prompt, do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=1)
        want = greedy[0, prompt.shape[1] :].tolist()
        want = want[: want.index(1) + 1] if 1 in want else want
        assert answer == want
    card = (tmp_path / "out" / "README.md").read_text()
    assert "sequence-level KD" in card


def test_a_json_config_file_runs_the_recipe(lm_teacher_dir, text_files, tmp_path):
    flags = run_args(lm_teacher_dir, text_files, tmp_path / "y")
    config = {}
    for i, flag in enumerate(flags):
        if flag.startswith("--"):
            value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else "true"
            try:
                config[flag[2:]] = json.loads(value)  # numbers and booleans as JSON has them
            except json.JSONDecodeError:
                config[flag[2:]] = value
    (tmp_path / "run.json").write_text(json.dumps(config))
    metrics = distill_lm.main([str(tmp_path / "run.json")])
    assert metrics["eval_perplexity"] > 1 and (tmp_path / "y" / "eval_results.json").exists()


def test_the_on_policy_share_is_lmbda_and_the_same_on_every_rerun():
    from hf_attn_distill.training.on_policy import is_on_policy_step

    draws = [is_on_policy_step(42, step, micro, 0.3) for step in range(500) for micro in range(2)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws == [is_on_policy_step(42, step, micro, 0.3) for step in range(500) for micro in range(2)]
    assert draws != [is_on_policy_step(7, step, micro, 0.3) for step in range(500) for micro in range(2)]
    assert not any(is_on_policy_step(42, step, 0, 0.0) for step in range(100))
    assert all(is_on_policy_step(42, step, 0, 1.0) for step in range(100))


def test_on_policy_prompts_are_the_tokens_before_the_first_label_with_either_padding():
    """A collator may pad on either side (generation-minded tokenizers pad left): the prompt the student answers is
    the row's tokens before its first labelled one, padding left out."""
    from hf_attn_distill.training.on_policy import prompts_of

    right = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100, -100], [-100, -100, -100, 12, 13, 14]]),
    }
    left = {k: torch.stack([v[0].roll(2), v[1]]) for k, v in right.items()}
    assert left["input_ids"][0].tolist() == [0, 0, 5, 6, 7, 8]
    assert prompts_of(right) == prompts_of(left) == [[5, 6], [9, 10, 11]]
