"""Hidden-state transfer: the loss formulas by hand, the trainer's term against a recomputation, the
projection's life cycle (trains, checkpointed, restored on resume, left out of the exported student), and
exact gradient accumulation."""

import json

import pytest
import torch
from conftest import one_sgd_step, teacher_and_narrow_student, tiny_classifier
from safetensors.torch import load_file
from test_trainer_exactness import InOrderTrainer, uneven_dataset
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from hf_attn_distill import DistillConfig, DistillTrainer
from hf_attn_distill.losses import hidden_cosine_loss, hidden_mse_loss
from hf_attn_distill.terms.hidden import PROJECTION_NAME


def test_hidden_losses_by_hand_with_padding():
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])  # [B=1, T=3, D=2]; token 2 is padding
    teacher = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [-5.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # squared errors per token: (0 + 1) / 2 = 0.5 and (0 + 1) / 2 = 0.5 -> mean over 2 valid tokens
    assert hidden_mse_loss(student, teacher, mask).item() == pytest.approx(0.5)
    # cosines: (1*1 + 0*1) / (1 * sqrt 2) and (0 + 2) / (2 * 1) = 1
    assert hidden_cosine_loss(student, teacher, mask).item() == pytest.approx(((1 - 2**-0.5) + 0.0) / 2)
    assert hidden_mse_loss(student, teacher).item() == pytest.approx((0.5 + 0.5 + (100 + 25) / 2) / 3)
    with pytest.raises(ValueError, match="same shape"):
        hidden_mse_loss(student[..., :1], teacher)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_term_equals_recomputation_through_the_projection(tmp_path, tokenizer, loss):
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        alpha_ce=0.0,
        alpha_kd=0.0,
        attention_weight=0.0,
        hidden_weight=2.0,
        hidden_loss=loss,
        layer_map="0:1,1:3",
    )
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=uneven_dataset(),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    projection = getattr(student, PROJECTION_NAME)
    assert (projection.in_features, projection.out_features) == (16, 32)
    batch = DataCollatorWithPadding(tokenizer)([uneven_dataset()[i] for i in (0, 4, 5)])
    loss_value = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        t_states = teacher(**batch, output_hidden_states=True).hidden_states
    s_states = student(**batch, output_hidden_states=True).hidden_states
    fn = hidden_mse_loss if loss == "mse" else hidden_cosine_loss
    mask = batch["attention_mask"]
    expected = torch.stack([fn(projection(s_states[s]), t_states[t], mask) for s, t in ((0, 0), (1, 2), (2, 4))])
    torch.testing.assert_close(loss_value, 2.0 * expected.mean())
    # evaluation reports the same term, unweighted, as eval_loss_hidden
    trainer.args.per_device_eval_batch_size = 3
    metrics = trainer.evaluate(uneven_dataset().select([0, 4, 5]))
    assert metrics["eval_loss_hidden"] == pytest.approx(expected.mean().item(), rel=1e-5)


