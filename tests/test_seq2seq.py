"""Encoder-decoder models: every attention site captured exactly, and distilled through DistillTrainer."""

import copy

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_attn_distill import (
    AttentionRecorder,
    DistillConfig,
    DistillTrainer,
    attention_kl_loss,
    enable_attention_capture,
    group_teacher_heads,
    logit_kd_loss,
)
from hf_attn_distill.attention.capture import set_attention_implementation
from hf_attn_distill.attention.sites import find_attention_sites

PAD = 1
VOCAB = 100


def bart(layers, heads, seed):
    torch.manual_seed(seed)
    return BartForConditionalGeneration(
        BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            init_std=0.2,  # attention far from uniform: the transfer losses compared are far from 0
            pad_token_id=PAD,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    )


def marian(layers, heads, seed):
    torch.manual_seed(seed)
    return MarianMTModel(
        MarianConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=PAD,
            eos_token_id=2,
            decoder_start_token_id=PAD,
            forced_eos_token_id=None,
        )
    )


def t5(layers, heads, seed):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            d_ff=64,
            dropout_rate=0.0,
            pad_token_id=PAD,
            eos_token_id=2,
            decoder_start_token_id=PAD,
        )
    )


def bert2bert(layers, heads, seed):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )
    model = EncoderDecoderModel(
        encoder=BertModel(BertConfig(**common)),
        decoder=BertLMHeadModel(BertConfig(**common, is_decoder=True, add_cross_attention=True)),
    )
    model.config.decoder_start_token_id = 2
    model.config.pad_token_id = PAD
    return model


FAMILIES = {"bart": bart, "marian": marian, "t5": t5, "bert2bert": bert2bert}


def rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for n_src, n_tgt in [(7, 5), (4, 3), (6, 2), (3, 5)]:
        out.append(
            {
                "input_ids": torch.randint(3, VOCAB, (n_src,), generator=g).tolist(),
                "labels": torch.randint(3, VOCAB, (n_tgt,), generator=g).tolist(),
            }
        )
    return out


