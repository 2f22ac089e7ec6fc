"""The embedded benchmark script: every method on a seed, the calibration checks, the seed statistics,
reuse of finished runs of the same configuration only (few steps; the real figures are in docs/benchmark.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, compose_cfg

SCRIPT = ROOT / "experiments" / "benchmark_embedded.py"
SHORT = [*FAST, *(f"model.prealign.stages.{s}.batch_size=4" for s in ("pretrain", "sft", "dpo"))]
# with selection on (a check every step, on few prompts): each run is evaluated at the kept and the last step
SELECTING = [*(o for o in SHORT if not o.startswith("select.")), "select.every_n_steps=1", "select.prompts=4"]


def bench(out, *args, overrides=SHORT):
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out), "--", *overrides],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_benchmark_reports_every_method_and_the_calibration(tmp_path):
    out = tmp_path / "bench"
    methods = ["retrain", "gold_finetune", "trace", "naive_oracle_dpo"]
    res = bench(out, "--seeds", "3", "4", "--methods", *methods, overrides=SELECTING)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(methods)
    assert all(set(by_seed) == {"3", "4"} for by_seed in results.values())
    # every method of a seed starts from the same M_old: identical numbers before realignment
    for seed in ("3", "4"):
        befores = {json.dumps({k: v for k, v in r[seed].items() if k.startswith("eval/before/")}, sort_keys=True)
                   for r in results.values()}
        assert len(befores) == 1
    # the re-training upper bound is evaluated on a model built under pi_new's labels, not M_old
    assert results["retrain"]["3"]["retrain/stages_built"] >= 1 and results["retrain"]["3"]["train/steps"] == 0
    # fine-tuning with perfect labels starts from M_old: its stages are built on top of it, not of the base
    assert results["gold_finetune"]["3"]["finetune/stages_built"] >= 1
    # the trained methods are evaluated at the kept step and at the last one, from the same run
    assert all("eval/last/tpa/shifted" in results[m][s] for m in ("trace", "naive_oracle_dpo") for s in ("3", "4"))
    text = (out / "results.md").read_text()
    assert "## with selection" in text and "## without selection (T_max alone)" in text
    assert "seed 3: every method starts from the same M_old" in text
    assert "retrain shifted-axis TPA >= 98" in text and "trace shifted-axis TPA >= 60" in text
    assert "gold_finetune shifted-axis TPA >= 85" in text and "gold_finetune unchanged axes >= 95" in text
    shifted = [results["trace"][s]["eval/after/tpa/shifted"] for s in ("3", "4")]
    assert f"| trace | {sum(shifted) / 2:.1f} ± " in text  # the over-seeds row: mean, std, interval, worst seed
    assert f"min {min(shifted):.1f}" in text
    # the claims whose methods ran, each with a verdict; the others are left out
    claims = [line for line in text.splitlines() if line.startswith("| TRACE - naive oracle DPO > 0 |")]
    assert len(claims) == 2 and all(line.rstrip(" |").endswith(("holds", "does not hold", "cannot tell at this many seeds"))
                                    for line in claims)
    assert "U2A" not in text.split("## Claims")[1]

    # a second call reuses the finished runs of the same configuration: nothing is run again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")}
    again = bench(out, "--seeds", "3", "4", "--methods", *methods, "--reuse", overrides=SELECTING)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("metrics.json")} == stamps
    # another configuration into the same folders is refused, naming what differs
    other = bench(out, "--seeds", "3", "--reuse", "--methods", "trace", overrides=[*SELECTING, "loss.beta=0.7"])
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


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_embedded", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_claim_is_a_paired_difference_marked_by_where_its_interval_lies():
    bench_mod = load_bench()
    seeds = [5, 6, 7]

    def runs(after: list[float], last: list[float] | None = None, utility: float = 99.0):
        return {s: {"eval/after/tpa/shifted": a, "eval/last/tpa/shifted": (last or after)[i],
                    "eval/after/utility": utility, "select/best_step": 25} for i, (s, a) in enumerate(zip(seeds, after))}

    results = {"trace": runs([50, 60, 70], last=[10, 20, 30]), "naive_oracle_dpo": runs([20, 31, 39]),
               "u2a": runs([55, 40, 75]), "dpo_gold": runs([60, 62, 64]),
               # no selection in a run: "without selection" reads its "after"
               "no_kl": {s: {"eval/after/tpa/shifted": v, "eval/after/utility": 90.0} for s, v in zip(seeds, [49, 61, 70])}}
    rows = {c.text: (est, v) for c, est, v in bench_mod.claims(results, seeds, "after")}
    # the difference trace - naive is +30, +29, +31: above 0 on every reading
    est, v = rows["TRACE - naive oracle DPO > 0"]
    assert v == "holds" and est.startswith("+30.0 [")
    assert rows["TRACE - U2A > 0"][1].startswith("cannot tell")  # -5, +20, -5
    # 0.9 x DPO-Gold: 54, 55.8, 57.6 against 50, 60, 70: the interval straddles 0
    assert rows["TRACE reaches >= 90 % of DPO-Gold's shifted TPA"][1].startswith("cannot tell")
    assert "ratio 0.97" in rows["TRACE reaches >= 90 % of DPO-Gold's shifted TPA"][0]
    # utility lower without KL on every seed: a claim of a decrease holds
    assert rows["without KL, capability down: no_kl - TRACE utility < 0"][1] == "holds"
    # claims whose methods did not run are left out, never guessed
    assert not any("210 pairs" in text for text in rows)
    # without selection, the last step: trace 10, 20, 30 now trails naive oracle DPO on every seed
    last = {c.text: v for c, _, v in bench_mod.claims(results, seeds, "last")}
    assert last["TRACE - naive oracle DPO > 0"] == "does not hold"
    text = bench_mod.claims_table(results, seeds)
    assert "with selection:" in text and "without selection (T_max alone):" in text


def test_a_finished_run_is_reused_only_under_the_libraries_installed_now(tmp_path):
    """Its last bits follow the releases that computed it: a run of another release (or of none recorded)
    is run again, not mixed into this table."""
    import importlib.util

    import torch

    from trace_realign.core.rundir import RUN_FILE, claim, record_environment

    spec = importlib.util.spec_from_file_location("benchmark_embedded", SCRIPT)
    bench_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_mod)
    run_dir, job = tmp_path / "run", ["seed=3", "threads=1"]
    claim(run_dir, compose_cfg(job, run_dir))
    assert not bench_mod.same_configuration(run_dir, ["seed=3"], jobs=2)  # recorded no environment
    record_environment(run_dir, torch.device("cpu"))
    assert bench_mod.same_configuration(run_dir, ["seed=3"], jobs=2)
    assert not bench_mod.same_configuration(run_dir, ["seed=4"], jobs=2)
    record = json.loads((run_dir / RUN_FILE).read_text())
    record["environment"]["libraries"]["transformers"] = "0.0.1"
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    assert not bench_mod.same_configuration(run_dir, ["seed=3"], jobs=2)
