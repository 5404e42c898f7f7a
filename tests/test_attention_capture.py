import contextlib

import pytest
import torch
from conftest import tiny_classifier

import hf_attn_distill.attention.fused as fused_transfer
from hf_attn_distill import AttentionRecorder, enable_attention_capture, find_attention_modules

# Recording with autograd (the student) and without (the teacher, computed block by block); the tiny
# block size makes the teacher path split heads across blocks.
GRAD_MODES = pytest.mark.parametrize("teacher_side", [False, True], ids=["autograd", "inference-blocks"])


def _mode(teacher_side, monkeypatch):
    if teacher_side:
        monkeypatch.setattr(fused_transfer, "BLOCK_ELEMENTS", 81 * 2)
        return torch.inference_mode()
    return contextlib.nullcontext()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@GRAD_MODES
def test_selective_capture_equals_eager_and_output_equals_sdpa(teacher_side, monkeypatch):
    model = tiny_classifier(0, num_hidden_layers=4).eval()
    inputs = _inputs()
    sdpa_logits = model(**inputs).logits  # default implementation is sdpa
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True)
    enable_attention_capture(model)
    modules = find_attention_modules(model)
    recorder = AttentionRecorder([modules[1], modules[3]])
    with _mode(teacher_side, monkeypatch), recorder.record() as records:
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    for record, layer in zip(records, (1, 3)):
        probs = record.exp()
        valid = inputs["attention_mask"].bool()[:, None, :, None].expand_as(probs)
        torch.testing.assert_close(probs[valid], eager.attentions[layer][valid], atol=1e-6, rtol=1e-5)
    # outside a recording nothing is kept and outputs are still sdpa's
    torch.testing.assert_close(model(**inputs).logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    assert all(not p.active for p in recorder.points) and all(s.records is None for s in recorder.slots)


def test_capture_is_pre_dropout_in_training_mode():
    model = tiny_classifier(0, num_hidden_layers=2, attention_probs_dropout_prob=0.5)
    inputs = _inputs()
    model.set_attn_implementation("eager")
    reference = model.eval()(**inputs, output_attentions=True).attentions[0]
    torch.manual_seed(1)
    post_dropout = model.train()(**inputs, output_attentions=True).attentions[0]
    assert not torch.allclose(post_dropout, reference)  # eager in training mode returns post-dropout probs
    enable_attention_capture(model)
    recorder = AttentionRecorder([find_attention_modules(model)[0]])
    with recorder.record() as records:
        model.train()(**inputs)
    valid = inputs["attention_mask"].bool()[:, None, :, None].expand_as(reference)
    torch.testing.assert_close(records[0].exp()[valid], reference[valid], atol=1e-6, rtol=1e-5)


@GRAD_MODES
def test_record_scores_kind_gives_raw_pre_softmax_scores(teacher_side, monkeypatch):
    model = tiny_classifier(0, num_hidden_layers=2).eval()
    inputs = _inputs()
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True).attentions[0]
    enable_attention_capture(model)
    with (
        _mode(teacher_side, monkeypatch),
        AttentionRecorder([find_attention_modules(model)[0]], "mse_scores").record() as scores,
    ):
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert scores[0].shape == (3, 4, 9, 9)
    key_mask = inputs["attention_mask"].bool()[:, None, None, :]
    probs = torch.softmax(scores[0].masked_fill(~key_mask, float("-inf")), -1)
    valid = inputs["attention_mask"].bool()[:, None, :, None].expand_as(probs)
    torch.testing.assert_close(probs[valid], eager[valid], atol=1e-6, rtol=1e-5)
    assert scores[0][2, :, :, 3:].abs().max() < 100  # raw scores: padding is not baked in


