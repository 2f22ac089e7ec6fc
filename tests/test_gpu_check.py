"""experiments/gpu_check.sh --dry-run: every GPU check's steps, at toy sizes on the CPU."""

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
