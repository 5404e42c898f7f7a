"""The private ``transformers.Trainer`` methods our trainers override, and what each override relies on.

No public hook does these jobs (docs/internals.md, "Overrides of private Trainer methods" says why, one by one),
so each contract is pinned here, signature and behaviour, on a plain ``Trainer``: a transformers release that
renames one, changes its arguments or stops calling it where we expect fails this file instead of silently
switching our override off.
"""

import inspect
from pathlib import Path

import torch
from conftest import tiny_classifier
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainingArguments

#: method -> its parameters, as our overrides call and receive them
PRIVATE = {
    "_save_checkpoint": ["self", "model", "trial"],  # CheckpointMixin, SaveGuardMixin
    "_save": ["self", "output_dir", "state_dict"],  # CheckpointMixin
    "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],  # CheckpointMixin
    "_get_eval_sampler": ["self", "eval_dataset"],  # InOrderEvaluationMixin
    "_set_signature_columns_if_needed": ["self"],  # DistillTrainer
}


def test_the_private_methods_we_override_keep_their_signatures():
    for name, params in PRIVATE.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, name


ROWS = [{"input_ids": [101, 7 + i, 9, 102], "attention_mask": [1] * 4, "labels": i % 2, "extra": i} for i in range(8)]


class Recording(Trainer):
    """A plain Trainer that records when the private methods are called, and with what."""

    def __init__(self, *args, **kwargs):
        self.calls = []
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self.calls.append(("_save_checkpoint", self.state.global_step))
        self.in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.in_checkpoint = False

    def _save(self, output_dir=None, state_dict=None):
        self.calls.append(("_save", output_dir, state_dict is None, getattr(self, "in_checkpoint", False)))
        super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.calls.append(("_load_from_checkpoint", resume_from_checkpoint))
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_eval_sampler(self, eval_dataset):
        self.calls.append(("_get_eval_sampler", len(eval_dataset)))
        return SequentialSampler(eval_dataset)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "extra" not in self._signature_columns:
            self._signature_columns.append("extra")
        self.calls.append(("_set_signature_columns_if_needed",))


def recording(out: Path, **overrides) -> Recording:
    args = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        save_strategy="steps", save_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    args.update(overrides)
    data = Dataset.from_list(ROWS)
    return Recording(model=tiny_classifier(0), args=TrainingArguments(**args), train_dataset=data, eval_dataset=data)


def test_checkpoint_saves_go_through_save_checkpoint_then_save_into_the_step_folder(tmp_path):
    """``_save_checkpoint`` runs at every save step and writes ``output_dir/checkpoint-<global_step>`` (the folder
    SaveGuardMixin names when the disk fills); it saves the weights through ``_save`` (CheckpointMixin keeps the
    hidden-state projection in checkpoints only); ``save_model`` calls ``_save`` with no state dict (it leaves the
    projection out of the export)."""
    trainer = recording(tmp_path)
    trainer.train()
    saves = [c for c in trainer.calls if c[0] == "_save_checkpoint"]
    assert saves == [("_save_checkpoint", 1), ("_save_checkpoint", 2)]
    assert (tmp_path / "checkpoint-1" / "model.safetensors").exists() and (tmp_path / "checkpoint-2").is_dir()
    inside = [c for c in trainer.calls if c[0] == "_save" and c[3]]
    assert [Path(c[1]).name for c in inside] == ["checkpoint-1", "checkpoint-2"] and all(c[2] for c in inside)
    trainer.calls.clear()
    trainer.save_model(str(tmp_path / "export"))
    assert trainer.calls == [("_save", str(tmp_path / "export"), True, False)]


def test_resuming_loads_the_checkpoint_through_load_from_checkpoint(tmp_path):
    """``train(resume_from_checkpoint=folder)`` hands the folder to ``_load_from_checkpoint`` (where
    CheckpointMixin checks that the checkpoint fits the student) before training on."""
    recording(tmp_path).train()
    trainer = recording(tmp_path, max_steps=3)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    loads = [c for c in trainer.calls if c[0] == "_load_from_checkpoint"]
    assert loads == [("_load_from_checkpoint", str(tmp_path / "checkpoint-2"))]
    assert trainer.state.global_step == 3


def test_evaluation_takes_its_sampler_from_get_eval_sampler(tmp_path):
    """``get_eval_dataloader`` asks ``_get_eval_sampler`` for the evaluation order (InOrderEvaluationMixin makes
    it the dataset's order under group_by_length) and uses what it returns."""
    trainer = recording(tmp_path)
    loader = trainer.get_eval_dataloader()
    assert ("_get_eval_sampler", len(ROWS)) in trainer.calls and isinstance(loader.sampler, SequentialSampler)


def test_signature_columns_decide_which_dataset_columns_reach_the_batch(tmp_path):
    """``_set_signature_columns_if_needed`` fills ``_signature_columns``, the columns kept when the dataset is
    stripped to what the model takes: DistillTrainer adds its own (``kd_mask``, the cache index) there."""
    trainer = recording(tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("_set_signature_columns_if_needed",) in trainer.calls
    assert "extra" in batch and torch.is_tensor(batch["extra"])