def collate(features):
    src = max(len(f["input_ids"]) for f in features)
    tgt = max(len(f["labels"]) for f in features)
    return {
        "input_ids": torch.tensor([f["input_ids"] + [PAD] * (src - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (src - len(f["input_ids"])) for f in features]
        ),
        "labels": torch.tensor([f["labels"] + [-100] * (tgt - len(f["labels"])) for f in features]),
    }


def eager_attentions(model, inputs):
    out = model(**inputs, output_attentions=True)
    return {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}


def site_valid(site, batch):
    """[B, 1, Q, 1] valid queries of a site's attention (padded queries hold arbitrary rows in eager)."""
    src, tgt = batch["attention_mask"].bool(), batch["labels"].ne(-100)
    return (src if site == "encoder" else tgt)[:, None, :, None]


@pytest.mark.parametrize("inference", [False, True], ids=["autograd", "inference"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_site_captured_equal_to_eager_and_output_equal_to_sdpa(family, inference):
    model = FAMILIES[family](2, 4, 0).eval()
    batch = collate(rows())
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    }
    sdpa_logits = model(**inputs).logits
    set_attention_implementation(model, "eager")
    eager = eager_attentions(model, inputs)
    enable_attention_capture(model)
    sites = find_attention_sites(model)
    assert sorted(sites) == ["cross", "decoder", "encoder"]
    recorders = {site: AttentionRecorder(modules) for site, modules in sites.items()}
    mode = torch.inference_mode() if inference else torch.enable_grad()
    with mode:
        for recorder in recorders.values():
            recorder.start()
        logits = model(**inputs).logits
        records = {site: r.collect() for site, r in recorders.items()}
        for recorder in recorders.values():
            recorder.stop()
    tgt_valid = batch["labels"].ne(-100)[:, :, None]
    torch.testing.assert_close(
        logits[tgt_valid.expand_as(logits)], sdpa_logits[tgt_valid.expand_as(logits)], atol=1e-5, rtol=1e-5
    )
    for site, layers in records.items():
        for layer, record in enumerate(layers):
            valid = site_valid(site, batch).expand_as(record)
            torch.testing.assert_close(
                record.exp()[valid], eager[site][layer][valid], atol=1e-6, rtol=1e-5, msg=f"{site} layer {layer}"
            )


def make_trainer(family, tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        learning_rate=1e-2,
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        layer_map="uniform",
        decoder_layer_map="uniform",
        cross_layer_map="last",
        decoder_attention_weight=0.5,
        cross_attention_weight=2.0,
    )
    values.update(overrides)
    teacher, student = FAMILIES[family](4, 4, 0), FAMILIES[family](2, 2, 1)
    return DistillTrainer(
        model=student, teacher_model=teacher, args=DistillConfig(**values), train_dataset=rows(), data_collator=collate
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_distill_trainer_every_site_equals_reference_losses(family, tmp_path):
    trainer = make_trainer(family, tmp_path)
    assert [(t.site, t.pairs) for t in trainer.transfers] == [
        ("encoder", [(0, 1), (1, 3)]),
        ("decoder", [(0, 1), (1, 3)]),
        ("cross", [(1, 3)]),
    ]
    student, teacher = trainer.model, trainer.teacher_model
    batch = collate(rows())
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), dict(batch))
    got = trainer.accounting.pop_means("eval")

    decoder_input_ids = student.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": decoder_input_ids,
    }
    src, tgt = batch["attention_mask"], batch["labels"].ne(-100)
    masks = {"encoder": (src, src, False), "decoder": (tgt, tgt, True), "cross": (src, tgt, False)}
    for transfer in trainer.transfers:
        s_rec, t_rec = AttentionRecorder(transfer.student.modules), AttentionRecorder(transfer.teacher.modules)
        with torch.no_grad(), t_rec.record() as t_att, s_rec.record() as s_att:
            t_out = teacher(**inputs)
            s_out = student(**inputs)
        key, query, causal = masks[transfer.site]
        want = [
            attention_kl_loss(s, group_teacher_heads(t, 2, "log_probs"), key, query, causal)
            for s, t in zip(s_att, t_att)
        ]
        # float32 sums of near-cancelling terms: values ~1e-4 agree to ~1e-9 absolute
        assert got[transfer.term] == pytest.approx(torch.stack(want).mean().item(), rel=1e-4, abs=1e-8), transfer.site
        assert got[transfer.term] > 0
    # token-level KD: the teacher decoded the same target prefix as the student
    kd = logit_kd_loss(s_out.logits, t_out.logits, 2.0, tgt)
    assert got["loss_kd"] == pytest.approx(kd.item(), rel=1e-4)
    expected = (
        0.5 * got["loss_ce"]
        + 0.5 * got["loss_kd"]
        + got["loss_attn_enc"]
        + 0.5 * got["loss_attn_dec"]
        + 2.0 * got["loss_attn_cross"]
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    before = copy.deepcopy(student.state_dict())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_attn_cross" in e]
    assert len(logs) == 3 and all("loss_attn_enc" in e and "loss_attn_dec" in e for e in logs)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_logit_only_teacher_reads_the_decoder_inputs_built_from_labels(tmp_path):
    """attention off: the teacher still decodes shift(labels), not shift(input_ids)."""
    trainer = make_trainer("bart", tmp_path, layer_map="none", decoder_layer_map=None, cross_layer_map=None)
    assert trainer.transfers == []
    batch = collate(rows())
    with torch.no_grad():
        trainer.compute_loss(trainer.model.eval(), dict(batch))
    got = trainer.accounting.pop_means("eval")
    decoder_input_ids = trainer.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": decoder_input_ids,
    }
    with torch.no_grad():
        want = logit_kd_loss(
            trainer.model(**inputs).logits, trainer.teacher_model(**inputs).logits, 2.0, batch["labels"].ne(-100)
        )
    assert got["loss_kd"] == pytest.approx(want.item(), rel=1e-5)


