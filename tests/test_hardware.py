"""bf16 autocast only where the hardware runs it natively: detection, the warning, and the benchmarks' default."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import one_sgd_step, tiny_classifier

from hf_attn_distill import DistillConfig, DistillTrainer
from hf_attn_distill.utils import hardware


@pytest.mark.parametrize(
    ("flags", "native"),
    [({"avx2", "avx512f"}, False), ({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True), (set(), False)],
)
def test_native_bf16_on_cpu_follows_the_bf16_instruction_flags(monkeypatch, flags, native):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    assert hardware.native_bf16("cpu") is native
    assert hardware.cpu_name().endswith(", bf16)") is native


def test_the_warning_names_the_fix_only_for_bf16_on_a_cpu_without_bf16(monkeypatch):
    args = DistillConfig(output_dir="unused", bf16=True, use_cpu=True, report_to="none")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2"})
    warning = hardware.emulated_bf16_warning(args, torch.device("cpu"))
    assert "many times slower than float32" in warning and "Drop --bf16" in warning
    assert hardware.emulated_bf16_warning(DistillConfig(output_dir="u", use_cpu=True), torch.device("cpu")) is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512_bf16"})
    assert hardware.emulated_bf16_warning(args, torch.device("cpu")) is None


@pytest.mark.parametrize("flags", [{"avx2"}, {"amx_bf16"}])
def test_distill_trainer_warns_when_bf16_is_emulated(monkeypatch, tmp_path, caplog, flags):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    args = DistillConfig(**one_sgd_step(tmp_path, 2, 1, bf16=True))
    with caplog.at_level(logging.WARNING):
        DistillTrainer(model=tiny_classifier(1, num_hidden_layers=2), teacher_model=tiny_classifier(0), args=args)
    assert any("without bf16 instructions" in r.getMessage() for r in caplog.records) is ("avx2" in flags)


@pytest.mark.parametrize(
    ("flags", "speedup", "pays"),
    [({"avx2"}, 3.0, False), ({"avx512_bf16"}, 0.6, False), ({"avx512_bf16"}, 1.05, False), ({"amx_bf16"}, 1.7, True)],
)
def test_bf16_pays_on_a_cpu_only_with_bf16_instructions_and_a_measured_speedup(monkeypatch, flags, speedup, pays):
    probed = []
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: probed.append(1) or speedup)
    hardware._cpu_bf16_pays.cache_clear()
    try:
        assert hardware.bf16_pays("cpu") is pays and hardware.bf16_pays("cpu") is pays
        assert len(probed) == (0 if flags == {"avx2"} else 1)  # never probed where emulated; once per process
    finally:
        hardware._cpu_bf16_pays.cache_clear()


def test_cpu_bf16_speedup_is_the_ratio_of_the_two_timings(monkeypatch):
    """The probe divides float32 time by bf16 time: a fake clock that makes every bf16 call take 4 ticks and
    every float32 call 2 gives 0.5 (bf16 twice as slow)."""
    calls = []
    real_autocast = torch.autocast

    def autocast(*args, enabled=True, **kwargs):
        calls.append(enabled)
        return real_autocast(*args, enabled=enabled, **kwargs)

    clock = {"t": 0.0}

    def perf_counter():
        clock["t"] += 4.0 if calls and calls[-1] else 2.0
        return clock["t"]

    monkeypatch.setattr(hardware.torch, "autocast", autocast)
    monkeypatch.setattr(hardware, "perf_counter", perf_counter)
    assert hardware.cpu_bf16_speedup(tokens=8, repeats=3) == pytest.approx(0.5)
    assert calls == [False] * 4 + [True] * 4


@pytest.mark.parametrize("native", [False, True])
def test_the_quality_benchmarks_default_to_bf16_only_where_it_pays(monkeypatch, native):
    from benchmarks.quality import qa as quality_qa
    from benchmarks.quality import translation as quality_translation

    monkeypatch.setattr(quality_qa, "bf16_pays", lambda: native)
    monkeypatch.setattr(quality_translation, "bf16_pays", lambda: native)
    assert quality_qa.QualityQAArguments().bf16 is native
    assert quality_translation.QualityTranslationArguments().bf16 is native
    assert quality_translation.QualityTranslationArguments(bf16=not native).bf16 is (not native)  # asked: kept


def test_bf16_check_times_both_precisions_and_reports_their_ratio():
    from benchmarks.checks import bf16 as bf16_check

    result = bf16_check.main(["--tokens", "8", "--threads", "1", "--repeats", "1", "--results", ""])
    assert [(r["threads"], r["tokens"], r["pass"]) for r in result["rows"]] == [
        (1, 8, "forward"),
        (1, 8, "forward + backward"),
    ]
    assert result["native_bf16"] is hardware.native_bf16("cpu")
    fake = {
        "machine": "CPU x; torch",
        "native_bf16": False,
        "rows": [{"threads": 2, "tokens": 512, "pass": "forward", "fp32_ms": 2.0, "bf16_ms": 13.0}],
    }
    assert "| 2 | 512 | forward | 2.00 | 13.00 | 6.50 |" in bf16_check.markdown(fake)
