"""Every encoder family the README lists, end to end through DistillTrainer on tiny random configs."""

import copy

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

from hf_attn_distill import (
    AttentionRecorder,
    DistillConfig,
    DistillTrainer,
    attention_kl_loss,
    attention_mse_loss,
    enable_attention_capture,
    find_attention_modules,
    group_teacher_heads,
    logit_kd_loss,
)

# initializer_range 0.2: attention far from uniform, so the transfer losses compared below are far from 0
COMMON = dict(
    vocab_size=500,
    hidden_size=32,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.2,
)


def bert_like(config_cls, model_cls, **extra):
    def build(layers, heads, seed):
        torch.manual_seed(seed)
        return model_cls(config_cls(num_hidden_layers=layers, num_attention_heads=heads, **COMMON, **extra))

    return build


def distilbert(layers, heads, seed):
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(
        DistilBertConfig(
            vocab_size=500,
            dim=32,
            hidden_dim=64,
            n_layers=layers,
            n_heads=heads,
            max_position_embeddings=64,
            initializer_range=0.2,
            dropout=0.0,
            attention_dropout=0.0,
        )
    )


def albert(layers, heads, seed):
    """One layer module shared by every depth."""
    torch.manual_seed(seed)
    return AlbertForSequenceClassification(
        AlbertConfig(embedding_size=16, num_hidden_layers=layers, num_attention_heads=heads, **COMMON)
    )


def modernbert(layers, heads, seed):
    """Global attention at layers 0 and 3, a 5-token sliding window (2 each side) at 1 and 2: shorter than the
    9-token batch, so the window is really applied."""
    torch.manual_seed(seed)
    config = ModernBertConfig(
        vocab_size=500,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=64,
        initializer_range=0.2,
        local_attention=4,
        global_attn_every_n_layers=3,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        cls_token_id=2,
        sep_token_id=3,
    )
    return ModernBertForSequenceClassification(config)


def deberta_v2(layers, heads, seed):
    """Disentangled attention computed in DeBERTa's own code (no AttentionInterface)."""
    torch.manual_seed(seed)
    return DebertaV2ForSequenceClassification(
        DebertaV2Config(num_hidden_layers=layers, num_attention_heads=heads, **COMMON)
    )


SUPPORTED = {
    "bert": bert_like(BertConfig, BertForSequenceClassification),
    "roberta": bert_like(RobertaConfig, RobertaForSequenceClassification),
    "distilbert": distilbert,
    "electra": bert_like(ElectraConfig, ElectraForSequenceClassification, embedding_size=32),
    "xlm-roberta": bert_like(XLMRobertaConfig, XLMRobertaForSequenceClassification),
    "albert": albert,
    "modernbert": modernbert,
    "deberta-v2": deberta_v2,
}
OWN_CODE = {"deberta-v2"}  # computes attention itself: no "sdpa"/"eager" switch, probabilities read at dropout


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