def test_accumulation_is_exact_for_every_site(tmp_path):
    def one_update(batch, accumulation):
        trainer = make_trainer(
            "bart",
            tmp_path / f"{batch}x{accumulation}",
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            alpha_ce=0.0,
            alpha_kd=0.0,
        )
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        start = copy.deepcopy(trainer.model.state_dict())
        trainer.train()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        return {k: v - start[k] for k, v in trainer.model.state_dict().items()}, log

    (big, big_log), (small, small_log) = one_update(4, 1), one_update(2, 2)
    largest = max(d.abs().max().item() for d in big.values())
    assert largest > 1e-5
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-3 * largest, rtol=1e-3, msg=key)
    for key in ("loss", "loss_attn_enc", "loss_attn_dec", "loss_attn_cross"):
        assert small_log[key] == pytest.approx(big_log[key], rel=1e-5), key


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(cross_layer_map="0:9"), "cross_layer_map.*out of range"),
        (dict(decoder_layer_map="5:0"), "decoder_layer_map.*out of range"),
    ],
)
def test_site_layer_maps_out_of_range_name_the_flag(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_trainer("bart", tmp_path, **overrides)


@pytest.mark.parametrize("flag", ["cross_layer_map", "decoder_layer_map"])
def test_site_map_for_a_site_the_model_lacks(tmp_path, flag):
    from conftest import tiny_classifier

    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{flag: "uniform"})
    site = "cross" if flag == "cross_layer_map" else "decoder"
    with pytest.raises(ValueError, match=f"{flag} is set, but the models have no {site} attention"):
        DistillTrainer(
            model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
            teacher_model=tiny_classifier(0),
            args=args,
        )


def test_different_decoder_start_tokens_are_refused(tmp_path):
    teacher, student = bart(4, 4, 0), bart(2, 2, 1)
    student.config.decoder_start_token_id = 0
    with pytest.raises(ValueError, match="decoder_start_token_id 0 != teacher's 2"):
        DistillTrainer(model=student, teacher_model=teacher, args=DistillConfig(output_dir=str(tmp_path)))


def test_a_model_that_never_calls_the_recording_implementation_is_caught_at_construction(tmp_path, monkeypatch):
    """Sites are learnt from the calls the recording implementation sees: a model that makes none is refused."""
    from conftest import tiny_classifier

    import hf_attn_distill.attention.capture as attention_capture

    monkeypatch.setattr(attention_capture, "enable_attention_capture", lambda model: None)  # stays on sdpa
    with pytest.raises(ValueError, match=r"made no attention call that could be seen.*attention_weight=0"):
        DistillTrainer(
            model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
            teacher_model=tiny_classifier(0),
            args=DistillConfig(output_dir=str(tmp_path)),
        )


