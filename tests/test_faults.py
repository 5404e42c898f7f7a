"""A training process killed with SIGKILL resumes to the same final weights and metrics as an uninterrupted run,
also when the kill lands inside a checkpoint save."""

import json
import os
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
    from hf_attn_distill.checkpoints import checkpoint_is_complete, last_complete_checkpoint

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
    from hf_attn_distill.checkpoints import resolve_resume

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
