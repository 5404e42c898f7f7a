"""Decoder-only causal LMs (GPT-2; Llama, Qwen2 and Mistral with grouped-query attention) through DistillTrainer.

Tiny random configs, right- and left-padded batches: capture equals eager and the output equals sdpa; the trainer's
causal attention term and token-level KD equal the reference losses; an update split into micro-batches with padding
equals one batch.
"""

import functools
from pathlib import Path

import pytest
import torch
from conftest import one_sgd_step
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_attn_distill import (
    AttentionRecorder,
    DistillConfig,
    DistillTrainer,
    attention_kl_loss,
    enable_attention_capture,
    find_attention_sites,
    group_teacher_heads,
    logit_kd_loss,
)

VOCAB = 500


def gpt2(layers, heads, seed):
    """Fused ``c_attn`` projection, no head attribute the old discovery could read."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=layers,
        n_head=heads,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def causal_lm(model_class, config_class, layers, heads, seed, **extra):
    """A tiny grouped-query causal LM: half as many key/value heads as query heads."""
    torch.manual_seed(seed)
    return model_class(
        config_class(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=64,
            **extra,
        )
    )


def llama(layers, heads, seed):
    """Grouped-query attention, rotary embeddings."""
    return causal_lm(LlamaForCausalLM, LlamaConfig, layers, heads, seed)


def qwen2(layers, heads, seed):
    """Grouped-query attention, and a 4-token sliding window on layers 2 and up."""
    return causal_lm(
        Qwen2ForCausalLM,
        Qwen2Config,
        layers,
        heads,
        seed,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )


def mistral(layers, heads, seed):
    """Grouped-query attention with a 6-token sliding window on every layer."""
    return causal_lm(MistralForCausalLM, MistralConfig, layers, heads, seed, sliding_window=6)


FAMILIES = {"gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral}
LENGTHS = [9, 6, 3, 8, 9, 4, 7, 5]


def rows(lengths=LENGTHS):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, VOCAB, (n,), generator=g).tolist()} for n in lengths]


def collate(features, side="right"):
    """Right (or left, as batched generation pads) padding; labels are the inputs with -100 on padding (the model
    shifts them)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(f["input_ids"])
        mask[i, cols] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if side == "left":  # each row's positions start at its first token, as generate() numbers them
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    return batch


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def causal_valid(mask):
    q = mask.bool()
    return (q[:, None, :, None] & q[:, None, None, :]) & torch.ones(mask.shape[1], mask.shape[1]).tril().bool()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("teacher_side", [False, True], ids=["autograd", "inference"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_eager_and_output_equals_sdpa(family, teacher_side, side):
    model = FAMILIES[family](4, 4, 0).eval()
    batch = collate(rows()[:3], side)
    inputs = model_inputs(batch)
    sdpa_logits = model(**inputs).logits
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True).attentions
    enable_attention_capture(model)
    sites = find_attention_sites(model)
    assert list(sites) == ["decoder"] and len(sites["decoder"]) == 4
    layer = sites["decoder"][0]
    assert layer.causal and (layer.heads, layer.kv_heads) == ((4, 4) if family == "gpt2" else (4, 2))
    recorder = AttentionRecorder([sites["decoder"][i] for i in (1, 3)])
    mode = torch.inference_mode() if teacher_side else torch.enable_grad()
    with mode, recorder.record() as records:
        logits = model(**inputs).logits
    valid = causal_valid(inputs["attention_mask"]).expand_as(eager[1])
    torch.testing.assert_close(logits[inputs["attention_mask"].bool()], sdpa_logits[inputs["attention_mask"].bool()])
    for record, index in zip(records, (1, 3)):
        torch.testing.assert_close(record.exp()[valid], eager[index][valid], atol=1e-6, rtol=1e-5)


def unnamed_family(name: str):
    """A tiny causal LM of a family the package never names (Qwen3: RMS-normed queries and keys; OLMo)."""
    import transformers

    model_class, config_class = {
        "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
        "olmo": ("OlmoForCausalLM", "OlmoConfig"),
    }[name]
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    classes = getattr(transformers, model_class), getattr(transformers, config_class)
    return lambda layers, heads, seed: causal_lm(*classes, layers, heads, seed, **ids)


@pytest.mark.parametrize("family", ["qwen3", "olmo"])
def test_a_family_the_package_never_names_is_captured_exactly(family, monkeypatch):
    """README: sites are learnt from one probe forward, so a model dispatching through ``AttentionInterface`` needs
    no special case: no module of the package mentions these families, and their capture equals eager attention."""
    import hf_attn_distill

    package = Path(hf_attn_distill.__file__).parent
    assert not [p for p in package.rglob("*.py") if family in p.read_text().lower()]
    monkeypatch.setitem(FAMILIES, family, unnamed_family(family))
    for teacher_side in (False, True):
        test_capture_equals_eager_and_output_equals_sdpa(family, teacher_side, "right")


class InOrderTrainer(DistillTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def trainer_for(family, tmp_path, batch=8, accumulation=1, side="right", **overrides):
    values = one_sgd_step(tmp_path / f"{family}-b{batch}ga{accumulation}", batch, accumulation, temperature=2.0)
    values.update(overrides)
    return InOrderTrainer(
        model=FAMILIES[family](2, 2, 1),
        teacher_model=FAMILIES[family](4, 4, 0),
        args=DistillConfig(**values),
        train_dataset=Dataset.from_list(rows()),
        data_collator=functools.partial(collate, side=side),
    )


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "full_logits"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_terms_equal_the_reference_losses(family, side, chunked, tmp_path):
    """Both LM-loss paths (from hidden states a chunk at a time, or the models' full logits and own loss) count the
    same tokens."""
    trainer = trainer_for(family, tmp_path, side=side, chunked_lm_loss=chunked)
    student, teacher = trainer.model, trainer.teacher_model
    (transfer,) = trainer.transfers
    assert transfer.site == "decoder" and transfer.pairs == [(0, 1), (1, 3)]  # "uniform" over 4 -> 2 layers
    batch = collate(rows()[:4], side)
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(batch))
    got = trainer.accounting.pop_means("eval")
    inputs = model_inputs(batch)
    s_rec, t_rec = AttentionRecorder(transfer.student.layers), AttentionRecorder(transfer.teacher.layers)
    with torch.no_grad(), t_rec.record() as t_att, s_rec.record() as s_att:
        t_logits = teacher(**inputs).logits
        s_logits = student(**inputs).logits
    mask = inputs["attention_mask"]
    want = torch.stack(
        [attention_kl_loss(s, group_teacher_heads(t, 2, "log_probs"), mask, causal=True) for s, t in zip(s_att, t_att)]
    ).mean()
    # near-uniform random-init attention: a KL of ~1e-4 whose float32 rounding is absolute (see below), not relative
    assert got["loss_attn_dec"] == pytest.approx(want.item(), rel=1e-5, abs=torch.finfo(torch.float32).eps)
    # position t predicts token t + 1: compared where that one counts and t is a token (with left padding, the
    # padding just before a row's first token has no context and does not count)
    valid = batch["labels"][:, 1:].ne(-100) & mask[:, :-1].bool()
    s_next, t_next = s_logits[:, :-1][valid], t_logits[:, :-1][valid]
    assert got["loss_kd"] == pytest.approx(logit_kd_loss(s_next, t_next, 2.0).item(), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(s_next, batch["labels"][:, 1:][valid])
    assert got["loss_ce"] == pytest.approx(ce.item(), rel=1e-5)
    if side == "right":  # the same tokens as transformers' own loss
        assert got["loss_ce"] == pytest.approx(student(**batch).loss.item(), rel=1e-5)


def _update(trainer):
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {k: v - start[k] for k, v in trainer.model.state_dict().items()}, log


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_accumulation_with_padding_equals_one_batch(family, side, tmp_path):
    big_delta, big_log = _update(trainer_for(family, tmp_path / side, 8, 1, side))
    small_delta, small_log = _update(trainer_for(family, tmp_path / side, 2, 4, side))
    largest = max(d.abs().max().item() for d in big_delta.values())
    assert largest > 1e-5
    for key, delta in big_delta.items():
        torch.testing.assert_close(small_delta[key], delta, atol=1e-3 * largest, rtol=1e-3, msg=key)
    # the attention KL of near-identical random-init attention is tiny (~1e-4) and a sum of differences of
    # log-probabilities: its float32 rounding is absolute (about one machine epsilon), not relative to its value
    eps = torch.finfo(torch.float32).eps
    for term in ("loss", "loss_ce", "loss_kd", "loss_attn_dec"):
        assert small_log[term] == pytest.approx(big_log[term], rel=1e-5, abs=eps if term == "loss_attn_dec" else 0), (
            term
        )


@pytest.mark.parametrize("with_teacher", [True, False], ids=["with_teacher", "student_only"])
def test_evaluation_counts_the_same_tokens_with_either_padding(with_teacher, tmp_path):
    """``eval_loss_ce`` of a left-padded evaluation equals the right-padded one, with the teacher or without it
    (``eval_with_teacher=False``: the student's own loss, its labels masked where a token is predicted from padding)."""
    losses = {}
    for side in ("right", "left"):
        trainer = trainer_for("gpt2", tmp_path / side, side=side, eval_with_teacher=with_teacher)
        losses[side] = trainer.evaluate(Dataset.from_list(rows()))["eval_loss_ce"]
    assert losses["left"] == pytest.approx(losses["right"], rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_recomputing_the_attention_in_backward_gives_the_kept_update(family, side, tmp_path, caplog):
    """``attention_keep_mb=0`` (every mapped layer recomputes its blocks in backward, as at long lengths) trains
    each causal family, grouped-query heads, sliding windows and both paddings, to the update of keeping them."""
    with caplog.at_level("INFO", logger="hf_attn_distill"):
        kept_delta, kept_log = _update(trainer_for(family, tmp_path / "kept", side=side))
        delta, log = _update(trainer_for(family, tmp_path / "recomputed", side=side, attention_keep_mb=0))
    paths = [r.getMessage().rsplit(": ", 1)[-1] for r in caplog.records if "attention_keep_mb" in r.getMessage()]
    assert paths == ["kept for backward, no recompute"] * 2 + ["blocks recomputed in backward"] * 2  # 2 layers each
    largest = max(d.abs().max().item() for d in kept_delta.values())
    assert largest > 1e-5
    for key, value in kept_delta.items():
        torch.testing.assert_close(delta[key], value, atol=1e-5 * largest, rtol=1e-5, msg=key)
    for term in ("loss", "loss_ce", "loss_kd", "loss_attn_dec"):
        assert log[term] == pytest.approx(kept_log[term], rel=1e-6), term
