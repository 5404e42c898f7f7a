import copy

import numpy as np
import pytest
import torch
from conftest import tiny_classifier
from transformers import DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        max_steps=10,
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillConfig(**values)


def make_trainer(args, tokenizer, dataset, teacher=None, student=None, **kwargs):
    teacher = teacher if teacher is not None else tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
    teacher = copy.deepcopy(teacher)
    student = (
        student
        if student is not None
        else tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1)
    )
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )


def _series(history, key):
    return [entry[key] for entry in history if key in entry]


@pytest.mark.parametrize(
    "attention",
    [
        dict(attention_loss="kl"),
        dict(attention_loss="mse_scores"),
        # probability MSE is ~1e-3 in size: with CE and KD at full weight it is not what the student learns
        dict(attention_loss="mse_probs", alpha_ce=0.0, alpha_kd=0.0),
    ],
    ids=["kl", "mse_scores", "mse_probs-alone"],
)
def test_every_loss_term_decreases(tmp_path, tokenizer, sentiment_dataset, trained_teacher, attention):
    args = make_args(
        tmp_path, max_steps=40, logging_steps=10, learning_rate=3e-3, eval_strategy="steps", eval_steps=40, **attention
    )
    trainer = make_trainer(args, tokenizer, sentiment_dataset, teacher=trained_teacher)
    trainer.train()
    history = trainer.state.log_history
    trained = ("loss_attn_enc",) if args.alpha_ce == args.alpha_kd == 0 else ("loss_ce", "loss_kd", "loss_attn_enc")
    for key in trained:
        values = _series(history, key)
        assert len(values) == 4, (key, history)
        assert values[-1] < values[0] * 0.9, (key, values)
    # evaluation on the training set after training: its terms sit below the first training window's
    for key in trained:
        assert _series(history, f"eval_{key}")[-1] < _series(history, key)[0]


@pytest.mark.parametrize("loss", ["kl", "mse_scores", "mse_probs"])
def test_logged_loss_is_weighted_sum_of_logged_terms(tmp_path, tokenizer, sentiment_dataset, loss):
    args = make_args(
        tmp_path, max_steps=3, logging_steps=1, attention_loss=loss, alpha_ce=0.3, alpha_kd=0.6, attention_weight=2.0
    )
    trainer = make_trainer(args, tokenizer, sentiment_dataset)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss_ce" in e]
    assert len(logs) == 3
    for e in logs:
        assert e["loss"] == pytest.approx(0.3 * e["loss_ce"] + 0.6 * e["loss_kd"] + 2.0 * e["loss_attn_enc"], rel=1e-5)


def test_teacher_frozen_not_optimized_not_saved(tmp_path, tokenizer, sentiment_dataset):
    teacher = tiny_classifier(0, num_hidden_layers=4, initializer_range=0.2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = make_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = make_trainer(args, tokenizer, sentiment_dataset, teacher=teacher)
    trainer.train()
    assert not trainer.teacher_model.training
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    teacher_ids = {id(p) for p in trainer.teacher_model.parameters()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_ids & optimized
    for k, v in trainer.teacher_model.state_dict().items():
        assert torch.equal(v, before[k])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert set(saved) == set(trainer.model.state_dict())


def test_predictions_carry_no_attentions_or_hidden_states(tmp_path, tokenizer, sentiment_dataset):
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, output_hidden_states=True)
    trainer = make_trainer(make_args(tmp_path, max_steps=1), tokenizer, sentiment_dataset, student=student)
    output = trainer.predict(sentiment_dataset)
    assert isinstance(output.predictions, np.ndarray)
    assert output.predictions.shape == (len(sentiment_dataset), 2)
    for key in ("test_loss_ce", "test_loss_kd", "test_loss_attn_enc"):
        assert np.isfinite(output.metrics[key])
    # predict() leaves nothing behind that would skew the next evaluation
    first = trainer.evaluate()
    second = trainer.evaluate()
    for key in ("eval_loss_ce", "eval_loss_kd", "eval_loss_attn_enc"):
        assert first[key] == pytest.approx(second[key], rel=1e-6)
        assert first[key] == pytest.approx(output.metrics[key.replace("eval_", "test_")], rel=1e-5)


def _one_update(tmp_path, tokenizer, dataset, batch, accumulation):
    args = make_args(
        tmp_path / f"b{batch}ga{accumulation}",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        logging_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0,
    )
    trainer = make_trainer(args, tokenizer, dataset)
    trainer.train()
    return trainer.model.state_dict(), trainer.state.log_history[0]


def test_gradient_accumulation_matches_large_batch(tmp_path, tokenizer, sentiment_dataset):
    # rows of very different lengths, so micro-batches pad differently and hold different token counts
    dataset = sentiment_dataset.select(range(8))
    start = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2, initializer_range=0.1).state_dict()
    big, big_log = _one_update(tmp_path, tokenizer, dataset, batch=8, accumulation=1)
    small, small_log = _one_update(tmp_path, tokenizer, dataset, batch=4, accumulation=2)
    moved = max((big[k] - start[k]).abs().max().item() for k in big)
    assert moved > 1e-3  # the update is real
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-6, rtol=1e-4)
    for key in ("loss", "loss_ce", "loss_kd", "loss_attn_enc"):
        assert small_log[key] == pytest.approx(big_log[key], rel=1e-4)


