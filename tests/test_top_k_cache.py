"""Offline top-k teacher outputs for causal LMs (``teacher_logits_top_k``): the top-k forward KL against its dense
reference for both tails, the cache's layout and size, and training from the cache against training with the
teacher in memory (chunked and full-logit paths)."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_decoder_only import VOCAB, collate, rows, trainer_for

from hf_attn_distill import DistillConfig, token_divergence
from hf_attn_distill.terms.divergences import top_k_forward_kl


def dense_reference(student, teacher, k, temperature, tail):
    """``KL(q ‖ p_s)`` in float64 with ``q`` built densely from the teacher's top-k."""
    p_t = torch.softmax(teacher.double() / temperature, -1)
    top = p_t.topk(k, -1)
    q = torch.zeros_like(p_t)
    if tail == "renormalize":
        q.scatter_(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    else:
        rest = (1 - top.values.sum(-1, keepdim=True)) / max(p_t.shape[-1] - k, 1)
        q = rest.expand_as(p_t).clone().scatter_(-1, top.indices, top.values)
    log_s = torch.log_softmax(student.double() / temperature, -1)
    return torch.where(q > 0, q * (q.log() - log_s), 0.0).sum(-1)


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
@pytest.mark.parametrize("k", [3, 17])
def test_top_k_forward_kl_equals_its_dense_reference_with_gradients(tail, k):
    torch.manual_seed(0)
    student = (torch.randn(7, 17) * 2).requires_grad_(True)
    teacher = torch.randn(7, 17) * 2
    log_probs = torch.log_softmax(teacher / 2.0, -1)
    top = log_probs.topk(k, -1)
    got = top_k_forward_kl(student, top.indices, top.values, 2.0, tail)
    student64 = student.detach().double().requires_grad_(True)
    want = dense_reference(student64, teacher, k, 2.0, tail)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), student)
    (grad64,) = torch.autograd.grad(want.sum(), student64)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
    if k == 17:  # every token kept: the dense forward KL, whichever tail
        full = token_divergence(student, teacher, "forward_kl", 2.0)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


def cached(tmp_path, name, k, dtype="float32", **overrides):
    return trainer_for(
        "llama",
        tmp_path / name,
        2,
        4,
        decoder_layer_map=None,
        layer_map=None,
        alpha_ce=0.5,
        alpha_kd=0.5,
        teacher_logits_cache=str(tmp_path / f"cache-{name}"),
        teacher_logits_top_k=k,
        teacher_logits_cache_dtype=dtype,
        **overrides,
    )


def update(trainer):
    start = {key: v.clone() for key, v in trainer.model.state_dict().items()}
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {key: v - start[key] for key, v in trainer.model.state_dict().items()}, log


@pytest.mark.parametrize("chunked", [True, False])
def test_a_cache_of_every_token_trains_as_the_teacher_in_memory(chunked, tmp_path):
    """k = the whole vocabulary, float32: the same terms and update as running the teacher every step."""
    got_delta, got_log = update(cached(tmp_path, "all", VOCAB, chunked_lm_loss=chunked))
    want_delta, want_log = update(
        trainer_for("llama", tmp_path / "live", 2, 4, decoder_layer_map=None, layer_map=None, chunked_lm_loss=chunked)
    )
    largest = max(d.abs().max().item() for d in want_delta.values())
    for key, delta in want_delta.items():
        torch.testing.assert_close(got_delta[key], delta, atol=1e-4 * largest, rtol=1e-4, msg=key)
    for term in ("loss_ce", "loss_kd"):
        assert got_log[term] == pytest.approx(want_log[term], rel=1e-5), term


def test_a_top_k_cache_holds_the_teachers_top_tokens_and_its_loss_is_their_kl(tmp_path):
    trainer = cached(tmp_path, "top8", 8, dtype="float16")
    cache = trainer.teacher_logits_cache
    meta = json.loads((tmp_path / "cache-top8" / "meta.json").read_text())
    assert meta["top_k"] == 8 and meta["temperature"] == 2.0 and meta["complete"]
    assert cache.bytes_per_token == 8 * (2 + 2)  # uint16 ids (vocabulary <= 65,536) and float16 log-probabilities
    teacher = trainer.teacher_model
    batch = collate(rows()[:3])
    index = torch.tensor([0, 1, 2])
    ids, log_probs = cache.lookup(index, batch["attention_mask"])
    with torch.no_grad():
        want = torch.log_softmax(teacher(**batch).logits / 2.0, -1).topk(8, -1)
    valid = batch["attention_mask"].bool()
    assert torch.equal(ids[valid], want.indices[valid])
    torch.testing.assert_close(log_probs[valid], want.values[valid], atol=2e-3, rtol=1e-3)  # float16
    trainer.model.train()
    inputs = {**batch, "teacher_cache_index": index}
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(inputs))
        got = trainer.accounting.pop_means("train")
        s_logits, t_logits = trainer.model(**batch).logits, teacher(**batch).logits
    mask = batch["labels"][:, 1:].ne(-100)
    kd = dense_reference(s_logits[:, :-1][mask], t_logits[:, :-1][mask], 8, 2.0, "renormalize").mean() * 4
    assert got["loss_kd"] == pytest.approx(kd.item(), rel=2e-3)  # the float16 log-probabilities
    shuffled = batch["attention_mask"].flip(-1)  # left padding: rows would not line up with the cache
    with pytest.raises(ValueError, match="right-padded"):
        cache.lookup(index, shuffled)
    assert VOCAB == 500 and F is not None


