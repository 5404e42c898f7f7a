"""Pairs that almost match: embeddings padded to different sizes around one tokenizer are distilled exactly over
the tokenizer's rows; tokenizers of the same size with different tokens are refused, naming the first ids."""

import pytest
import torch
from conftest import one_sgd_step, tiny_classifier
from datasets import Dataset
from test_decoder_only import FAMILIES, VOCAB, InOrderTrainer, collate, rows
from tokenizers import Tokenizer, models
from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from hf_attn_distill import DistillConfig, DistillTrainer, logit_kd_loss


def word_tokenizer(size: int, prefix: str = "w") -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, **{f"{prefix}{i}": i for i in range(1, size)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<pad>")), pad_token="<pad>")


def padded_pair(family):
    """Teacher and student of one family whose embeddings are padded past the tokenizer's VOCAB tokens to
    different sizes (Qwen2.5-style: 7B and 0.5B share a tokenizer, not an embedding size)."""
    teacher, student = FAMILIES[family](4, 4, 0), FAMILIES[family](2, 2, 1)
    teacher.resize_token_embeddings(VOCAB + 64, mean_resizing=False)
    student.resize_token_embeddings(VOCAB + 12, mean_resizing=False)
    return teacher, student


def trainer_for(family, tmp_path, batch=8, accumulation=1, tokenizer=None):
    teacher, student = padded_pair(family)
    out = tmp_path / f"{family}-{batch}x{accumulation}"
    args = DistillConfig(**one_sgd_step(out, batch, accumulation, temperature=2.0, alpha_ce=0.5, alpha_kd=0.5))
    return InOrderTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows()),
        data_collator=collate,
        processing_class=tokenizer if tokenizer is not None else word_tokenizer(VOCAB),
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_vocabularies_are_distilled_over_the_tokenizers_rows(family, tmp_path):
    """Token-level KD of a pair whose embeddings are padded to 564 and 512 rows around a 500-token tokenizer
    equals the reference KD over the first 500 rows of both models' logits; the card says which rows."""
    trainer = trainer_for(family, tmp_path)
    student, teacher = trainer.model, trainer.teacher_model
    assert (teacher.config.vocab_size, student.config.vocab_size) == (VOCAB + 64, VOCAB + 12)
    batch = collate(rows()[:4])
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(batch))
    got = trainer.accounting.pop_means("eval")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_logits, s_logits = teacher(**inputs).logits, student(**inputs).logits
    valid = batch["labels"][:, 1:].ne(-100)  # position t predicts token t + 1
    s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
    want = logit_kd_loss(s_logits[valid][:, :VOCAB], t_logits[valid][:, :VOCAB], 2.0).item()
    # the trainer's logits come from the fused and streamed attention paths: float32 rounding of log-probabilities
    # is absolute (~1e-7), and this KL of two random models is small (~1e-2)
    assert got["loss_kd"] == pytest.approx(want, rel=1e-5, abs=1e-6)
    shared = min(VOCAB + 64, VOCAB + 12)  # KD over every row both embeddings have, padding included: another value
    padded = logit_kd_loss(s_logits[valid][:, :shared], t_logits[valid][:, :shared], 2.0).item()
    assert abs(padded - want) > 10 * abs(got["loss_kd"] - want)
    note = f"rows 0-{VOCAB - 1} (the tokenizer's {VOCAB} tokens) of the teacher's {VOCAB + 64} and the student's"
    assert trainer.vocab_rows_note.startswith(note)
    trainer.create_model_card(model_name="padded")
    card = (tmp_path / f"{family}-8x1" / "README.md").read_text()
    assert "logit_kd_vocab_rows" in card and note in card


def test_accumulation_over_padded_vocabularies_equals_one_batch(tmp_path):
    def update(trainer):
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        return {k: v - start[k] for k, v in trainer.model.state_dict().items()}

    big, small = update(trainer_for("llama", tmp_path, 8, 1)), update(trainer_for("llama", tmp_path, 2, 4))
    largest = max(d.abs().max().item() for d in big.values())
    assert largest > 1e-5
    for key, delta in big.items():
        torch.testing.assert_close(small[key], delta, atol=1e-3 * largest, rtol=1e-3, msg=key)