def test_projection_trains_is_checkpointed_restored_and_not_exported(tmp_path, tokenizer):
    def run(output_dir, max_steps, resume=None):
        teacher, student = teacher_and_narrow_student()
        args = DistillConfig(
            output_dir=str(output_dir),
            report_to="none",
            use_cpu=True,
            hidden_weight=1.0,
            layer_map="uniform",
            attention_weight=0.0,
            per_device_train_batch_size=4,
            max_steps=max_steps,
            save_steps=2,
            logging_steps=1,
            learning_rate=1e-2,
            seed=0,
            disable_tqdm=True,
            data_seed=0,
        )
        trainer = InOrderTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=uneven_dataset(),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        start = getattr(student, PROJECTION_NAME).weight.detach().clone()
        trainer.train(resume_from_checkpoint=resume)
        return trainer, start

    full, start = run(tmp_path / "full", 4)
    projection = next(o.projection for o in full.objectives if o.name == "loss_hidden")
    assert not torch.equal(projection.weight, start)  # it trains with the student
    saved = load_file(tmp_path / "full" / "checkpoint-2" / "model.safetensors")
    assert any(k.startswith(PROJECTION_NAME) for k in saved)  # checkpoints keep it
    assert not hasattr(full.model, PROJECTION_NAME)  # taken off the student when training ends
    full.save_model(str(tmp_path / "export"))
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert not any(k.startswith(PROJECTION_NAME) for k in exported)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")  # loads as a plain student
    with full.attached():  # while attached (as during training), the export still leaves it out
        assert getattr(full.model, PROJECTION_NAME) is projection
        full.save_model(str(tmp_path / "export_attached"))
    assert load_file(tmp_path / "export_attached" / "model.safetensors").keys() == exported.keys()

    # a fresh trainer resumed from step 2 ends where the uninterrupted run did: the projection was restored
    resumed, resumed_start = run(tmp_path / "resumed", 4, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert torch.equal(resumed_start, start)
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)
    resumed_projection = next(o.projection for o in resumed.objectives if o.name == "loss_hidden")
    torch.testing.assert_close(resumed_projection.weight, projection.weight)
    logs = [
        json.loads((tmp_path / d / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
        for d in ("full", "resumed")
    ]
    assert [e["loss_hidden"] for e in logs[0] if "loss_hidden" in e] == pytest.approx(
        [e["loss_hidden"] for e in logs[1] if "loss_hidden" in e], rel=1e-5
    )


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_accumulation_equals_one_large_batch(tmp_path, tokenizer, loss):
    def update(batch, accumulation):
        teacher, student = teacher_and_narrow_student()
        args = DistillConfig(
            **one_sgd_step(tmp_path / f"{batch}x{accumulation}", batch, accumulation),
            hidden_weight=1.0,
            hidden_loss=loss,
            layer_map="uniform",
            attention_weight=0.0,
        )
        trainer = InOrderTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=uneven_dataset(),
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        start = {k: v.detach().clone() for k, v in student.state_dict().items()}
        trainer.train()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        with trainer.attached():  # the projection is taken off when training ends; compare it too
            return {k: v.detach() - start[k] for k, v in student.state_dict().items()}, log

    (big, log_big), (small, log_small) = update(8, 1), update(4, 2)
    largest = max(d.abs().max().item() for d in big.values())
    assert largest > 1e-5 and big[f"{PROJECTION_NAME}.weight"].abs().max() > 0
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-3 * largest, rtol=1e-3, msg=key)
    for key in ("loss", "loss_ce", "loss_kd", "loss_hidden"):
        assert log_small[key] == pytest.approx(log_big[key], rel=1e-5), key


def test_hidden_transfer_bad_settings_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="hidden_loss must be one of"):
        DistillConfig(output_dir=str(tmp_path), hidden_weight=1.0, hidden_loss="l1", report_to="none")
    with pytest.raises(ValueError, match="needs a layer map"):
        DistillConfig(output_dir=str(tmp_path), hidden_weight=1.0, layer_map="none", report_to="none")
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path),
        hidden_weight=1.0,
        hidden_layer_map="0:7",
        attention_weight=0.0,
        report_to="none",
        use_cpu=True,
    )
    with pytest.raises(ValueError, match="hidden_layer_map: .*out of range"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)


def test_projection_follows_the_student_dtype(tmp_path, tokenizer):
    teacher, student = teacher_and_narrow_student()
    student = student.to(torch.bfloat16)
    args = DistillConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, hidden_weight=1.0, attention_weight=0.0
    )
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args)
    assert getattr(student, PROJECTION_NAME).weight.dtype == torch.bfloat16
    # the projection runs outside the DDP-wrapped forward; the caller's arguments stay as given
    assert trainer.args.ddp_find_unused_parameters is False and args.ddp_find_unused_parameters is None
    batch = dict(DataCollatorWithPadding(tokenizer)([uneven_dataset()[i] for i in (0, 4)]))
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    assert getattr(student, PROJECTION_NAME).weight.grad is not None


def test_find_unused_parameters_with_the_projection_is_refused(tmp_path):
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        hidden_weight=1.0,
        attention_weight=0.0,
        ddp_find_unused_parameters=True,
    )
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)


def test_hidden_only_training_under_ddp_is_refused(tmp_path, monkeypatch):
    # no CE/KD: the output head gets no gradient, which DDP without find_unused_parameters fails on mid-training
    monkeypatch.setattr(DistillConfig, "world_size", property(lambda self: 2))
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        hidden_weight=1.0,
        attention_weight=0.0,
        alpha_ce=0.0,
        alpha_kd=0.0,
    )
    with pytest.raises(ValueError, match="keep alpha_kd or alpha_ce > 0 in multi-process training"):
        DistillTrainer(model=student, teacher_model=teacher, args=args)


def test_a_projection_from_another_teacher_is_refused_or_dropped(tmp_path):
    teacher, student = teacher_and_narrow_student()
    args = DistillConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, hidden_weight=1.0, attention_weight=0.0, alpha_kd=0.0
    )
    DistillTrainer(model=student, teacher_model=teacher, args=args)  # attaches 16 -> 32
    wider = tiny_classifier(2, num_hidden_layers=2, hidden_size=48, num_attention_heads=4, intermediate_size=32)
    with pytest.raises(ValueError, match=r"projection 16 -> 32 from another teacher, but this pair needs 16 -> 48"):
        DistillTrainer(model=student, teacher_model=wider, args=args)
    same_width = tiny_classifier(3, num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    trainer = DistillTrainer(model=student, teacher_model=same_width, args=args)
    assert not hasattr(student, PROJECTION_NAME) and trainer.objective("loss_hidden").projection is None
    assert not any(PROJECTION_NAME in name for name, _ in student.named_parameters())