def test_resume_from_checkpoint_continues_identically(tmp_path, tokenizer, sentiment_dataset):
    common = dict(max_steps=20, logging_steps=5, save_strategy="steps", save_steps=10)
    full = make_trainer(make_args(tmp_path / "full", **common), tokenizer, sentiment_dataset)
    full.train()
    resumed = make_trainer(make_args(tmp_path / "full", **common), tokenizer, sentiment_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    want = {e["step"]: e for e in full.state.log_history if "loss_kd" in e and e["step"] > 10}
    got = {e["step"]: e for e in resumed.state.log_history if "loss_kd" in e and e["step"] > 10}
    assert sorted(want) == sorted(got) == [15, 20]
    for step in want:
        for key in ("loss", "loss_ce", "loss_kd", "loss_attn_enc"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5), (step, key)


def test_head_grouping_trains_student_with_fewer_heads(tmp_path, tokenizer, sentiment_dataset):
    """8 teacher heads averaged in groups of 4 for a 2-head student: the term equals the reference loss on the
    grouped teacher attention, and training lowers it."""
    from hf_attn_distill import AttentionRecorder, attention_kl_loss, group_teacher_heads

    teacher = tiny_classifier(0, num_hidden_layers=4, num_attention_heads=8, hidden_size=64, initializer_range=0.2)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    args = make_args(tmp_path, max_steps=30, logging_steps=10, learning_rate=3e-3, alpha_ce=0.0, alpha_kd=0.0)
    trainer = make_trainer(args, tokenizer, sentiment_dataset, teacher, student)
    batch = trainer.data_collator([sentiment_dataset[i] for i in range(6)])
    with torch.no_grad():
        trainer.compute_loss(trainer.model.eval(), dict(batch))
    got = trainer.accounting.pop_means("eval")["loss_attn_enc"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    t_rec, s_rec = (
        AttentionRecorder(trainer.transfers[0].teacher.modules),
        AttentionRecorder(trainer.transfers[0].student.modules),
    )
    with torch.no_grad(), t_rec.record() as t_att, s_rec.record() as s_att:
        trainer.teacher_model(**inputs)
        trainer.model(**inputs)
    assert t_att[0].shape[1] == 8 and s_att[0].shape[1] == 2
    want = [
        attention_kl_loss(s, group_teacher_heads(t, 2, "log_probs"), batch["attention_mask"])
        for s, t in zip(s_att, t_att)
    ]
    assert got == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)
    trainer.train()
    values = _series(trainer.state.log_history, "loss_attn_enc")
    assert values[-1] < values[0] * 0.9, values


def test_logit_only_distillation_skips_attention(tmp_path, tokenizer, sentiment_dataset):
    trainer = make_trainer(make_args(tmp_path, max_steps=5, attention_weight=0), tokenizer, sentiment_dataset)
    trainer.train()
    assert trainer.model.config._attn_implementation == "sdpa"
    logged = [e for e in trainer.state.log_history if "loss" in e][0]
    assert "loss_attn_enc" not in logged and "loss_kd" in logged


# ---- bad inputs: clear errors at construction ----


@pytest.mark.parametrize(
    "teacher_kwargs, student_kwargs, args_kwargs, match",
    [
        (dict(vocab_size=1000), {}, {}, "vocab_size"),
        (dict(num_labels=3), {}, {}, "num_labels"),
        ({}, dict(num_attention_heads=8, hidden_size=32), {}, "divides 4.*relation_weight > 0"),
        (dict(num_attention_heads=4), dict(num_attention_heads=2), dict(head_grouping="strict"), "strict"),
        ({}, {}, dict(layer_map="0:7"), "out of range"),
        ({}, {}, dict(layer_map="5:1"), "out of range"),
    ],
)
def test_bad_pairs_raise_at_construction(
    tmp_path, tokenizer, sentiment_dataset, teacher_kwargs, student_kwargs, args_kwargs, match
):
    teacher = tiny_classifier(0, num_hidden_layers=4, **teacher_kwargs)
    student = tiny_classifier(1, num_hidden_layers=2, **{"num_attention_heads": 2, **student_kwargs})
    with pytest.raises(ValueError, match=match):
        make_trainer(make_args(tmp_path, **args_kwargs), tokenizer, sentiment_dataset, teacher, student)


def test_missing_labels_with_alpha_ce_names_fix(tmp_path, tokenizer, sentiment_dataset):
    unlabeled = sentiment_dataset.remove_columns(["labels"])
    trainer = make_trainer(make_args(tmp_path, max_steps=1), tokenizer, unlabeled)
    with pytest.raises(ValueError, match="alpha_ce=0"):
        trainer.train()
    ok = make_trainer(make_args(tmp_path, max_steps=2, alpha_ce=0), tokenizer, unlabeled)
    ok.train()


def test_wrong_args_type_and_missing_teacher(tmp_path, tokenizer, sentiment_dataset):
    from transformers import TrainingArguments

    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(TypeError, match="DistillConfig"):
        DistillTrainer(
            model=student,
            teacher_model=tiny_classifier(0),
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
        )
    with pytest.raises(ValueError, match="teacher_model is required"):
        DistillTrainer(model=student, args=make_args(tmp_path))


@pytest.mark.parametrize(
    "attention",
    [dict(attention_loss="kl"), dict(attention_loss="mse_scores"), dict(attention_loss="mse_probs")],
    ids=["kl", "mse_scores", "mse_probs"],
)
def test_trainer_attention_term_equals_standalone_losses(tmp_path, tokenizer, sentiment_dataset, attention):
    """The fused in-softmax loss, wired through the trainer (padding, 4 -> 2 head grouping, uniform map),
    equals the standalone loss functions applied to recorded attention."""
    from hf_attn_distill import AttentionRecorder, attention_kl_loss, attention_mse_loss, group_teacher_heads

    trainer = make_trainer(make_args(tmp_path, **attention), tokenizer, sentiment_dataset)
    batch = trainer.data_collator([sentiment_dataset[i] for i in range(6)])
    assert not bool(batch["attention_mask"].all())  # the batch has padding
    student = trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(student, dict(batch))
    got = trainer.accounting.pop_means("eval")["loss_attn_enc"]

    loss = trainer.args.attention_loss
    kind = "scores" if loss == "mse_scores" else "log_probs"
    s_rec = AttentionRecorder(trainer.transfers[0].student.modules, loss)
    t_rec = AttentionRecorder(trainer.transfers[0].teacher.modules, loss)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad(), t_rec.record() as t_att:
        trainer.teacher_model(**inputs)
    with torch.enable_grad(), s_rec.record() as s_att:  # the autograd path records full tensors
        student(**inputs)
    mask = batch["attention_mask"]
    want = []
    for s, t in zip(s_att, t_att):
        t = group_teacher_heads(t, s.shape[1], kind)
        if attention["attention_loss"] == "kl":
            want.append(attention_kl_loss(s, t, mask))
        elif kind == "scores":
            want.append(attention_mse_loss(s, t, mask))
        else:
            want.append(attention_mse_loss(s.exp(), t.exp(), mask))
    assert len(want) == 2 and got > 0
    assert got == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)