@pytest.mark.parametrize("teacher_side", [False, True], ids=["autograd", "inference"])
@pytest.mark.parametrize("family", list(SUPPORTED))
def test_capture_equals_eager_and_output_equals_sdpa(family, teacher_side):
    model = SUPPORTED[family](4, 4, 0).eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    sdpa_logits = model(**inputs).logits
    if family not in OWN_CODE:
        model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True).attentions
    assert len(eager) == 4
    if family not in OWN_CODE:
        enable_attention_capture(model)
    layers = find_attention_modules(model)
    assert [layer.heads for layer in layers] == [4] * 4
    recorder = AttentionRecorder([layers[i] for i in (1, 3)])
    mode = torch.inference_mode() if teacher_side else torch.enable_grad()
    with mode, recorder.record() as records:
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    valid = inputs["attention_mask"].bool()
    valid = (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(eager[1])
    for record, layer in zip(records, (1, 3)):
        torch.testing.assert_close(record.exp()[valid], eager[layer][valid], atol=1e-6, rtol=1e-5)


def test_modernbert_local_layers_keep_their_window():
    """The recorded attention of a local layer is zero outside the window and sums to one inside it."""
    model = modernbert(4, 4, 0).eval()
    enable_attention_capture(model)
    layers = find_attention_modules(model)
    with torch.no_grad(), AttentionRecorder([layers[1], layers[3]]).record() as records:
        model(input_ids=batch()["input_ids"][:1])
    local, global_ = records
    distance = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs()
    assert bool((local.exp()[..., distance > 2] < 1e-12).all())
    assert bool((global_.exp()[..., distance > 2] > 1e-6).all())


# ModernBERT: student layer 1 has a sliding window, so it maps to a sliding-window teacher layer (1 or 2)
LAYER_MAPS = {"modernbert": "0:0,1:2"}


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_distill_trainer_end_to_end(family, tmp_path):
    teacher, student = SUPPORTED[family](4, 4, 0), SUPPORTED[family](2, 2, 1)
    args = DistillConfig(
        layer_map=LAYER_MAPS.get(family, "uniform"),
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        learning_rate=1e-2,
        max_steps=3,
        per_device_train_batch_size=3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = [dict(zip(batch(), row)) for row in zip(*[v for v in batch().values()])]
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    # the trainer's attention term equals the reference KL on independently recorded attention (4 -> 2 heads)
    b = batch()
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(b))
    got = trainer.accounting.pop_means("eval")["loss_attn_enc"]
    s_rec = AttentionRecorder(trainer.transfers[0].student.layers)
    t_rec = AttentionRecorder(trainer.transfers[0].teacher.layers)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad(), t_rec.record() as t_att, s_rec.record() as s_att:
        teacher(**inputs)
        student(**inputs)
    want = [
        attention_kl_loss(s, group_teacher_heads(t, 2, "log_probs"), b["attention_mask"]) for s, t in zip(s_att, t_att)
    ]
    assert got > 1e-3 and got == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    before = copy.deepcopy(student.state_dict())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_attn_enc" in e]
    assert len(logs) == 3 and logs[0]["loss_attn_enc"] == pytest.approx(got, rel=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_deberta_probabilities_are_taken_before_dropout_with_their_gradient():
    """In training mode with attention dropout 0.5 the recorded probabilities are the eval-mode ones, and the
    gradient of a loss on them equals the gradient of the same loss on DeBERTa's own (dropout-free) attentions."""
    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(
        DebertaV2Config(num_hidden_layers=2, num_attention_heads=4, **{**COMMON, "attention_probs_dropout_prob": 0.5})
    )
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    layers = find_attention_modules(model)
    assert all(layer.probabilities is not None for layer in layers)
    model.eval()
    eager = model(**inputs, output_attentions=True).attentions[0]
    (weight := model.deberta.encoder.layer[0].attention.self.query_proj.weight).grad = None
    eager.clamp_min(torch.finfo(torch.float32).tiny).log().sum().backward()
    want_grad = weight.grad.clone()
    weight.grad = None
    model.train()
    with AttentionRecorder([layers[0]]).record() as records:
        model(**inputs)
    valid = inputs["attention_mask"].bool()[:, None, None, :].expand_as(eager)
    torch.testing.assert_close(records[0].exp()[valid], eager.detach()[valid], atol=1e-6, rtol=1e-5)
    records[0].sum().backward()
    torch.testing.assert_close(weight.grad, want_grad, atol=1e-5, rtol=1e-4)


def test_deberta_refuses_what_it_cannot_give(tmp_path):
    teacher, student = deberta_v2(4, 4, 0), SUPPORTED["bert"](2, 2, 1)

    def trainer(**kwargs):
        args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)
        return DistillTrainer(model=student, teacher_model=teacher, args=args)

    with pytest.raises(ValueError, match="pre-softmax scores cannot.*'kl' or 'mse_probs'"):
        trainer(attention_loss="mse_scores")
    with pytest.raises(ValueError, match="own code.*relation_weight=0"):
        trainer(relation_weight=1.0, attention_weight=0.0)
    assert trainer(attention_loss="mse_probs").transfers[0].teacher.probabilities[0] is not None


def test_albert_shared_layer_is_recorded_per_depth_and_refuses_checkpointing(tmp_path):
    teacher, student = albert(4, 4, 0), albert(2, 2, 1)
    layers = find_attention_modules(teacher)
    assert len({id(layer.module) for layer in layers}) == 1 and [layer.call for layer in layers] == [0, 1, 2, 3]
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="every depth.*gradient_checkpointing=False"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)