def test_generation_based_evaluation_keeps_the_loss_terms(tmp_path):
    from hf_attn_distill import DistillSeq2SeqConfig, DistillSeq2SeqTrainer

    seen = {}

    def compute_metrics(eval_pred):
        seen["predictions"], seen["labels"] = eval_pred.predictions, eval_pred.label_ids
        return {"n": float(len(eval_pred.predictions))}

    args = DistillSeq2SeqConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_eval_batch_size=4,
        predict_with_generate=True,
        generation_max_length=6,
        generation_num_beams=1,
        layer_map="uniform",
        decoder_layer_map="uniform",
        cross_layer_map="uniform",
    )
    teacher, student = bart(4, 4, 0), bart(2, 2, 1)
    trainer = DistillSeq2SeqTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        eval_dataset=rows(),
        data_collator=collate,
        compute_metrics=compute_metrics,
    )
    metrics = trainer.evaluate()
    generated = torch.as_tensor(seen["predictions"])
    # labels padded to the generation length, as Seq2SeqTrainer pads them
    assert torch.as_tensor(seen["labels"]).shape[1] == generated.shape[1]
    for key in ("eval_loss", "eval_loss_kd", "eval_loss_attn_enc", "eval_loss_attn_dec", "eval_loss_attn_cross"):
        assert key in metrics and metrics[key] > 0, key
    # the same terms as teacher-forced evaluation without generation
    args.predict_with_generate = False
    plain = trainer.evaluate()
    for key in ("eval_loss", "eval_loss_kd", "eval_loss_attn_cross"):
        assert metrics[key] == pytest.approx(plain[key], rel=1e-5), key
    # predictions are the student's own generations
    batch = collate(rows())
    want = student.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_length=6, num_beams=1
    )
    got = generated[:, : want.shape[1]]
    assert torch.equal(got, want)
    # one teacher-forced student forward per evaluation batch (the loss's); generation's steps carry no labels
    args.predict_with_generate = True
    forced = []
    hook = student.register_forward_pre_hook(
        lambda module, a, kw: (
            forced.append(1)
            if kw.get("labels") is not None
            or kw.get("decoder_input_ids") is not None
            and kw.get("past_key_values") is None
            and kw["decoder_input_ids"].shape[1] > 1
            else None
        ),
        with_kwargs=True,
    )
    try:
        trainer.evaluate()
    finally:
        hook.remove()
    batches = -(-len(rows()) // args.per_device_eval_batch_size)
    assert len(forced) == batches
    with pytest.raises(TypeError, match="DistillSeq2SeqConfig"):
        DistillSeq2SeqTrainer(model=student, teacher_model=teacher, args=DistillConfig(output_dir=str(tmp_path)))


@pytest.mark.parametrize("family", ["bart", "marian", "bert2bert"])
def test_student_from_teacher_layers_for_encoder_decoders(family, tmp_path):
    from hf_attn_distill import student_from_teacher_layers
    from hf_attn_distill.attention.sites import find_layer_stacks

    teacher = FAMILIES[family](4, 4, 0).eval()
    batch = collate(rows())
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "decoder_input_ids": teacher.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
    }
    same = student_from_teacher_layers(teacher, [0, 1, 2, 3], decoder_layers=[0, 1, 2, 3]).eval()
    torch.testing.assert_close(same(**inputs).logits, teacher(**inputs).logits)
    student = student_from_teacher_layers(teacher, [1, 3], decoder_layers=[0, 2, 3])
    stacks = {k: len(v[1]) for k, v in find_layer_stacks(student).items()}
    assert stacks == {"encoder": 2, "decoder": 3}
    t_stacks, s_stacks = find_layer_stacks(teacher), find_layer_stacks(student)
    for stack, chosen in (("encoder", [1, 3]), ("decoder", [0, 2, 3])):
        for j, i in enumerate(chosen):
            t_params = dict(t_stacks[stack][1][i].named_parameters())
            for name, p in s_stacks[stack][1][j].named_parameters():
                assert torch.equal(p, t_params[name]), (stack, j, name)
    student.save_pretrained(tmp_path / "s")
    reloaded = type(student).from_pretrained(tmp_path / "s").eval()
    torch.testing.assert_close(reloaded(**inputs).logits, student.eval()(**inputs).logits)
    with pytest.raises(ValueError, match="decoder_layers"):
        student_from_teacher_layers(teacher, [1, 3])


def test_student_from_teacher_layers_refuses_t5_clearly():
    from hf_attn_distill import student_from_teacher_layers

    with pytest.raises(ValueError, match="student_from_config"):
        student_from_teacher_layers(t5(4, 4, 0), [1, 3], decoder_layers=[1, 3])


def test_sequence_kd_labels_are_the_teachers_translations_cached_until_the_teacher_changes(tmp_path, monkeypatch):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from hf_attn_distill.tasks.sequence_kd import sequence_kd_dataset

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": PAD, "<unk>": 0}, "<unk>")), pad_token="<pad>"
    )
    teacher = bart(2, 4, 0).eval()
    data = Dataset.from_list(rows())
    calls = []
    generate = teacher.generate
    monkeypatch.setattr(teacher, "generate", lambda **kw: calls.append(1) or generate(**kw))
    out = sequence_kd_dataset(teacher, tok, data, tmp_path / "cache", num_beams=2, max_length=6, batch_size=3)
    assert len(calls) == 2  # 4 rows in batches of 3
    for row, labels in zip(rows(), out["labels"]):
        want = generate(input_ids=torch.tensor([row["input_ids"]]), num_beams=2, max_length=6)[0].tolist()[1:]
        eos = teacher.generation_config.eos_token_id
        want = want[: want.index(eos) + 1] if eos in want else want  # the start token and what follows eos go
        assert labels == want
    again = sequence_kd_dataset(teacher, tok, data, tmp_path / "cache", num_beams=2, max_length=6, batch_size=3)
    assert len(calls) == 2 and again["labels"] == out["labels"]  # read from the cache
    with torch.no_grad():
        next(teacher.parameters()).add_(0.5)  # another teacher: rebuilt
    sequence_kd_dataset(teacher, tok, data, tmp_path / "cache", num_beams=2, max_length=6, batch_size=3)
    assert len(calls) == 4
    sequence_kd_dataset(teacher, tok, data, tmp_path / "cache", num_beams=1, max_length=6, batch_size=3)
    assert len(calls) == 6  # other generation settings: rebuilt
    other = Dataset.from_list(rows()[::-1])
    sequence_kd_dataset(teacher, tok, other, tmp_path / "cache", num_beams=1, max_length=6, batch_size=3)
    assert len(calls) == 8  # other training data: rebuilt
    same = Dataset.from_list(rows()[::-1]).map(lambda row: row, desc="another fingerprint, the same sources")
    assert same._fingerprint != other._fingerprint
    sequence_kd_dataset(teacher, tok, same, tmp_path / "cache", num_beams=1, max_length=6, batch_size=3)
    assert len(calls) == 8  # the same sources, tokenized anew (another machine, another sitting): read back
    with torch.no_grad():
        weight = next(teacher.parameters())
        weight.copy_(weight.flip(0))  # same parameter sum, other weights: rebuilt
    sequence_kd_dataset(teacher, tok, other, tmp_path / "cache", num_beams=1, max_length=6, batch_size=3)
    assert len(calls) == 10