def test_padding_mask_is_applied():
    model = tiny_classifier(0, num_hidden_layers=1).eval()
    enable_attention_capture(model)
    inputs = _inputs()
    with AttentionRecorder(find_attention_modules(model)).record() as records:
        model(**inputs)
    probs = records[0].exp()
    assert probs[2, :, :, 3:].abs().max() < 1e-12  # padded keys get no attention
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_recorder_reports_modules_that_never_ran():
    model = tiny_classifier(0, num_hidden_layers=2).eval()
    other = tiny_classifier(1, num_hidden_layers=2).eval()
    enable_attention_capture(model)
    with pytest.raises(RuntimeError, match="not called"):
        with AttentionRecorder(find_attention_modules(other)).record():
            model(**_inputs())


def test_model_without_attention_interface_is_rejected():
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    model = DebertaV2ForSequenceClassification(
        DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="not through AttentionInterface.*attention_weight=0"):
        enable_attention_capture(model)


def test_saved_config_keeps_default_implementation(tmp_path):
    from transformers import BertForSequenceClassification

    model = tiny_classifier(0, num_hidden_layers=1)
    enable_attention_capture(model)
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"


@GRAD_MODES
def test_causal_attention_without_padding_mask(teacher_side, monkeypatch):
    model = tiny_classifier(0, num_hidden_layers=2, is_decoder=True).eval()
    ids = _inputs()["input_ids"]
    model.set_attn_implementation("eager")
    eager = model(input_ids=ids, output_attentions=True).attentions[1]
    enable_attention_capture(model)
    with _mode(teacher_side, monkeypatch), AttentionRecorder([find_attention_modules(model)[1]]).record() as records:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    probs = records[0].exp()
    torch.testing.assert_close(probs, eager, atol=1e-6, rtol=1e-5)
    assert probs[..., 0, 1:].abs().max() < 1e-12  # the first query sees only itself


@GRAD_MODES
def test_t5_position_bias_is_honoured(teacher_side, monkeypatch):
    """T5 passes its relative position bias as a kwarg; recorded layers add it exactly as sdpa/eager do."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=100, d_model=32, d_kv=8, num_layers=2, num_heads=4, d_ff=64, dropout_rate=0.0)
    ).eval()
    inputs = {
        "input_ids": torch.randint(2, 100, (2, 7)),
        "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
        "decoder_input_ids": torch.randint(2, 100, (2, 5)),
    }
    sdpa_logits = model(**inputs).logits
    model.set_attn_implementation("eager")
    eager = model(**inputs, output_attentions=True)
    enable_attention_capture(model)
    modules = [
        model.encoder.block[1].layer[0].SelfAttention,
        model.decoder.block[0].layer[0].SelfAttention,
        model.decoder.block[1].layer[1].EncDecAttention,
    ]
    with _mode(teacher_side, monkeypatch), AttentionRecorder(modules).record() as records:
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    enc_valid = inputs["attention_mask"].bool()[:, None, :, None].expand_as(eager.encoder_attentions[1])
    torch.testing.assert_close(
        records[0].exp()[enc_valid], eager.encoder_attentions[1][enc_valid], atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(records[1].exp(), eager.decoder_attentions[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(records[2].exp(), eager.cross_attentions[1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["softcap", "s_aux", "sinks"])
def test_unsupported_attention_kwargs_are_refused_not_dropped(name):
    from hf_attn_distill.attention.capture import recording_attention_forward

    model = tiny_classifier(0, num_hidden_layers=1).eval()
    module = find_attention_modules(model)[0].module
    q = k = v = torch.randn(1, 4, 3, 8)
    value = {"softcap": 30.0, "s_aux": torch.zeros(4), "sinks": torch.zeros(4)}[name]
    recorder = AttentionRecorder([module])
    recorder.start()
    try:
        with pytest.raises(NotImplementedError, match=f"{name}.*attention_weight=0"):
            recording_attention_forward(module, q, k, v, None, **{name: value})
    finally:
        recorder.stop()
    # modules outside a recording behave as sdpa, which handles or ignores these exactly as "sdpa" does
    out, _ = recording_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2))