def test_teacher_loaded_from_folder_with_init_kwargs(tmp_path, tokenizer, sentiment_dataset):
    teacher = tiny_classifier(0, num_hidden_layers=4)
    teacher.save_pretrained(tmp_path / "teacher")
    args = make_args(tmp_path / "out", max_steps=1, teacher_model_init_kwargs={"dtype": "bfloat16"})
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    trainer = DistillTrainer(
        model=student,
        teacher_model=str(tmp_path / "teacher"),
        args=args,
        train_dataset=sentiment_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    assert trainer.teacher_model.dtype == torch.bfloat16 and not trainer.teacher_model.training
    loaded = trainer.teacher_model.float().state_dict()
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(loaded[key], value.to(torch.bfloat16).float())
    with pytest.raises(OSError):
        DistillTrainer(model=student, teacher_model=str(tmp_path / "missing"), args=args)


def test_eval_with_teacher_false_is_a_plain_student_evaluation(tmp_path, tokenizer, sentiment_dataset):
    from transformers import Trainer, TrainingArguments

    trainer = make_trainer(make_args(tmp_path, eval_with_teacher=False), tokenizer, sentiment_dataset)
    calls = []
    trainer.teacher_model.register_forward_hook(lambda *a: calls.append(1))
    metrics = trainer.evaluate()
    assert calls == []  # the teacher never ran
    plain = Trainer(
        model=trainer.model,
        args=TrainingArguments(
            output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True, per_device_eval_batch_size=8
        ),
        eval_dataset=sentiment_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)
    assert metrics["eval_loss_ce"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert "eval_loss_kd" not in metrics and "eval_loss_attn_enc" not in metrics
    trainer.args.eval_with_teacher = True
    assert "eval_loss_attn_enc" in trainer.evaluate() and calls
