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
    enable_attention_capture,
    find_attention_modules,
    group_teacher_heads,
)

COMMON = dict(
    vocab_size=500,
    hidden_size=32,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
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
            dropout=0.0,
            attention_dropout=0.0,
        )
    )


SUPPORTED = {
    "bert": bert_like(BertConfig, BertForSequenceClassification),
    "roberta": bert_like(RobertaConfig, RobertaForSequenceClassification),
    "distilbert": distilbert,
    "electra": bert_like(ElectraConfig, ElectraForSequenceClassification, embedding_size=32),
    "xlm-roberta": bert_like(XLMRobertaConfig, XLMRobertaForSequenceClassification),
}


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
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True).attentions
    enable_attention_capture(model)
    recorder = AttentionRecorder([find_attention_modules(model)[i] for i in (1, 3)])
    mode = torch.inference_mode() if teacher_side else torch.enable_grad()
    with mode, recorder.record() as records:
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    valid = inputs["attention_mask"].bool()[:, None, :, None].expand_as(eager[1])
    for record, layer in zip(records, (1, 3)):
        torch.testing.assert_close(record.exp()[valid], eager[layer][valid], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", list(SUPPORTED))
def test_distill_trainer_end_to_end(family, tmp_path):
    teacher, student = SUPPORTED[family](4, 4, 0), SUPPORTED[family](2, 2, 1)
    args = DistillConfig(
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
    s_rec = AttentionRecorder(trainer.transfers[0].student.modules)
    t_rec = AttentionRecorder(trainer.transfers[0].teacher.modules)
    inputs = {k: v for k, v in b.items() if k != "labels"}
    with torch.no_grad(), t_rec.record() as t_att, s_rec.record() as s_att:
        teacher(**inputs)
        student(**inputs)
    want = [
        attention_kl_loss(s, group_teacher_heads(t, 2, "log_probs"), b["attention_mask"]) for s, t in zip(s_att, t_att)
    ]
    assert got == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    before = copy.deepcopy(student.state_dict())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_attn_enc" in e]
    assert len(logs) == 3 and logs[0]["loss_attn_enc"] == pytest.approx(got, rel=1e-4)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_albert_shared_layers_get_a_clear_error(tmp_path):
    config = AlbertConfig(
        vocab_size=500,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
    )
    teacher, student = AlbertForSequenceClassification(config), AlbertForSequenceClassification(config)
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="shares one layer.*attention_weight=0"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)
    # logits-only distillation works
    DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, attention_weight=0),
    )


def test_deberta_v2_gets_a_clear_error(tmp_path):
    config = DebertaV2Config(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    teacher, student = DebertaV2ForSequenceClassification(config), DebertaV2ForSequenceClassification(config)
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="not through AttentionInterface.*attention_weight=0"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)