def test_other_size_differences_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size 512 != teacher vocab_size 564, and the tokenizer given \(600"):
        trainer_for("gpt2", tmp_path, tokenizer=word_tokenizer(600))
    teacher, student = padded_pair("gpt2")
    with pytest.raises(ValueError, match="no tokenizer was given.*processing_class"):
        DistillTrainer(model=student, teacher_model=teacher, args=DistillConfig(output_dir=str(tmp_path)))


def test_tokenizers_of_one_size_with_other_tokens_are_refused_naming_the_first_ids(tmp_path):
    """A teacher given as a folder has its own tokenizer: a student tokenizer of the same size whose ids mean other
    tokens is refused with the first differing ids; the same tokenizer passes, and a student built from a teacher
    given as a model passes without loading anything."""
    teacher_dir = tmp_path / "teacher"
    tiny_classifier(0, vocab_size=12).save_pretrained(teacher_dir)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "plot", "cast", "dull", "fun"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(teacher_dir)
    other = BertTokenizerFast(vocab={w: i for i, w in enumerate(words[:5] + words[5:][::-1])})
    args = DistillConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    student = tiny_classifier(1, vocab_size=12, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"give 6 ids different tokens \(first: id 5: teacher 'good', student 'fun'"):
        DistillTrainer(model=student, teacher_model=str(teacher_dir), args=args, processing_class=other)
    same = BertTokenizerFast.from_pretrained(teacher_dir)
    DistillTrainer(model=student, teacher_model=str(teacher_dir), args=args, processing_class=same)
    DistillTrainer(model=student, teacher_model=tiny_classifier(0, vocab_size=12), args=args, processing_class=other)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_a_top_k_cache_of_a_padded_teacher_holds_the_tokenizers_rows_only(tail, chunked, tmp_path):
    """A top-k cache of a teacher padded past the tokenizer (564 rows around 500 tokens) ranks the teacher's
    distribution over the 500 real rows: no cached id is a padding row, and the loss (chunked head pass or full
    logits) is the dense top-k reference over those rows (the padding's mass in no tail); a run from the cache
    alone compares the same rows."""
    from test_top_k_cache import dense_reference

    teacher, student = padded_pair("llama")
    tokenizer = word_tokenizer(VOCAB)
    batch = collate(rows()[:4])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        padded_top = torch.log_softmax(teacher(**inputs).logits / 2.0, -1).topk(8, -1).indices
    assert padded_top.ge(VOCAB).any()  # over every row, padding would be among the top 8 of these random heads
    args = DistillConfig(
        **one_sgd_step(tmp_path / "out", 8, 1, temperature=2.0, alpha_ce=0.5, alpha_kd=0.5, layer_map=None),
        teacher_logits_cache=str(tmp_path / "cache"),
        teacher_logits_top_k=8,
        teacher_logits_cache_dtype="float32",
        teacher_logits_tail=tail,
        chunked_lm_loss=chunked,
    )
    data = Dataset.from_list(rows())
    trainer = InOrderTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        data_collator=collate,
        processing_class=tokenizer,
    )
    cache = trainer.teacher_logits_cache
    index = torch.arange(4)
    ids, log_probs = cache.lookup(index, batch["attention_mask"])
    with torch.no_grad():
        t_logits, s_logits = teacher(**inputs).logits, student(**inputs).logits
    want = torch.log_softmax(t_logits[..., :VOCAB] / 2.0, -1).topk(8, -1)
    valid = batch["attention_mask"].bool()
    assert ids[valid].max() < VOCAB
    assert torch.equal(ids[valid], want.indices[valid])
    torch.testing.assert_close(log_probs[valid], want.values[valid])
    with torch.no_grad():
        trainer.compute_loss(student.train(), {**batch, "teacher_cache_index": index})  # training reads the cache
    got = trainer.accounting.pop_means("train")["loss_kd"]
    mask = batch["labels"][:, 1:].ne(-100)
    s, t = s_logits[:, :-1][mask][:, :VOCAB], t_logits[:, :-1][mask][:, :VOCAB]
    reference = dense_reference(s, t, 8, 2.0, tail).mean().item() * 4
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-6)  # float32: the uniform tail's sum is absolute-exact
    alone = InOrderTrainer(
        model=student,
        teacher_model=None,
        args=DistillConfig(**{**args.to_dict(), "eval_with_teacher": False}),
        train_dataset=data,
        data_collator=collate,
        processing_class=tokenizer,
    )
    assert alone.vocab_rows == VOCAB
    with torch.no_grad():
        alone.compute_loss(student, {**batch, "teacher_cache_index": index})
    assert alone.accounting.pop_means("train")["loss_kd"] == pytest.approx(got, rel=1e-6)
