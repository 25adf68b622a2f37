"""Every fast path checks itself on the device before a run relies on it (engine.training.probes),
and FP8 guards its own numerics on the run's first micro-batch. Fault injection makes each check
fail: the run still trains, on the reference path, and says why in its plan, its warnings and
(for FP8) a NumericsCheck event."""
from __future__ import annotations

import pytest
import torch

from engine.core import events as ev
from engine.training import probe_results, probes
from reliability_helpers import configured, finished_losses, finished_run as _run


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch, tmp_path):
    monkeypatch.setattr(probe_results, "RESULTS", {})
    monkeypatch.setattr(probes, "_numerics_file", lambda: tmp_path / "numerics.json")
    monkeypatch.delenv("QLORA_TUI_FAULTS", raising=False)


def _cfg(tiny_cfg, **changes):
    base = {"train.max_steps": 3, "train.eval_steps": 0, "train.save_steps": 0, "train.device": "cpu",
            "train.batch_size": 2, "data.eval_fraction": 0.0}
    return configured(tiny_cfg, {**base, **changes})


def test_each_probe_passes_on_this_cpu_within_its_tolerance():
    for name in ("fused_lora", "fp8_base", "activation_offload"):
        r = probes.check(name, torch.device("cpu"), torch.float32)
        assert r.ok and r.error <= r.tolerance, r
    # run once a process: the second call is the first's result
    assert probes.check("fused_lora", torch.device("cpu"), torch.float32) is \
        probes.check("fused_lora", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("faults,failed", [
    # the fused linear fails: PEFT's path, and FP8 (which runs inside it) goes with it
    ("probe:fused_lora", {"train.fused_lora": "fused NF4+LoRA linear"}),
    # the fused linear passes; FP8 raises, offload comes out wrong, Liger raises: each off alone
    ("probe:fp8_base,probewrong:activation_offload,probe:liger",
     {"train.fp8_base": "FP8 base GEMMs", "train.activation_offload": "offloaded checkpointing",
      "train.liger_kernel": "Liger kernels"}),
])
def test_a_failed_check_turns_the_path_off_and_the_run_trains(tiny_cfg, monkeypatch, faults, failed):
    monkeypatch.setenv("QLORA_TUI_FAULTS", faults)
    cfg = _cfg(tiny_cfg, **{"train.fused_lora": True, "train.fp8_base": True, "train.activation_offload": True,
                            "train.liger_kernel": True})
    evs, started = _run(cfg)
    for key, label in failed.items():
        line = next(p for p in started.plan if p.startswith(f"{label} off: its check on this CPU failed"))
        wrong = key == "train.activation_offload"
        assert ("off the reference path" in line) if wrong else ("injected fault" in line), line
        assert any(isinstance(e, ev.RunWarning) and e.message == line for e in evs)
        sec, name = key.split(".")
        assert started.config[sec][name] is False
    assert started.config["train"]["fp8_base"] is False
    assert len([e for e in evs if isinstance(e, ev.Step)]) == 3


def test_cuda_only_checks_fail_over_to_their_reference_paths(monkeypatch):
    """Pinned buffers and the Triton kernels run on CUDA only; failed here by injection, the
    modules that use them take their reference paths (pageable copies, torch quantisation)."""
    from engine.training import fp8, offload
    monkeypatch.setenv("QLORA_TUI_FAULTS", "probe:pinned_buffers,probewrong:triton_quant")
    for name in ("pinned_buffers", "triton_quant"):
        r = probes.check(name, torch.device("cpu"), torch.float32)
        assert not r.ok and not probes.passed(name)
    assert fp8._triton_ok() is False
    stash = offload.HostStash()
    t = torch.randn(64)
    assert torch.equal(stash.get(stash.put(t)), t)


def test_paths_that_pass_are_named_in_the_plan_and_the_fp8_guard_keeps_fp8(tiny_cfg, tmp_path, monkeypatch):
    """One run of the fast paths that pass here serves both checks: the plan names them, and the
    FP8 guard measures the first step and keeps FP8."""
    evs, started = _run(_cfg(tiny_cfg, **{"train.fused_lora": True, "train.fp8_base": True}))
    line = next(p for p in started.plan if p.startswith("checked on this CPU against the reference path"))
    assert "fused NF4+LoRA linear" in line and "FP8 base GEMMs" in line
    check = [e for e in evs if isinstance(e, ev.NumericsCheck)]
    assert len(check) == 1 and check[0].path == "train.fp8_base" and check[0].step == 1
    assert check[0].kept and 0 < check[0].relative_difference <= probes.FP8_GUARD_THRESHOLD
    assert abs(check[0].fast_loss - check[0].reference_loss) / check[0].reference_loss == \
        pytest.approx(check[0].relative_difference)
    note = probes.fp8_note("cpu")
    assert "approximation" in note and f"{check[0].relative_difference:.2%}" in note and "kept" in note


def test_fp8_guard_turns_fp8_off_when_the_loss_drifts(tiny_cfg, tmp_path, monkeypatch):
    """With the FP8 loss 2% off (injected) the guard turns FP8 off before the first step is
    taken: every step then equals the run that never had FP8."""
    monkeypatch.setenv("QLORA_TUI_FAULTS", "fp8drift")
    cfg = _cfg(tiny_cfg, **{"train.fused_lora": True, "train.fp8_base": True})
    evs, _ = _run(cfg)
    check = next(e for e in evs if isinstance(e, ev.NumericsCheck))
    assert not check.kept and check.relative_difference > probes.FP8_GUARD_THRESHOLD
    assert any(isinstance(e, ev.RunWarning) and e.message.startswith("FP8 base GEMMs turned off") for e in evs)
    guarded = [e.loss for e in evs if isinstance(e, ev.Step)]
    monkeypatch.delenv("QLORA_TUI_FAULTS")
    plain, _ = finished_losses(configured(cfg, {"train.fp8_base": False}))
    assert guarded == plain
    assert "turned off" in probes.fp8_note("cpu")
