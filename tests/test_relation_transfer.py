"""MiniLM / MiniLMv2 self-attention relation transfer: the formula by hand, the trainer's term against a
recomputation from the models' own projections (student and teacher of different width and head count),
exact gradient accumulation, gradient checkpointing, and errors that name the fix."""

import math

import pytest
import torch
from conftest import one_sgd_step, teacher_and_narrow_student
from test_trainer_exactness import InOrderTrainer, uneven_dataset
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer
from hf_attn_distill.losses import relation_kl_loss, self_relation_log_probs
from hf_attn_distill.terms.relation import state_widths


def _reference_relation_kl(student, teacher, heads, mask):
    """Loops over batch, head and valid row: KL(softmax_t || softmax_s) over valid keys."""
    total, rows = 0.0, 0
    for b in range(student.shape[0]):
        valid = [i for i in range(student.shape[1]) if mask[b, i]]
        for h in range(heads):
            s = student[b, valid].chunk(heads, dim=-1)[h]
            t = teacher[b, valid].chunk(heads, dim=-1)[h]
            p_s = torch.softmax(s @ s.T / math.sqrt(s.shape[-1]), -1)
            p_t = torch.softmax(t @ t.T / math.sqrt(t.shape[-1]), -1)
            total += (p_t * (p_t.log() - p_s.log())).sum().item()
            rows += len(valid)
    return total / rows


def test_relation_kl_by_hand_with_other_widths_and_padding():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 12, generator=g)  # widths 6 vs 12
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = relation_kl_loss(student, teacher, 3, mask)
    assert got.item() == pytest.approx(_reference_relation_kl(student, teacher, 3, mask), rel=1e-5)
    assert relation_kl_loss(teacher, teacher, 3, mask).item() == pytest.approx(0.0, abs=1e-6)
    log_p = self_relation_log_probs(student, 3, mask)
    assert log_p.shape == (2, 3, 5, 5) and log_p[1, :, :, 3:].exp().max() == 0  # padded keys get no probability
    with pytest.raises(ValueError, match="cannot be split into 4 relation heads"):
        self_relation_log_probs(student, 4)


@pytest.mark.parametrize("kinds", ["qq,kk,vv", "vv"])
def test_term_equals_recomputation_from_the_projections(tmp_path, tokenizer, kinds):
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        alpha_ce=0.0,
        alpha_kd=0.0,
        attention_weight=0.0,
        relation_weight=3.0,
        relation_kinds=kinds,
        relation_heads=2,
        relation_teacher_layer=2,
        relation_student_layer=-1,
    )
    args.per_device_eval_batch_size = 3
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        eval_dataset=uneven_dataset().select([0, 4, 5]),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    batch = dict(DataCollatorWithPadding(tokenizer)([uneven_dataset()[i] for i in (0, 4, 5)]))
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        t_input = teacher(**batch, output_hidden_states=True).hidden_states[2]  # input of teacher layer 2
        s_input = student(**batch, output_hidden_states=True).hidden_states[1]  # input of student layer 1 (last)
        t_attn, s_attn = teacher.bert.encoder.layer[2].attention.self, student.bert.encoder.layer[1].attention.self
        names = {"qq": "query", "kk": "key", "vv": "value"}
        mask = batch["attention_mask"]
        expected = [
            _reference_relation_kl(getattr(s_attn, names[k])(s_input), getattr(t_attn, names[k])(t_input), 2, mask)
            for k in kinds.split(",")
        ]
    assert loss.item() == pytest.approx(3.0 * sum(expected) / len(expected), rel=1e-4)
    # evaluation reports the same term, unweighted, as eval_loss_relation
    assert trainer.evaluate()["eval_loss_relation"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def _update(tmp_path, tokenizer, batch, accumulation, **overrides):
    teacher, student = teacher_and_narrow_student()
    values = dict(
        **one_sgd_step(tmp_path / f"{batch}x{accumulation}{sorted(overrides)}", batch, accumulation),
        relation_weight=1.0,
        relation_heads=2,
        attention_weight=0.0,
    )
    values.update(overrides)
    trainer = InOrderTrainer(
        model=student,
        teacher_model=teacher,
        args=DistillConfig(**values),
        train_dataset=uneven_dataset(),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    start = {k: v.detach().clone() for k, v in student.state_dict().items()}
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return {k: v.detach() - start[k] for k, v in student.state_dict().items()}, log


def _assert_same(a, b):
    (delta_a, log_a), (delta_b, log_b) = a, b
    largest = max(d.abs().max().item() for d in delta_a.values())
    assert largest > 1e-5
    for key in delta_a:
        torch.testing.assert_close(delta_b[key], delta_a[key], atol=1e-3 * largest, rtol=1e-3, msg=key)
    assert "loss_relation" in log_a
    for key in ("loss", "loss_ce", "loss_kd", "loss_relation"):
        if key in log_a:
            assert log_b[key] == pytest.approx(log_a[key], rel=1e-5), key


def test_accumulation_equals_one_large_batch(tmp_path, tokenizer):
    _assert_same(_update(tmp_path, tokenizer, 8, 1), _update(tmp_path, tokenizer, 4, 2))


def test_gradient_checkpointing_gives_the_same_update(tmp_path, tokenizer):
    plain = _update(tmp_path, tokenizer, 8, 1, alpha_ce=0.0, alpha_kd=0.0)
    checkpointed = _update(
        tmp_path,
        tokenizer,
        8,
        1,
        alpha_ce=0.0,
        alpha_kd=0.0,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": False},
    )
    _assert_same(plain, checkpointed)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"relation_heads": 3}, r"must divide the width of the qq relation's states in both the student \(16\)"),
        ({"relation_teacher_layer": 4}, "relation_teacher_layer=4 is out of range"),
        ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant"),
        (
            {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
            "use_reentrant",
        ),
    ],
)
def test_bad_relation_settings_name_the_fix(tmp_path, overrides, match):
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, relation_weight=1.0, attention_weight=0.0, **overrides
    )
    with pytest.raises(ValueError, match=match):
        DistillTrainer(model=student, teacher_model=teacher, args=args)


