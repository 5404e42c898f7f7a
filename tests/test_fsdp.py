"""Where the teacher lives under FSDP and DeepSpeed ZeRO-3 (``hf_attn_distill.training.distributed``).

The multi-process tests run DistillTrainer under torchrun with 2 CPU processes (gloo). accelerate enables FSDP only
for processes on GPUs, so the FSDP2 test switches the accelerator state to FSDP as it would be there
(tests/workers/fsdp_train.py); the other test checks that asking for FSDP on CPU processes, where accelerate falls
back to DDP, is refused. DeepSpeed is not installed here: the ZeRO-3 preparation is tested against a stand-in
``deepspeed`` module, and the error for a missing DeepSpeed with the real (absent) package.
"""

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from conftest import tiny_classifier
from torch import nn

from hf_attn_distill import DistillConfig
from hf_attn_distill.training.distributed import check_distributed_setup, prepare_teacher, require_deepspeed

WORKER = Path(__file__).parent / "workers" / "fsdp_train.py"
DEEPSPEED_INSTALLED = importlib.util.find_spec("deepspeed") is not None


def run(out: Path, processes: int, batch: int, accumulation: int, *extra: str) -> dict:
    out.mkdir(parents=True)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, str(WORKER), str(out), str(batch), str(accumulation), *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if (out / "error.txt").exists():
        return {"error": (out / "error.txt").read_text()}
    return {"weights": torch.load(out / "weights.pt"), **json.loads((out / "log.json").read_text())}


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_shard_the_teacher(tmp_path):
    from test_trainer_exactness import START

    # global window of 8 rows with lengths 3..12: one process 4 x 2 accumulation, or 2 processes 2 x 2
    single = run(tmp_path / "single", 1, 4, 2, "2")
    fsdp = run(tmp_path / "fsdp", 2, 2, 2, "2")
    assert fsdp["world_size"] == 2 and single["world_size"] == 1
    assert single["ranks"][0]["placement"] == "replicated"
    for rank in fsdp["ranks"]:
        assert rank["placement"] == "fsdp2_sharded" and rank["student_fsdp"]
        for state in (rank, rank["after_train"]):  # as placed, and after a training step
            # frozen, in eval mode, never wrapped for gradients; sharded: half the parameters on this process's device
            assert not state["teacher_training"] and not state["teacher_requires_grad"]
            assert not state["teacher_wrapped_ddp"] and state["teacher_dtensor"]
            assert state["teacher_devices"] == ["cpu"]
            assert state["teacher_numel"] == single["ranks"][0]["teacher_numel"]
            assert state["teacher_local_numel"] < 0.55 * state["teacher_numel"]
    assert sum(r["teacher_local_numel"] for r in fsdp["ranks"]) == fsdp["ranks"][0]["teacher_numel"]
    # same update: weight deltas within 0.1% of the largest change, every logged term within 1e-5 (relative)
    largest = max((single["weights"][k] - START[k]).abs().max().item() for k in START)
    assert largest > 1e-5
    for key in START:
        torch.testing.assert_close(
            fsdp["weights"][key] - START[key],
            single["weights"][key] - START[key],
            atol=1e-3 * largest,
            rtol=1e-3,
            msg=key,
        )
    for key in ("loss", "loss_ce", "loss_kd", "loss_attn_enc"):  # loss_attn_enc: the sharded teacher's attention
        assert fsdp["log"][key] == pytest.approx(single["log"][key], rel=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("head", ["untied", "tied"])
def test_fsdp2_trains_a_causal_lm_pair_with_the_chunked_loss_as_one_process(head, tmp_path):
    """A tiny Llama pair (grouped-query attention) under FSDP2 on 2 processes, the teacher sharded: the chunked LM
    loss reads both output heads gathered (also when a head is the tied input embedding, whose gradient then has
    both uses), and the update and every term equal one process's."""
    from test_decoder_only import causal_lm
    from transformers import LlamaConfig, LlamaForCausalLM

    start = causal_lm(LlamaForCausalLM, LlamaConfig, 2, 2, 1, tie_word_embeddings=head == "tied").state_dict()
    extra = ("lm", "tied") if head == "tied" else ("lm",)
    single = run(tmp_path / "single", 1, 4, 2, "2", *extra)
    fsdp = run(tmp_path / "fsdp", 2, 2, 2, "2", *extra)
    if head == "tied":  # one matrix: saved under both names, equal after the update
        for result in (single, fsdp):
            assert torch.equal(result["weights"]["lm_head.weight"], result["weights"]["model.embed_tokens.weight"])
    assert all(rank["placement"] == "fsdp2_sharded" and rank["student_fsdp"] for rank in fsdp["ranks"])
    largest = max((single["weights"][k] - start[k]).abs().max().item() for k in start)
    assert largest > 1e-5
    for key in start:
        torch.testing.assert_close(
            fsdp["weights"][key] - start[key], single["weights"][key] - start[key], atol=1e-3 * largest, rtol=1e-3
        )
    for key in ("loss", "loss_ce", "loss_kd", "loss_attn_dec"):  # decoder-only: the causal site
        assert fsdp["log"][key] == pytest.approx(single["log"][key], rel=1e-5), key


@pytest.mark.slow
def test_fsdp_on_cpu_processes_is_refused(tmp_path):
    """accelerate runs DDP when FSDP is asked for on CPU processes; nothing would be sharded, so we refuse."""
    result = run(tmp_path / "plain", 2, 2, 2, "2", "plain")
    assert "fsdp is set but the accelerator runs MULTI_CPU" in result.get("error", ""), result
    assert "Drop fsdp/fsdp_config" in result["error"]


# ---- without processes: stand-in accelerators ----


class FakeAccelerator:
    """What prepare_teacher reads from an ``Accelerator``; ``prepare_model`` records its calls."""

    def __init__(self, distributed_type, fsdp_version=None, zero_stage=None, ds_config=None):
        self.distributed_type = distributed_type
        self.device = torch.device("cpu")
        fsdp_plugin = SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None
        ds_plugin = (
            SimpleNamespace(zero_stage=zero_stage, deepspeed_config=ds_config) if zero_stage is not None else None
        )
        self.state = SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=ds_plugin)
        self.prepared = []

    def prepare_model(self, model, evaluation_mode=False):
        self.prepared.append((model, evaluation_mode))
        return model


