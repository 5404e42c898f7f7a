"""Teachers trained in doubling rounds to a plateau: the curve, convergence, resuming after a stop, caching by
settings and data (a stand-in recipe that writes checkpoints and reports a dev metric per round)."""

import json

import pytest

from benchmarks.quality.teachers import fingerprint, last_checkpoint, last_round_metrics, teacher_summary, train_teacher

ARGS = ["--lr_scheduler_type", "inverse_sqrt", "--warmup_steps", "2", "--do_eval"]


class FakeRecipe:
    """Trains ``--max_steps`` (writing ``checkpoint-N`` every ``--save_steps``) and reports ``eval_bleu`` from
    ``curve``; ``crash_at`` simulates a stop after that checkpoint was written."""

    def __init__(self, curve, crash_at=None):
        self.curve, self.crash_at, self.calls = curve, crash_at, []

    def __call__(self, argv):
        opts = {a: b for a, b in zip(argv, [*argv[1:], ""]) if a.startswith("--") and not b.startswith("--")}
        out, steps, save = opts["--output_dir"], int(opts["--max_steps"]), int(opts["--save_steps"])
        start = int(opts["--resume_from_checkpoint"].rsplit("-", 1)[1]) if "--resume_from_checkpoint" in opts else 0
        self.calls.append((start, steps))
        from pathlib import Path

        for step in range(start + save, steps + 1, save):
            folder = Path(out) / f"checkpoint-{step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            if self.crash_at == step:
                self.crash_at = None
                raise KeyboardInterrupt("stopped")
        return {"eval_bleu": self.curve[steps]}


def EVAL(folder):  # noqa: N802 - a stand-in evaluation of a checkpoint: never expected in these runs
    raise AssertionError(f"unexpected evaluation of {folder}")


def test_rounds_double_until_the_last_doubling_gains_less_than_the_threshold(tmp_path):
    recipe = FakeRecipe({4: 10.0, 8: 20.0, 16: 24.0, 32: 24.6, 64: 30.0})
    folder, summary = train_teacher(
        recipe,
        ARGS,
        work=tmp_path,
        key="k",
        metric="bleu",
        first_steps=4,
        max_steps=64,
        save_steps=2,
        evaluate_checkpoint=EVAL,
    )
    assert summary["teacher_curve"] == [[4, 10.0], [8, 20.0], [16, 24.0], [32, 24.6]]
    assert summary["teacher_converged"] and "gained 0.60" in summary["teacher_curve_note"]
    assert recipe.calls == [(0, 4), (4, 8), (8, 16), (16, 32)]  # each round resumes where the last one ended
    assert folder == tmp_path / "teacher-k" and last_checkpoint(folder) is None  # converged: checkpoints dropped


def test_a_stopped_run_resumes_from_its_last_checkpoint_and_keeps_finished_rounds(tmp_path):
    curve = {4: 10.0, 8: 20.0, 16: 30.0}
    with pytest.raises(KeyboardInterrupt):
        train_teacher(
            FakeRecipe(curve, crash_at=6),
            ARGS,
            work=tmp_path,
            key="k",
            metric="bleu",
            first_steps=4,
            max_steps=16,
            save_steps=2,
            evaluate_checkpoint=EVAL,
        )
    again = FakeRecipe(curve)
    _, summary = train_teacher(
        again,
        ARGS,
        work=tmp_path,
        key="k",
        metric="bleu",
        first_steps=4,
        max_steps=16,
        save_steps=2,
        evaluate_checkpoint=EVAL,
    )
    assert again.calls == [(6, 8), (8, 16)]  # round 4 kept, round 8 resumed from checkpoint-6
    assert not summary["teacher_converged"]
    assert summary["teacher_curve_note"].startswith("NOT converged: the budget (16 steps) ran out")
    assert last_checkpoint(tmp_path / "teacher-k").name == "checkpoint-16"  # kept, so a larger budget continues
    more = FakeRecipe({**curve, 32: 30.5})
    _, summary = train_teacher(
        more,
        ARGS,
        work=tmp_path,
        key="k",
        metric="bleu",
        first_steps=4,
        max_steps=32,
        save_steps=2,
        evaluate_checkpoint=EVAL,
    )
    assert more.calls == [(16, 32)] and summary["teacher_converged"]


def test_a_schedule_that_depends_on_the_total_steps_is_refused(tmp_path):
    with pytest.raises(ValueError, match="inverse_sqrt"):
        train_teacher(
            FakeRecipe({}),
            ["--lr_scheduler_type", "linear"],
            work=tmp_path,
            key="k",
            metric="bleu",
            first_steps=4,
            max_steps=8,
            save_steps=2,
            evaluate_checkpoint=EVAL,
        )


def test_the_cache_key_follows_settings_and_data(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("a\nb\n")
    key = fingerprint({"lr": 1e-4}, [data])
    assert key == fingerprint({"lr": 1e-4}, [data]) and key != fingerprint({"lr": 2e-4}, [data])
    data.write_text("a\nc\n")
    assert fingerprint({"lr": 1e-4}, [data]) != key


def test_summary_of_a_single_round():
    assert teacher_summary({"curve": [[4, 1.0]]}, 1.0, 4)["teacher_curve_note"].startswith("NOT converged: one round")


def test_a_run_stopped_between_training_and_evaluation_evaluates_the_checkpoint(tmp_path):
    """Resuming a Trainer at exactly max_steps would train one step more: the round's checkpoint is evaluated
    instead, and becomes the teacher's saved model."""
    curve = {4: 10.0, 8: 20.0}
    folder = tmp_path / "teacher-k"
    (folder / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-4" / "model.safetensors").write_text("weights of step 4")
    evaluated = []
    recipe = FakeRecipe(curve)
    _, summary = train_teacher(
        recipe,
        ARGS,
        work=tmp_path,
        key="k",
        metric="bleu",
        first_steps=4,
        max_steps=8,
        save_steps=2,
        evaluate_checkpoint=lambda f: evaluated.append(f.name) or {"eval_bleu": 9.5},
    )
    assert evaluated == ["checkpoint-4"] and recipe.calls == [(4, 8)]
    assert summary["teacher_curve"] == [[4, 9.5], [8, 20.0]]


def test_a_continued_teacher_reports_the_metrics_of_its_last_round(tmp_path):
    """A teacher continued in a later sitting (a larger max_steps) is scored by its new last round, also when
    that round was evaluated from a checkpoint (a stale eval_results.json in the teacher folder is not read)."""
    recipe = FakeRecipe({4: 10.0, 8: 20.0, 16: 30.0})
    common = dict(work=tmp_path, key="k", metric="bleu", first_steps=4, save_steps=2, evaluate_checkpoint=EVAL)
    folder, _ = train_teacher(recipe, ARGS, max_steps=4, **common)
    assert last_round_metrics(folder) == (4, {"eval_bleu": 10.0})
    (folder / "eval_results.json").write_text(json.dumps({"eval_bleu": 10.0}))
    train_teacher(recipe, ARGS, max_steps=16, **common)
    assert last_round_metrics(folder) == (16, {"eval_bleu": 30.0})
    (folder / "teacher_curve.json").write_text(json.dumps({"curve": [[4, 10.0]]}))  # written by an older version
    with pytest.raises(KeyError, match="remove that round"):
        last_round_metrics(folder)