def test_bad_relation_kinds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="relation_kinds must be"):
        DistillConfig(output_dir=str(tmp_path), report_to="none", relation_weight=1.0, relation_kinds="qk")


def test_state_widths_follow_head_dim_and_grouped_query_attention():
    from transformers import BertConfig, LlamaConfig

    assert state_widths(BertConfig(hidden_size=384, num_attention_heads=12)) == {"qq": 384, "kk": 384, "vv": 384}
    gqa = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=48)
    assert state_widths(gqa) == {"qq": 8 * 48, "kk": 2 * 48, "vv": 2 * 48}


def test_relation_states_without_gradient_are_refused(tmp_path, tokenizer):
    # reentrant checkpointing switched on on the model itself, where DistillConfig cannot see it
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, relation_weight=1.0, attention_weight=0.0
    )
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    student.train()
    batch = dict(DataCollatorWithPadding(tokenizer)([uneven_dataset()[i] for i in (0, 4)]))
    with pytest.raises(RuntimeError, match="relation_student_layer=1 carry no gradient"):
        trainer.compute_loss(student, batch)


def test_relations_of_a_causal_lm_pair_with_other_query_and_key_value_heads(tmp_path):
    """Llama teacher (4 query, 2 key/value heads) and student (2 query, 1 key/value head): MiniLMv2 relations of the
    (rotated) queries, keys and values each attention layer hands its attention function, in 2 relation heads,
    equal the reference computed from the layers' own projections and rotary embedding."""
    from datasets import Dataset
    from test_decoder_only import collate, llama, rows
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    teacher, student = llama(4, 4, 0), llama(2, 2, 1)
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        alpha_ce=0.0,
        alpha_kd=0.0,
        attention_weight=0.0,
        relation_weight=1.0,
        relation_heads=2,
        relation_teacher_layer=2,
    )
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows()))
    batch = collate(rows()[:4])
    with torch.no_grad():
        loss = trainer.compute_loss(student.eval(), dict(batch))

    def states(model, layer):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer]
        attention = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(hidden)
        positions = torch.arange(x.shape[1])[None]
        cos, sin = model.model.rotary_emb(x, positions)
        shape = (*x.shape[:2], -1, attention.head_dim)
        q = attention.q_proj(x).view(shape).transpose(1, 2)
        k = attention.k_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        v = attention.v_proj(x).view(shape).transpose(1, 2)
        return [s.transpose(1, 2).reshape(*x.shape[:2], -1) for s in (q, k, v)]

    with torch.no_grad():
        t_states, s_states = states(teacher, 2), states(student, 1)
    assert [s.shape[-1] for s in t_states] == [32, 16, 16] and [s.shape[-1] for s in s_states] == [32, 16, 16]
    mask = batch["attention_mask"]
    expected = [_reference_relation_kl(s, t, 2, mask) for s, t in zip(s_states, t_states)]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-4)
