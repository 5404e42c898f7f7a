"""DistillTrainer under torchrun with 2 CPU processes (gloo) gives the single-process update."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "ddp_train.py"


def run(out: Path, processes: int, batch: int, accumulation: int, loss: str, *extra: str) -> tuple[dict, dict]:
    out.mkdir(parents=True)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, str(WORKER), str(out), str(batch), str(accumulation), loss, *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "weights.pt"), json.loads((out / "log.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kl", "mse_scores"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, loss):
    from test_trainer_exactness import START

    # global window of 8 rows with lengths 3..12: one process 4 x 2 accumulation, or 2 processes 2 x 2
    single, single_log = run(tmp_path / "single", 1, 4, 2, loss)
    ddp, ddp_log = run(tmp_path / "ddp", 2, 2, 2, loss)
    assert ddp_log["world_size"] == 2 and single_log["world_size"] == 1
    # each rank holds the teacher in eval mode, frozen, not wrapped for gradient synchronisation
    assert not ddp_log["teacher_training"] and not ddp_log["teacher_wrapped"] and not ddp_log["teacher_requires_grad"]
    largest = max((single[k] - START[k]).abs().max().item() for k in START)
    assert largest > 1e-5
    for key in START:
        torch.testing.assert_close(
            ddp[key] - START[key], single[key] - START[key], atol=1e-3 * largest, rtol=1e-3, msg=key
        )
    for key in ("loss", "loss_ce", "loss_kd", "loss_attn_enc"):
        assert ddp_log["log"][key] == pytest.approx(single_log["log"][key], rel=1e-5), key


@pytest.mark.slow
def test_two_processes_match_one_with_hidden_states_and_relations(tmp_path):
    """The hidden-state projection lives outside the student's forward: DDP must still average its gradient."""
    from hf_attn_distill.terms.hidden import PROJECTION_NAME

    single, single_log = run(tmp_path / "single", 1, 4, 2, "kl", "objectives")
    ddp, ddp_log = run(tmp_path / "ddp", 2, 2, 2, "kl", "objectives")
    start = torch.load(tmp_path / "single" / "start.pt")
    projection = [k for k in single if k.startswith(PROJECTION_NAME)]
    assert projection and all((single[k] - start[k]).abs().max() > 1e-4 for k in projection)  # it trained
    largest = max((single[k] - start[k]).abs().max().item() for k in single)
    for key in single:
        torch.testing.assert_close(
            ddp[key] - start[key], single[key] - start[key], atol=1e-3 * largest, rtol=1e-3, msg=key
        )
    for key in ("loss", "loss_ce", "loss_kd", "loss_attn_enc", "loss_hidden", "loss_relation"):
        assert ddp_log["log"][key] == pytest.approx(single_log["log"][key], rel=1e-5), key


def test_two_processes_match_one_for_a_causal_lm_with_the_chunked_loss(tmp_path):
    """The chunked LM loss trains the student's output head outside its forward: DDP must still average its
    gradient (and every other)."""
    single, single_log = run(tmp_path / "single", 1, 4, 2, "kl", "lm")
    ddp, ddp_log = run(tmp_path / "ddp", 2, 2, 2, "kl", "lm")
    start = torch.load(tmp_path / "single" / "start.pt")
    largest = max((single[k] - start[k]).abs().max().item() for k in single)
    assert (single["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 1e-3 * largest  # the head trained
    for key in single:
        torch.testing.assert_close(
            ddp[key] - start[key], single[key] - start[key], atol=1e-3 * largest, rtol=1e-3, msg=key
        )
    for key in ("loss", "loss_ce", "loss_kd", "loss_attn_dec"):
        assert ddp_log["log"][key] == pytest.approx(single_log["log"][key], rel=1e-5), key
