"""A training process killed with SIGKILL resumes to the same final weights and metrics as an uninterrupted run,
also when the kill lands inside a checkpoint save."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "kill_train.py"


def start(out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]


def kill_when_stalled(proc: subprocess.Popen) -> None:
    deadline = time.time() + 600
    for line in proc.stdout:
        if "STALLING" in line:
            break
        assert time.time() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, resumed_from",
    [("stall-after-step-5", 4), ("stall-in-save-6", 4)],
    ids=["killed-between-steps", "killed-inside-a-save"],
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, mode, resumed_from):
    from hf_attn_distill.training.checkpoints import checkpoint_is_complete, last_complete_checkpoint

    full = start(tmp_path / "full", "full")
    finish(full)
    run = tmp_path / "killed"
    kill_when_stalled(start(run, mode))
    if mode == "stall-in-save-6":
        assert (run / "checkpoint-6").is_dir() and not checkpoint_is_complete(run / "checkpoint-6")
    assert last_complete_checkpoint(run) == str(run / f"checkpoint-{resumed_from}")
    finish(start(run, "resume"))
    want, got = torch.load(tmp_path / "full" / "final_weights.pt"), torch.load(run / "final_weights.pt")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    want_m = json.loads((tmp_path / "full" / "final_metrics.json").read_text())
    got_m = json.loads((run / "final_metrics.json").read_text())
    for key in ("eval_loss", "eval_loss_ce", "eval_loss_kd", "eval_loss_attn_enc"):
        assert got_m[key] == pytest.approx(want_m[key], rel=1e-5), key


def test_an_incomplete_checkpoint_is_refused_by_name(tmp_path):
    from conftest import tiny_classifier

    from hf_attn_distill import DistillConfig, DistillTrainer

    broken = tmp_path / "checkpoint-6"
    broken.mkdir()
    (broken / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # cut short by a kill
    trainer = DistillTrainer(
        model=tiny_classifier(1, num_hidden_layers=2, num_attention_heads=2),
        teacher_model=tiny_classifier(0),
        args=DistillConfig(output_dir=str(tmp_path)),
    )
    with pytest.raises(ValueError, match="incomplete.*resume_from_checkpoint=True"):
        trainer.train(resume_from_checkpoint=str(broken))
    with pytest.raises(ValueError, match="No complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_from_the_command_line_strings(tmp_path):
    """``--resume_from_checkpoint true`` (a string) means the last complete checkpoint, as run_glue.py users
    expect; ``false`` a fresh start; a folder named ``true`` stays a folder."""
    from hf_attn_distill.training.checkpoints import resolve_resume

    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}" if complete else "{")
    assert resolve_resume("true", tmp_path) == resolve_resume("True", tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_resume("false", tmp_path) is None and resolve_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint-6 is incomplete"):
        resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)
    with pytest.raises(ValueError, match="No complete checkpoint"):
        resolve_resume("true", tmp_path / "empty")


def _tmpfs(folder: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes on ``folder`` (root on Linux); False where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_disk_that_fills_during_a_checkpoint_save_is_named_and_the_resumed_run_matches(tmp_path, monkeypatch):
    """A checkpoint save that fills the disk raises DiskFullError naming the folder, the free space, the size the
    save needed and the fixes (torch alone says ``[enforce fail at inline_container.cc] unexpected pos``); the
    half-written checkpoint is renamed ``-partial``; once space is freed, the run resumed from the last complete
    checkpoint ends with the weights of an uninterrupted run. On a really full tmpfs where the test may mount one,
    else with a writer that fails as torch's does on a full disk."""
    from conftest import tiny_classifier
    from datasets import Dataset
    from safetensors.torch import load_file

    from hf_attn_distill import DistillConfig, DistillTrainer
    from hf_attn_distill.training.checkpoints import DiskFullError, last_complete_checkpoint

    rows = [{"input_ids": [101, 5 + i, 7 + i % 3, 102], "attention_mask": [1] * 4, "labels": i % 2} for i in range(16)]

    def trainer(out, **extra):
        args = DistillConfig(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
            report_to="none", use_cpu=True, logging_steps=1, learning_rate=1e-3, seed=3, disable_tqdm=True, **extra,
        )  # fmt: skip
        small = dict(vocab_size=300, num_hidden_layers=2, num_attention_heads=2)
        return DistillTrainer(
            model=tiny_classifier(1, **small), teacher_model=tiny_classifier(0, vocab_size=300), args=args,
            train_dataset=Dataset.from_list(rows),
        )  # fmt: skip

    full = trainer(tmp_path / "full")
    full.train()
    size = sum(f.stat().st_size for f in (tmp_path / "full" / "checkpoint-2").rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    mounted = _tmpfs(disk, int(size * 1.5) // 4096 * 4096)
    try:
        if not mounted:  # the writer torch uses fails the second save as on a full disk
            import transformers.trainer

            saves = []
            real_save = torch.save

            def full_disk_save(obj, f, *args, **kwargs):
                saves.append(f)
                if "checkpoint-4" in str(f):
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1048")
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", full_disk_save)
            monkeypatch.setattr(transformers.trainer.torch, "save", full_disk_save)
        run = disk / "run"
        with pytest.raises(DiskFullError) as caught:
            trainer(run).train()
        message = str(caught.value)
        assert f"saving the checkpoint to {run / 'checkpoint-4'}" in message and "MB free on its filesystem" in message
        assert "save_total_limit" in message and "resume_from_checkpoint=True" in message
        needed = float(message.split("the save needed about ")[1].split(" MB")[0])
        assert needed * 2**20 == pytest.approx(size, rel=0.5)  # model and optimizer state, what checkpoint-2 holds
        assert (run / "checkpoint-4-partial").is_dir() and not (run / "checkpoint-4").exists()
        assert last_complete_checkpoint(run) == str(run / "checkpoint-2")
        if mounted:  # free space: a larger filesystem under the same folder
            assert subprocess.run(["mount", "-o", f"remount,size={size * 8}", str(disk)]).returncode == 0
        else:
            monkeypatch.undo()
        shutil.rmtree(run / "checkpoint-4-partial")
        trainer(run).train(resume_from_checkpoint=True)
        want = full.model.state_dict()
        got = load_file(run / "checkpoint-4" / "model.safetensors")
        for key, value in got.items():
            torch.testing.assert_close(value, want[key], msg=key)
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)])  # files of it may still be mapped
