"""The impact benchmark's figures from given scores: agreement between the methods, and each method's error
against the float64 loop (which says which of the two is off when they differ)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_impact", ROOT / "experiments" / "benchmark_impact.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(scores, n=None, seconds=2.0):
    scores = torch.tensor(scores, dtype=torch.float64)
    return {"scores": scores, "n": n or len(scores), "seconds": seconds, "gold_seconds": 0.5,
            "parameters": 10, "trainable": 4, "peak_rss_mib": 100.0}


def test_against_truth_names_the_method_that_is_off(bench):
    truth = run([1.0, -2.0, 4.0, 1e-3], n=3)  # the float64 loop scored the first three pairs
    loop = run([1.0, -2.0, 4.0, 5.0])
    batched = run([1.0 + 1e-3, -2.0, 4.0 * (1 - 2e-3), 9.0])
    out = bench.against_truth(truth, {"loop": loop, "batched": batched})
    assert out["truth_pairs"] == 3  # a pair the truth did not score is never compared
    assert out["loop_max_rel_error_vs_float64"] == 0.0
    assert out["batched_max_rel_error_vs_float64"] == pytest.approx(2e-3)
    assert out["loop_pairs_over_1e-4_vs_float64"] == 0 and out["batched_pairs_over_1e-4_vs_float64"] == 2
    assert out["batched_error_vs_largest_vs_float64"] == pytest.approx(8e-3 / 4)
    assert out["loop_spearman_vs_float64"] == pytest.approx(1.0)


def test_compare_extrapolates_a_partial_loop_and_measures_agreement_on_its_pairs(bench):
    loop = run([1.0, -2.0, 4.0, 0.0], n=2, seconds=2.5)  # 2 pairs in 2.0 s after the gold gradient
    batched = run([1.0, -2.0 * (1 + 1e-5), 3.0, 3.0], seconds=1.0)
    r = bench.compare(loop, batched, pairs=4)
    assert r["loop_extrapolated"] and r["loop_seconds"] == pytest.approx(0.5 + 4 * 1.0)
    assert r["speedup"] == pytest.approx(4.5)
    assert r["max_rel_error"] == pytest.approx(1e-5)  # the third and fourth pairs are the loop's unscored ones
    assert r["weights_allclose"] and r["same_nonzero_weights"]  # a relative 1e-5 is within the weights' 1e-4
    batched["scores"][0] = -1.0  # a sign flipped: that pair's weight is clipped to zero in one method only
    r = bench.compare(loop, batched, pairs=4)
    assert not r["weights_allclose"] and not r["same_nonzero_weights"]