def zero3_accelerator(stage=3):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "scheduler": {"type": "WarmupLR", "params": {}},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
        },
    }
    return FakeAccelerator(DistributedType.DEEPSPEED, zero_stage=stage, ds_config=config)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """A stand-in ``deepspeed`` module whose ``initialize`` records its config and returns an engine."""
    calls = []

    class Engine(nn.Module):
        def __init__(self, module, config):
            super().__init__()
            self.module, self.config, self.seen = module, config, []

        def forward(self, **inputs):
            self.seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return self.module(**inputs)

    def initialize(model=None, config=None, **kwargs):
        assert not kwargs, kwargs
        engine = Engine(model, config)
        calls.append(engine)
        return engine, None, None, None

    module = types.ModuleType("deepspeed")
    module.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    module.initialize = initialize
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    return calls


def test_zero3_teacher_becomes_a_deepspeed_inference_engine(fake_deepspeed):
    teacher = tiny_classifier(0)
    accelerator = zero3_accelerator()
    original = json.dumps(accelerator.state.deepspeed_plugin.deepspeed_config, sort_keys=True)
    prepared = prepare_teacher(teacher, accelerator, SimpleNamespace())
    (engine,) = fake_deepspeed
    assert engine.module is teacher and not engine.training and not prepared.training
    assert not any(p.requires_grad for p in teacher.parameters())
    hidden = teacher.config.hidden_size
    assert "optimizer" not in engine.config and "scheduler" not in engine.config
    assert engine.config["zero_optimization"] == {
        "stage": 3,
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    assert engine.config["train_micro_batch_size_per_gpu"] == 2
    assert json.dumps(accelerator.state.deepspeed_plugin.deepspeed_config, sort_keys=True) == original
    assert not accelerator.prepared  # not replicated through prepare_model
    assert prepared.config is teacher.config  # the model's config, not the engine's DeepSpeed config
    ids = torch.tensor([[101, 2000, 102]])
    with torch.inference_mode():  # as DistillTrainer.compute_loss calls it
        logits = prepared(input_ids=ids).logits
    assert engine.seen == [(False, False)]  # the engine ran under no_grad, outside inference mode
    with torch.no_grad():
        torch.testing.assert_close(logits, teacher(input_ids=ids).logits)


def test_zero2_teacher_is_replicated(fake_deepspeed):
    teacher = tiny_classifier(0)
    accelerator = zero3_accelerator(stage=2)
    assert prepare_teacher(teacher, accelerator, SimpleNamespace()) is teacher
    assert accelerator.prepared == [(teacher, True)] and not fake_deepspeed


@pytest.mark.skipif(DEEPSPEED_INSTALLED, reason="checks the error when deepspeed is absent")
def test_deepspeed_requested_but_not_installed_names_pip_install(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    require_deepspeed(SimpleNamespace(deepspeed=None))  # not asked for: fine
    with pytest.raises(ImportError, match="pip install deepspeed"):
        require_deepspeed(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ImportError, match="pip install deepspeed"):  # a ZeRO-3 accelerator reaching the teacher
        prepare_teacher(tiny_classifier(0), zero3_accelerator(), SimpleNamespace())
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch with a DeepSpeed config
    with pytest.raises(ImportError, match="pip install deepspeed"):
        require_deepspeed(SimpleNamespace())


@pytest.mark.skipif(DEEPSPEED_INSTALLED, reason="checks the error when deepspeed is absent")
def test_distill_config_with_deepspeed_but_not_installed_names_pip_install(tmp_path):
    with pytest.raises(ImportError, match="pip install deepspeed"):
        DistillConfig(output_dir=str(tmp_path), deepspeed={"zero_optimization": {"stage": 3}}, report_to="none")


def test_fsdp1_teacher_is_replicated_on_the_device():
    teacher = tiny_classifier(0)
    accelerator = FakeAccelerator(DistributedType.FSDP, fsdp_version=1)
    prepared = prepare_teacher(teacher, accelerator, SimpleNamespace(fsdp=True))
    assert prepared is teacher and not accelerator.prepared  # never through prepare_model, which leaves it off-device
    assert {p.device for p in teacher.parameters()} == {accelerator.device}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_fsdp_asked_for_without_fsdp_accelerator_is_refused():
    accelerator = FakeAccelerator(DistributedType.MULTI_CPU)
    with pytest.raises(ValueError, match="accelerate enables FSDP only for processes on GPUs"):
        check_distributed_setup(SimpleNamespace(fsdp=True), accelerator)
    check_distributed_setup(SimpleNamespace(fsdp=False), accelerator)


@pytest.mark.parametrize(
    "accelerator", [FakeAccelerator(DistributedType.FSDP, fsdp_version=2), zero3_accelerator()], ids=["fsdp2", "zero3"]
)
def test_teacher_logits_cache_with_a_sharded_teacher_is_refused(accelerator, tmp_path):
    with pytest.raises(ValueError, match="teacher_logits_cache with a sharded teacher"):
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        check_distributed_setup(SimpleNamespace(teacher_logits_cache=str(tmp_path), fsdp=fsdp), accelerator)
    check_distributed_setup(SimpleNamespace(teacher_logits_cache=str(tmp_path)), FakeAccelerator(DistributedType.NO))