def test_top_k_settings_are_checked_naming_the_fix(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, layer_map=None)
    with pytest.raises(ValueError, match="needs teacher_logits_cache"):
        DistillConfig(**base, teacher_logits_top_k=8)
    with pytest.raises(ValueError, match="forward_kl' only"):
        DistillConfig(**base, teacher_logits_cache="c", teacher_logits_top_k=8, divergence="jsd")
    with pytest.raises(ValueError, match="cannot follow a schedule"):
        DistillConfig(**base, teacher_logits_cache="c", teacher_logits_top_k=8, schedules="temperature=linear:1.0")
    with pytest.raises(ValueError, match="teacher_logits_tail must be one of"):
        DistillConfig(**base, teacher_logits_cache="c", teacher_logits_top_k=8, teacher_logits_tail="spread")


def test_a_finished_cache_trains_without_the_teacher_in_memory(tmp_path):
    """A run with teacher_model=None reads the cache a run with the teacher built: the same update; without a
    finished cache, or asked to evaluate with the teacher, or on other data, it is refused naming the fix."""
    from datasets import Dataset
    from test_decoder_only import FAMILIES, InOrderTrainer

    with_teacher = cached(tmp_path, "shared", 16, eval_with_teacher=False)
    first_delta, first_log = update(with_teacher)  # builds the cache, then trains from it
    args = with_teacher.args
    student = FAMILIES["llama"](2, 2, 1)
    alone = InOrderTrainer(
        model=student, teacher_model=None, args=args, train_dataset=Dataset.from_list(rows()), data_collator=collate
    )
    assert alone.teacher_model is None
    delta, log = update(alone)
    for key, value in first_delta.items():
        torch.testing.assert_close(delta[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert log["loss_kd"] == pytest.approx(first_log["loss_kd"], rel=1e-6)
    alone.create_model_card(model_name="cached")
    from pathlib import Path

    card = (Path(alone.args.output_dir) / "README.md").read_text()
    params = sum(p.numel() for p in with_teacher.teacher_model.parameters())
    assert f"{params / 1e6:.1f}M" in card and str(tmp_path) not in card  # the teacher as the cache records it
    build = dict(model=FAMILIES["llama"](2, 2, 1), teacher_model=None, data_collator=collate)
    with pytest.raises(ValueError, match="eval_with_teacher=False"):
        InOrderTrainer(**build, args=DistillConfig(**{**args.to_dict(), "eval_with_teacher": True}))
    with pytest.raises(ValueError, match="teacher_model is required.*finished teacher_logits_cache"):
        InOrderTrainer(**build, args=DistillConfig(**{**args.to_dict(), "teacher_logits_cache": str(tmp_path / "x")}))
    with pytest.raises(ValueError, match="built for other data or settings"):
        InOrderTrainer(**build, args=args, train_dataset=Dataset.from_list(rows()[:5]))


def test_ids_past_65536_tokens_are_stored_as_int32(tmp_path):
    """k * 6 bytes a token past 65,536 tokens (int32 ids, float16 log-probabilities), k * 4 below (uint16)."""
    from hf_attn_distill.training.teacher_cache import CACHE_INDEX_COLUMN, TeacherTopKCache

    for vocab, per_token in ((65_536, 4), (152_064, 6)):
        cache = TeacherTopKCache(tmp_path / str(vocab), {"vocab": vocab})
        ids = torch.tensor([[[vocab - 1, 0], [5, vocab - 2], [1, 2]]])  # one example of 3 positions, k = 2
        log_probs = torch.log(torch.tensor([[[0.6, 0.3], [0.5, 0.4], [0.9, 0.05]]]))
        batch = {CACHE_INDEX_COLUMN: torch.tensor([0])}
        cache.build([batch], lambda b, i=ids, p=log_probs: (i, p), [3], k=2, vocab=vocab)
        assert cache.bytes_per_token == 2 * per_token
        got_ids, got = cache.lookup(torch.tensor([0]), torch.ones(1, 3, dtype=torch.long))
        assert torch.equal(got_ids, ids)  # the largest ids survive the storage type
        torch.testing.assert_close(got, log_probs, atol=1e-3, rtol=1e-3)
