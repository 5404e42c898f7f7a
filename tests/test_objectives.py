"""The objective protocol: a term added from outside (docs/adding_a_term.md) trains, logs and accumulates like
the built-in ones; accounting enters its cross-process sum on every process; training leaves the models as it
found them."""

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_classifier
from test_trainer_exactness import InOrderTrainer, exact_trainer, uneven_dataset
from transformers import DataCollatorWithPadding

from hf_attn_distill import OBJECTIVES, DistillConfig, DistillTrainer, Objective, TermSpec, register_term
from hf_attn_distill.attention.capture import ATTN_IMPLEMENTATION, POINT_ATTR
from hf_attn_distill.config import ATTENTION_SITES
from hf_attn_distill.terms.base import label_items
from hf_attn_distill.terms.hidden import PROJECTION_NAME
from hf_attn_distill.terms.registry import term_specs, unregister_term
from hf_attn_distill.training.accounting import TermAccounting


@dataclass
class MyConfig(DistillConfig):
    logit_mse_weight: float = field(default=0.0, metadata={"help": "Weight of loss_logit_mse (>= 0)."})


class LogitMSE(Objective):
    name, weight_field = "loss_logit_mse", "logit_mse_weight"
    specs = (TermSpec("loss_logit_mse", "logit_mse_weight", card="logit MSE", logits_only=True),)

    @classmethod
    def build(cls, student, teacher, args, capture):
        return [cls()] if args.logit_mse_weight > 0 else []

    def loss(self, step):
        student, teacher = step.outputs["logits"].float(), step.teacher_outputs["logits"].float()
        return (student - teacher).pow(2).mean(-1).mean()

    def count(self, inputs):
        return label_items(inputs)


@pytest.fixture(autouse=True, scope="module")
def registered():
    """The one registration call of docs/adding_a_term.md, taken back after this module's tests."""
    register_term(LogitMSE, config_class=MyConfig)
    yield
    unregister_term(LogitMSE)


def my_trainer(tmp_path, tokenizer, batch=8, accumulation=1, **overrides):
    return exact_trainer(
        tmp_path, tokenizer, batch, accumulation, InOrderTrainer, MyConfig, **{"logit_mse_weight": 0.7, **overrides}
    )


def test_a_term_added_from_outside_equals_its_recomputation_and_is_logged(tmp_path, tokenizer):
    trainer = my_trainer(tmp_path, tokenizer)
    assert [o.name for o in trainer.objectives] == ["loss_ce", "loss_kd", "loss_attn_enc", "loss_logit_mse"]
    batch = trainer.data_collator([uneven_dataset()[i] for i in range(8)])
    student, teacher = trainer.model.eval(), trainer.teacher_model
    with torch.no_grad():
        total = trainer.compute_loss(student, dict(batch))
        means = trainer.accounting.pop_means("eval")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = (student(**inputs).logits - teacher(**inputs).logits).pow(2).mean()
    assert means["loss_logit_mse"] == pytest.approx(want.item(), rel=1e-5)
    others = 0.5 * means["loss_ce"] + 0.5 * means["loss_kd"] + 1.0 * means["loss_attn_enc"]
    assert total.item() == pytest.approx(others + 0.7 * want.item(), rel=1e-5)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["loss_logit_mse"] > 0 and "eval_loss_logit_mse" in trainer.evaluate(uneven_dataset())
    trainer.create_model_card(model_name="student")  # the card reads the registry: the term and its weight
    card = (tmp_path / "b8ga1" / "README.md").read_text()
    assert "logit KD + attention transfer (kl; encoder) + logit MSE" in card and "| logit_mse_weight |" in card


def test_registration_is_checked_against_the_config_and_other_terms(tmp_path):
    @dataclass
    class Without(DistillConfig):
        pass

    class Misnamed(LogitMSE):
        specs = (TermSpec("loss_kd", "logit_mse_weight"),)

    with pytest.raises(ValueError, match=r"config fields \['logit_mse_weight'\] that Without does not have"):
        register_term(LogitMSE, config_class=Without)
    with pytest.raises(ValueError, match="loss_kd is already registered by LogitKD"):
        register_term(Misnamed, config_class=MyConfig)
    with pytest.raises(ValueError, match="declares no specs"):
        register_term(Objective)
    # a plain DistillConfig has no weight for the outside term: the trainer leaves it out, nothing fails
    assert "loss_logit_mse" not in DistillConfig(output_dir=str(tmp_path)).term_weight_fields
    assert "loss_logit_mse" in MyConfig(output_dir=str(tmp_path)).term_weight_fields


def test_a_term_added_from_outside_accumulates_exactly(tmp_path, tokenizer):
    def update(batch, accumulation):
        trainer = my_trainer(tmp_path, tokenizer, batch, accumulation, alpha_ce=0.0, alpha_kd=0.0, attention_weight=0.0)
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        return {k: v - start[k] for k, v in trainer.model.state_dict().items()}, log

    (big, log_big), (small, log_small) = update(8, 1), update(4, 2)
    largest = max(d.abs().max().item() for d in big.values())
    assert largest > 1e-5
    for key in big:
        torch.testing.assert_close(small[key], big[key], atol=1e-3 * largest, rtol=1e-3, msg=key)
    assert log_small["loss_logit_mse"] == pytest.approx(log_big["loss_logit_mse"], rel=1e-5)


def test_one_table_names_every_term_and_site():
    assert [s.term for s in ATTENTION_SITES] == ["loss_attn_enc", "loss_attn_dec", "loss_attn_cross"]
    weights = {spec.name: spec.weight_field for cls in OBJECTIVES for spec in cls.specs}
    assert {s.term: s.weight_field for s in ATTENTION_SITES}.items() <= weights.items()
    built_in = {
        "loss_ce": "alpha_ce",
        "loss_kd": "alpha_kd",
        "loss_hidden": "hidden_weight",
        "loss_relation": "relation_weight",
    }
    assert built_in.items() <= weights.items() and len(weights) == 7
    assert [s.name for s in term_specs()][:7] == list(weights)  # registered in OBJECTIVES' order
    assert DistillConfig(output_dir="o").term_weight_fields == weights


