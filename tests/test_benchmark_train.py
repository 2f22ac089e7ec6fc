"""The training-cost benchmark script in its smoke mode: two steps per configuration on a small M_old, the
table and both checks written (their verdicts are not asserted: the script reports, never fails on them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "experiments" / "benchmark_train.py"
# a small world and a quickly built M_old (the figures mean nothing at this size: this checks the plumbing)
SMALL = ["dataset.pairs_per_axis=8", "dataset.test_prompts_per_axis=2", "dataset.utility_in_data=4",
         "dataset.utility_eval=2", "model.prealign.stages.pretrain.steps=2", "model.prealign.stages.sft.steps=3",
         "model.prealign.stages.dpo.steps=2", "model.prealign.stages.pretrain.batch_size=4",
         "model.prealign.stages.sft.batch_size=4", "model.prealign.stages.dpo.batch_size=4", "threads=1"]


@pytest.mark.slow
def test_smoke_measures_time_and_memory_of_each_configuration(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--only", "trace_lora", "dpo_lora", "policy_lora",
                          "--out", str(out), "--", *SMALL], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
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
