"""Non-finite values stop training at the step they appear, naming the source (teacher outputs or a student
term) and the teacher's dtype; without the check, the logged loss shows nan, never 0."""

import time

import pytest
import torch
from conftest import tiny_classifier
from datasets import Dataset

from hf_attn_distill import DistillConfig, DistillTrainer, NonFiniteError

ROWS = [{"input_ids": [101, 7 + i, 9 + i % 5, 102], "attention_mask": [1] * 4, "labels": i % 2} for i in range(32)]


def trainer(out, teacher=None, student=None, **overrides):
    args = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, report_to="none", use_cpu=True,
        logging_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="no", disable_tqdm=True,
        attention_weight=1.0,
    )  # fmt: skip
    args.update(overrides)
    return DistillTrainer(
        model=student if student is not None else tiny_classifier(1, num_hidden_layers=2),
        teacher_model=teacher if teacher is not None else tiny_classifier(0),
        args=DistillConfig(**args),
        train_dataset=Dataset.from_list(ROWS),
    )


def nan_logits_from_call(teacher, first_bad_call: int):
    """A forward hook that makes the teacher's logits NaN from its ``first_bad_call``-th forward on (1-based)."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) >= first_bad_call:
            output.logits = torch.full_like(output.logits, float("nan"))
        return output

    return teacher.register_forward_hook(hook)


def test_a_teacher_whose_logits_are_nan_stops_training_at_that_step_naming_it(tmp_path):
    """The fp16-overflow case of issue reports: the teacher's classifier outputs NaN. Training stops at the step it
    appears (step 3 here), naming the teacher's logits, its dtype and the fixes; that step's update is not applied,
    so the student holds the weights of step 2 exactly."""
    teacher = tiny_classifier(0)
    run = trainer(tmp_path / "nan", teacher=teacher)
    nan_logits_from_call(teacher, 3)  # counting training forwards only (the trainer probes the models when built)
    reference = trainer(tmp_path / "ok", max_steps=2)
    reference.train()
    with pytest.raises(NonFiniteError) as caught:
        run.train()
    message = str(caught.value)
    assert "at step 3 in the teacher's outputs (teacher logits; the teacher runs in float32)" in message
    assert "loss_kd" in message and "teacher_dtype='float32' / 'bfloat16'" in message
    assert "Nothing of that step was applied" in message and "nonfinite_check=False" in message
    for (name, got), want in zip(run.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert run.capture.attached is False  # what the trainer attached is taken off, as after any failed train()


def test_a_student_term_that_goes_nan_is_named_as_the_students(tmp_path):
    student = tiny_classifier(1, num_hidden_layers=2)
    with torch.no_grad():
        student.bert.encoder.layer[1].attention.self.query.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as caught:
        trainer(tmp_path / "s", student=student).train()
    message = str(caught.value)
    assert "at step 1 in " in message and "computed from the student's outputs (the teacher's were finite" in message
    assert "loss_attn_enc" in message and "teacher logits" not in message


def test_on_an_accelerator_the_flags_are_read_at_the_next_log_with_the_step_they_appeared(tmp_path):
    """Where reading a flag would synchronise (CUDA), the check waits for the next training log (every 4 steps
    here) and still names the step the values appeared at; here immediate=False stands in for the device."""
    teacher = tiny_classifier(0)
    run = trainer(tmp_path / "deferred", teacher=teacher, logging_steps=4, max_steps=6)
    nan_logits_from_call(teacher, 2)
    run.nonfinite.immediate = False
    seen = []
    run.add_callback(type("Steps", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: seen.append(state.global_step)
    })())  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"at step 2 in the teacher's outputs.*The steps since were applied"):
        run.train()
    assert seen == [1, 2, 3, 4]  # it went on to the log at step 4, where it stopped


def test_without_the_check_training_goes_on_as_transformers_does_and_the_log_shows_nan_not_0(tmp_path):
    teacher = tiny_classifier(0)
    nan_logits_from_call(teacher, 1)
    run = trainer(tmp_path / "off", teacher=teacher, nonfinite_check=False)
    run.train()
    losses = [entry["loss"] for entry in run.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(loss != loss for loss in losses)  # nan, where transformers alone logs 0
    assert not torch.isfinite(run.model.classifier.weight).all()  # the non-finite updates were applied


def test_the_check_costs_under_one_percent_of_a_step(tmp_path):
    """The check of one step (every teacher output and term) against that step, for a MiniLM-sized pair at 128
    tokens, batch 8, in the same process (median of repeated runs)."""
    torch.manual_seed(0)
    size = dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512)
    rows = [
        {"input_ids": [101] + [1000 + (i * 7 + j) % 5000 for j in range(126)] + [102], "labels": i % 2}
        for i in range(64)
    ]
    run = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=3, **size),
        teacher_model=tiny_classifier(0, num_hidden_layers=6, **size),
        args=DistillConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to="none",
                           use_cpu=True, save_strategy="no", disable_tqdm=True, attention_weight=1.0),
        train_dataset=Dataset.from_list(rows),
    )  # fmt: skip
    batch = next(iter(run.get_train_dataloader()))
    captured = {}
    update = run.nonfinite.update
    run.nonfinite.update = lambda step, teacher_outputs, terms: (
        captured.update(step=step, teacher_outputs=teacher_outputs, terms=terms) or update(step, teacher_outputs, terms)
    )
    run.model.train()
    with run.attached():
        steps = []
        for _ in range(4):
            start = time.perf_counter()
            run.training_step(run.model, dict(batch))
            steps.append(time.perf_counter() - start)
    checks = []
    for _ in range(50):
        start = time.perf_counter()
        update(captured["step"], captured["teacher_outputs"], captured["terms"])
        checks.append(time.perf_counter() - start)
    step_s, check_s = sorted(steps)[len(steps) // 2], sorted(checks)[len(checks) // 2]
    assert check_s < 0.01 * step_s, (check_s, step_s)


@pytest.mark.parametrize("where", ["every position", "one position"])
def test_a_causal_teacher_whose_head_input_is_nan_is_named_under_the_chunked_lm_loss(tmp_path, where):
    """The chunked LM loss reads the teacher's last hidden states, not its logits: NaN there (at every position, or
    at one that is not the last, so its own last-position logits stay finite) stops training at that step naming the
    teacher's head input, not the student and not a head that transforms its logits."""
    from test_decoder_only import trainer_for

    run = trainer_for("llama", tmp_path, max_steps=2)
    assert run.args.chunked_lm_loss

    def hook(module, args, output):
        output = output.clone()
        output[:, 2 if where == "one position" else slice(None)] = float("nan")
        return output

    run.teacher_model.model.norm.register_forward_hook(hook)
    with pytest.raises(NonFiniteError) as caught:
        run.train()
    message = str(caught.value)
    assert "at step 1 in the teacher's outputs (" in message
    assert "teacher hidden states its output head reads" in message and "loss_kd" in message
    assert ("teacher logits" in message) == (where == "every position")