def test_pop_means_enters_the_cross_process_sum_on_a_process_with_nothing_to_sum():
    calls = []

    def summed(tensor):  # stands in for the all-gather: what a second process would add
        calls.append(tensor.shape)
        other = torch.zeros_like(tensor)
        other[0] = torch.tensor([2.0 * 4, 4.0, 1.0])  # the other process logged loss_ce = 2.0 over 4 items
        return tensor + other

    accounting = TermAccounting(
        [type("Ce", (), {"name": "loss_ce"})(), type("Kd", (), {"name": "loss_kd"})()],
        world_size=2,
        sum_across_processes=summed,
    )
    assert accounting.pop_means("train") == {"loss_ce": 2.0}  # nothing here, yet the sum ran and gave the other's
    assert calls == [torch.Size([2, 3])]
    accounting.add("train", {"loss_ce": torch.tensor(1.0)}, torch.tensor([4.0, 0.0]))
    assert accounting.pop_means("train") == {"loss_ce": pytest.approx((1.0 * 4 + 2.0 * 4) / 8)}
    assert len(calls) == 2


def test_training_leaves_the_models_as_they_were_except_the_student_weights(tmp_path, tokenizer):
    """Capture points, the recording attention implementation, the hidden-state projection and the teacher's
    output flags are taken off when training ends; the caller's arguments are not changed."""
    teacher = tiny_classifier(0, num_hidden_layers=4, hidden_size=48, num_attention_heads=4, initializer_range=0.2)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    teacher.config.output_hidden_states = True
    before = {
        name: (type(m), getattr(m, "config", None) and m.config._attn_implementation)
        for model in (teacher, student)
        for name, m in model.named_modules()
    }
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_names = [n for n, _ in student.named_parameters()]
    args = DistillConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        max_steps=2,
        save_strategy="no",
        per_device_train_batch_size=4,
        disable_tqdm=True,
        hidden_weight=1.0,
        relation_weight=1.0,
        attention_weight=0.0,
    )
    frozen = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=uneven_dataset(),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    assert student.config._attn_implementation == ATTN_IMPLEMENTATION and hasattr(student, PROJECTION_NAME)
    trainer.train()
    after = {
        name: (type(m), getattr(m, "config", None) and m.config._attn_implementation)
        for model in (teacher, student)
        for name, m in model.named_modules()
    }
    assert after == before
    assert not any(hasattr(m, POINT_ATTR) for model in (teacher, student) for m in model.modules())
    assert [n for n, _ in student.named_parameters()] == student_names  # no projection left
    assert teacher.config.output_hidden_states is True
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_weights[key])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(args)} == frozen  # trainer.args is a copy
    assert trainer.args.ddp_find_unused_parameters is False and args.ddp_find_unused_parameters is None
    # evaluation after training attaches again for its duration, and takes it off again
    metrics = trainer.evaluate(uneven_dataset())
    assert metrics["eval_loss_hidden"] > 0 and metrics["eval_loss_relation"] > 0
    assert not hasattr(student, PROJECTION_NAME) and student.config._attn_implementation == "sdpa"
    # so does compute_loss called on its own, with the same value as during evaluation
    batch = trainer.data_collator([uneven_dataset()[i] for i in range(8)])
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(batch))
    assert trainer.accounting.pop_means("eval")["loss_hidden"] > 0
    assert not hasattr(student, PROJECTION_NAME) and student.config._attn_implementation == "sdpa"


def test_a_weight_added_from_outside_is_checked_and_can_be_scheduled(tmp_path):
    with pytest.raises(ValueError, match="logit_mse_weight must be >= 0"):
        MyConfig(output_dir=str(tmp_path), logit_mse_weight=-1.0)
    only = MyConfig(output_dir=str(tmp_path), alpha_ce=0.0, alpha_kd=0.0, attention_weight=0.0, logit_mse_weight=1.0)
    assert only.term_is_on("loss_logit_mse")  # the only term that is on: not "nothing to train on"
    scheduled = MyConfig(output_dir=str(tmp_path), logit_mse_weight=1.0, schedules="logit_mse_weight=linear:0.0")
    assert scheduled.schedules == {"logit_mse_weight": "linear:0.0"}
    with pytest.raises(ValueError, match="Cannot schedule 'logit_mse_weight'"):
        DistillConfig(output_dir=str(tmp_path), schedules="logit_mse_weight=linear:0.0")


def test_pairing_checks_change_nothing(tmp_path):
    """check_distillation_pair learns each model's attention sites from one probe forward without gradients, and
    leaves both as they were: training mode, attention implementation, weights, nothing attached."""
    from hf_attn_distill import check_distillation_pair

    teacher = tiny_classifier(0, num_hidden_layers=4)
    student = tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2)
    teacher.train()
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled())) for m in (teacher, student)]
    before = [
        (m.training, m.config._attn_implementation, {k: v.clone() for k, v in m.state_dict().items()})
        for m in (teacher, student)
    ]
    check_distillation_pair(student, teacher, DistillConfig(output_dir=str(tmp_path), hidden_weight=1.0))
    for hook in hooks:
        hook.remove()
    assert calls == [False, False]
    for model, (training, implementation, state) in zip((teacher, student), before):
        assert model.training == training and model.config._attn_implementation == implementation
        assert not any(hasattr(m, POINT_ATTR) for m in model.modules())
        assert model.state_dict().keys() == state.keys()
