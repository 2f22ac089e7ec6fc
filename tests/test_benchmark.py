"""The embedded benchmark script: every method on a seed, the calibration checks, the seed statistics,
reuse of finished runs of the same configuration only (few steps; the real figures are in the README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST, ROOT

SCRIPT = ROOT / "experiments" / "benchmark_embedded.py"
SHORT = [*FAST, *(f"model.prealign.stages.{s}.batch_size=4" for s in ("pretrain", "sft", "dpo"))]


def bench(out, *args, overrides=SHORT):
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out), "--", *overrides],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_benchmark_reports_every_method_and_the_calibration(tmp_path):
    out = tmp_path / "bench"
    res = bench(out, "--seeds", "3", "4")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"retrain", "gold_finetune", "dpo_gold", "trace", "trace_noselect"}
    assert all(set(by_seed) == {"3", "4"} for by_seed in results.values())
    # every method of a seed starts from the same M_old: identical numbers before realignment
    for seed in ("3", "4"):
        befores = {json.dumps({k: v for k, v in r[seed].items() if k.startswith("eval/before/")}, sort_keys=True)
                   for r in results.values()}
        assert len(befores) == 1
    # the re-training upper bound is evaluated on a model built under pi_new's labels, not M_old
    assert results["retrain"]["3"]["retrain/stages_built"] >= 1 and results["retrain"]["3"]["train/steps"] == 0
    text = (out / "results.md").read_text()
    assert "seed 3: every method starts from the same M_old" in text
    assert "retrain shifted-axis TPA >= 98" in text and "trace shifted-axis TPA >= 60" in text
    assert "gold_finetune shifted-axis TPA >= 85" in text and "gold_finetune unchanged axes >= 95" in text
    # fine-tuning with perfect labels starts from M_old: its stages are built on top of it, not of the base
    assert results["gold_finetune"]["3"]["finetune/stages_built"] >= 1
    shifted = [results["trace"][s]["eval/after/tpa/shifted"] for s in ("3", "4")]
    mean = sum(shifted) / 2
    assert f"| trace | {mean:.1f} ± " in text  # the over-seeds row: mean, std, interval, worst seed
    assert f"min {min(shifted):.1f}" in text

    # a second call reuses the finished runs of the same configuration: nothing is run again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    again = bench(out, "--seeds", "3", "4", "--reuse")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps
    # another configuration into the same folders is refused, naming what differs
    other = bench(out, "--seeds", "3", "--reuse", "--methods", "trace", overrides=[*SHORT, "loss.beta=0.7"])
    assert other.returncode != 0 and "loss.beta" in other.stdout + other.stderr


def test_a_run_whose_selection_kept_m_old_is_shown_as_m_old_not_as_the_methods_score():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_embedded", SCRIPT)
    bench_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_mod)
    metrics = {f"eval/{w}/{k}": 50.0 for w in ("before", "after") for _, k, _ in bench_mod.COLUMNS}
    kept, moved = {**metrics, "select/best_step": 0}, {**metrics, "select/best_step": 25}
    text = bench_mod.tables({"trace": {0: kept, 1: moved}}, [0, 1])
    assert "| trace | 0 | kept M_old |" in text and "| trace | 1 | 50.0 |" in text
    assert "selection kept M_old on 1 of 2 seeds" in text
