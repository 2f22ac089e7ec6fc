"""experiments/gpu_check.sh --dry-run: every GPU check's steps, at toy sizes on the CPU. Its step check runs
the training-cost benchmark (experiments/benchmark_train.py) in smoke mode, fused and per category: its
tables and measurements are checked here too (their verdicts are not: the script reports, never fails)."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_checks_run_as_one_step_and_write_one_report(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert sorted(results) == sorted(["step", "memory", "fsdp1", "impact", "bf16"])
    assert not [name for name, r in results.items() if "error" in r]
    # the resume check compares for real even at toy sizes: a resumed run is the uninterrupted one
    assert results["fsdp1"]["passed"] and results["fsdp1"]["resumed_from_step"] == 3
    assert results["impact"]["passed"]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in report and all(f"| {name} |" in report for name in results)
    check_training_cost_benchmark(tmp_path / "train_fused_true")  # the per-category step is timed on a GPU only
    assert not (tmp_path / "train_fused_false.json").exists()


def check_training_cost_benchmark(out) -> None:
    """benchmark_train.py --smoke: two timed steps per configuration, memory, references counted, two checks."""
    data = json.loads(out.with_suffix(".json").read_text())
    results = data["results"]
    assert set(results) == {"trace_lora", "dpo_lora", "policy_lora"}
    for r in results.values():
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["peak_bytes"] >= r["start_bytes"] > 0 and r["lifetime_peak_bytes"] >= r["peak_bytes"]
    # cold cache: every TRACE and DPO step runs the reference; the policy alone never does
    assert results["trace_lora"]["reference_forwards"] > 0 and results["dpo_lora"]["reference_forwards"] == 2
    assert results["policy_lora"]["reference_forwards"] == 0 and results["policy_lora"]["terms"]["retain"] == "nll"
    # DPO serves the same pairs per step as TRACE (3B), as one category
    assert results["dpo_lora"]["batch_sizes"]["retain"] == 3 * results["trace_lora"]["batch_sizes"]["invert"]
    assert [c["limit"] for c in data["checks"]] == [1.1, 1.3]
    text = out.with_suffix(".md").read_text()
    assert text.count("PASS") + text.count("FAIL") == 2 and "| trace_lora |" in text


def test_a_check_whose_module_is_missing_says_what_to_install_and_spends_nothing(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    import gpu_check

    monkeypatch.setitem(gpu_check.NEEDS, "bf16", {"no_such_module_xyz": "no-such-dist"})
    monkeypatch.setattr(gpu_check, "check_bf16", lambda *a: pytest.fail("ran a check whose module is missing"))
    assert gpu_check.main(["--dry-run", "--only", "bf16", "--out", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())["bf16"]
    assert "no_such_module_xyz" in result["error"] and "pip install no-such-dist" in result["error"]

    # a module it names for the real check is one the project installs (lm-eval is a dependency)
    monkeypatch.undo()
    assert gpu_check.NEEDS["bf16"] == {"lm_eval": "lm-eval"} and importlib.util.find_spec("lm_eval")