def test_modernbert_windowed_student_layer_needs_a_windowed_teacher_layer(tmp_path):
    """The default uniform map sends the student's sliding-window layer 1 to the teacher's global layer 3."""
    teacher, student = modernbert(4, 4, 0), modernbert(2, 2, 1)
    assert [layer.sliding_window for layer in find_attention_modules(teacher)] == [None, 3, 3, None]
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"student layer 1 \(sliding window 3\) to teacher layer 3.*'0:1,1:2'"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)


def test_modernbert_question_answering_head(tmp_path):
    """ModernBERT QA head: start/end logit KD and attention transfer on a local and a global layer."""
    from transformers import ModernBertForQuestionAnswering

    def qa(layers, seed):
        torch.manual_seed(seed)
        return ModernBertForQuestionAnswering(modernbert(layers, 4 if layers == 4 else 2, seed).config)

    teacher, student = qa(4, 0), qa(2, 1)
    b = batch()
    b = {**{k: b[k] for k in ("input_ids", "attention_mask")}, "start_positions": torch.tensor([1, 2, 0])}
    b["end_positions"] = torch.tensor([3, 4, 2])
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, layer_map="0:1,1:2")
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(b))
    got = trainer.accounting.pop_means("eval")
    inputs = {k: b[k] for k in ("input_ids", "attention_mask")}
    s_rec = AttentionRecorder(trainer.transfers[0].student.layers)
    t_rec = AttentionRecorder(trainer.transfers[0].teacher.layers)
    with torch.no_grad(), t_rec.record() as t_att, s_rec.record() as s_att:
        t_out, s_out = teacher(**inputs), student(**inputs)
    want = [
        attention_kl_loss(s, group_teacher_heads(t, 2, "log_probs"), b["attention_mask"]) for s, t in zip(s_att, t_att)
    ]
    assert got["loss_attn_enc"] == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    temperature, positions = args.temperature, b["attention_mask"]
    want_kd = [
        logit_kd_loss(getattr(s_out, k), getattr(t_out, k), temperature, class_mask=positions)
        for k in ("start_logits", "end_logits")
    ]
    assert got["loss_kd"] == pytest.approx(torch.stack(want_kd).mean().item(), rel=1e-5)
    assert got["loss_ce"] == pytest.approx(student(**b).loss.item(), rel=1e-5)


@pytest.mark.parametrize("loss", ["kl", "mse_probs"])
def test_deberta_teacher_with_a_bert_student(tmp_path, loss):
    """The term equals the reference loss on DeBERTa's own attentions (eval mode) and the student's eager ones."""
    torch.manual_seed(0)  # peaked teacher attention, so the KL is far from 0
    config = DebertaV2Config(num_hidden_layers=4, num_attention_heads=4, **{**COMMON, "initializer_range": 0.3})
    teacher, student = DebertaV2ForSequenceClassification(config).eval(), SUPPORTED["bert"](2, 2, 1)
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, attention_loss=loss)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    b = batch()
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(b))
    got = trainer.accounting.pop_means("eval")["loss_attn_enc"]
    trainer.capture.release()
    inputs = {k: v for k, v in b.items() if k != "labels"}
    student.set_attn_implementation("eager")
    with torch.no_grad():
        t_att = teacher(**inputs, output_attentions=True).attentions
        s_att = student(**inputs, output_attentions=True).attentions
    mask = b["attention_mask"]
    want = []
    for s, t in zip(s_att, (t_att[1], t_att[3])):  # "uniform" maps student layers 0, 1 to teacher layers 1, 3
        t = group_teacher_heads(t.clamp_min(torch.finfo(torch.float32).tiny).log(), 2, "log_probs")
        if loss == "kl":
            want.append(attention_kl_loss(s.clamp_min(torch.finfo(torch.float32).tiny).log(), t, mask))
        else:
            want.append(attention_mse_loss(s, t.exp(), mask))
    assert got > 1e-3 and got == pytest.approx(torch.stack(want).mean().item(), rel=1e-4)