def test_sequence_kd_generation_stopped_midway_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A generation killed after some batches keeps what it made (``partial.json.gz``); run again, it generates
    only the rest and ends with the translations of an uninterrupted run."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from hf_attn_distill.tasks.sequence_kd import sequence_kd_dataset

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": PAD, "<unk>": 0}, "<unk>")), pad_token="<pad>"
    )
    teacher = bart(2, 4, 0).eval()
    data = Dataset.from_list(rows() * 2)  # 8 rows: 4 batches of 2
    want = sequence_kd_dataset(teacher, tok, data, tmp_path / "whole", num_beams=1, max_length=6, batch_size=2)
    generate, calls = teacher.generate, []

    def stopped_after_two(**kw):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt  # the sitting ends
        return generate(**kw)

    monkeypatch.setattr(teacher, "generate", stopped_after_two)
    with pytest.raises(KeyboardInterrupt):
        sequence_kd_dataset(teacher, tok, data, tmp_path / "cut", num_beams=1, max_length=6, batch_size=2, save_every=1)
    assert (tmp_path / "cut" / "partial.json.gz").exists()
    calls.clear()
    monkeypatch.setattr(teacher, "generate", lambda **kw: calls.append(1) or generate(**kw))
    got = sequence_kd_dataset(
        teacher, tok, data, tmp_path / "cut", num_beams=1, max_length=6, batch_size=2, save_every=1
    )
    assert len(calls) == 2 and got["labels"] == want["labels"]  # the two batches left, nothing redone
    assert not (tmp_path / "cut" / "partial.json.gz").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_chunked_decoder_loss_trains_as_the_full_logits(family, tmp_path):
    """Encoder-decoders with a plain linear head (T5, EncoderDecoderModel) compute loss_ce and token KD from the
    decoder's last hidden states a chunk at a time, with the same update as their full logits; BART and Marian add
    final_logits_bias after the head and keep the full logits."""

    def one_update(chunked):
        trainer = make_trainer(
            family,
            tmp_path / f"{family}-{chunked}",
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            max_grad_norm=0,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            chunked_lm_loss=chunked,
            lm_chunk_tokens=3,
        )
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        start = copy.deepcopy(trainer.model.state_dict())
        trainer.train()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        head_pass = trainer.objective("loss_kd").head_pass
        return {k: v - start[k] for k, v in trainer.model.state_dict().items()}, log, head_pass

    (got, got_log, head_pass), (want, want_log, _) = one_update(True), one_update(False)
    assert (head_pass is not None) == (family in ("t5", "bert2bert"))
    largest = max(d.abs().max().item() for d in want.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4 * largest, rtol=1e-4, msg=key)
    # the KL of two random models (~1e-2) is a sum of differences of log-probabilities: its float32 rounding is
    # absolute (~1e-7), not relative to its value
    for key in ("loss", "loss_ce", "loss_kd"):
        assert got_log[key] == pytest.approx(want_log[key], rel=1e-5, abs=1e-6), key
