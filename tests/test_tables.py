"""trace-tables: synthetic run folders with known metrics, read back into the paper's tables.

Every expected number is worked out by hand here (means, sample standard deviations, t-intervals), not
by the code under test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT
from omegaconf import OmegaConf

from trace_realign.report import aggregate, collect, render
from trace_realign.report.aggregate import build_report, paired, summarize, t975
from trace_realign.report.collect import Job, TablesError, load_jobs
from trace_realign.tables import main

# t_{0.975, df}: df = 2 as scipy.stats.t.ppf gives it; the rest computed at 50 digits (mpmath).
T2 = 4.302652729749464
T_REFERENCE = {1: 12.706204736174705, 3: 3.1824463052837095, 4: 2.7764451051977943, 10: 2.228138851986275,
               30: 2.042272456301238, 31: 2.0395134463964086, 60: 2.0002978220142604, 120: 1.979930405082441,
               1000: 1.9623390808264085}
TPA, UTIL, BEFORE_TPA = "eval/after/tpa", "eval/after/utility", "eval/before/tpa"


# ----------------------------------------------------------------------------------------------- builders


def write_run(folder: Path, *, config: dict, overrides: list[str] | None = None, metrics: dict | None = None,
              failed: str | None = None, task_name: str | None = None, curves: str | None = None) -> Path:
    """A run folder as trace-realign leaves it: run.json, .hydra/overrides.yaml, metrics.json or FAILED."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"config": config}, indent=1))
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "config.yaml").write_text(yaml.safe_dump({"task_name": task_name or "trace", "seed": config.get("seed")}))
    if failed is not None:
        (folder / "FAILED").write_text(failed)
    if curves is not None:
        (folder / "csv").mkdir()
        (folder / "csv" / "metrics.csv").write_text(curves)
    return folder


def base_config(method: str, seed: int, **extra) -> dict:
    """The settings a run.json records; paths and the oracle's seed differ per job, as they do."""
    return {"ablation.name": method, "ablation.kl": method != "no_kl", "seed": seed, "oracle.seed": seed,
            "paths.output_dir": f"/runs/{method}/{seed}", "data.size": None, "data.label_noise": 0.0,
            "trainer.max_steps": 2, **extra}


# TPA by method and seed; the starting model's TPA by seed (the same for every method of a seed).
SWEEP_TPA = {"trace": [1.0, 2.0, 3.0], "no_kl": [3.0, 5.0, 10.0], "u2a": [11.0, 13.0, 14.0]}
SWEEP_UTIL = {"trace": [50.0, 50.0, 50.0], "no_kl": [40.0, 44.0, 48.0], "u2a": [30.0, 30.0, 33.0]}
SWEEP_BEFORE = [50.0, 60.0, 70.0]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun folder: 3 methods x 3 seeds, plus u2a seed 3 FAILED (with a stale metrics.json that must
    not count) and no_kl seed 3 with only run.json (unfinished)."""
    root = tmp_path / "multirun" / "table4_ablation" / "2026-01-01_00-00-00-000000"
    job = 0
    for method in SWEEP_TPA:
        for seed in range(3):
            write_run(root / str(job), config=base_config(method, seed),
                      overrides=[f"method={method}", f"seed={seed}", "trainer.max_steps=2"],
                      metrics={TPA: SWEEP_TPA[method][seed], UTIL: SWEEP_UTIL[method][seed],
                               BEFORE_TPA: SWEEP_BEFORE[seed], "eval/before/utility": 60.0,
                               "time/total_seconds": 100.0 + job, "train/steps": 2},
                      task_name="table4_ablation")
            job += 1
    write_run(root / str(job), config=base_config("u2a", 3), overrides=["method=u2a", "seed=3", "trainer.max_steps=2"],
              metrics={TPA: 1000.0}, failed="RuntimeError: the oracle failed\n\nTraceback (most recent call last): ...")
    write_run(root / str(job + 1), config=base_config("no_kl", 3), overrides=["method=no_kl", "seed=3", "trainer.max_steps=2"])
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def row(report, method, kind="run", **settings):
    found = [r for r in report.rows if r.kind == kind and r.method == method
             and all(r.settings.get(k) == v for k, v in settings.items())]
    assert len(found) == 1, [(r.kind, r.method, r.settings) for r in report.rows]
    return found[0]


def pair(report, method, kind="run"):
    found = [p for r, p in report.paired if r.method == method and r.kind == kind]
    assert len(found) == 1
    return found[0]


def hand_summary(values):
    """mean, sample std, 95 % half-width by hand (the t factor from the reference table)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = {2: T2, **T_REFERENCE}[n - 1]
    return mean, std, t * std / math.sqrt(n)


# ---------------------------------------------------------------------------------------------- statistics


def test_t_quantiles_are_exact():
    assert t975(2) == T2
    for df, t in T_REFERENCE.items():
        assert t975(df) == pytest.approx(t, rel=1e-13, abs=0), df
        assert aggregate.t_quantile(0.975, df) == pytest.approx(t, rel=1e-13, abs=0), df
    for df in (1, 2, 3, 4, 10, 30):  # the table's exact values and the incomplete-beta solution agree
        assert t975(df) == {2: T2, **T_REFERENCE}[df]
    assert t975(1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-14)  # Cauchy: closed form
    assert t975(2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-14)  # df = 2: closed form
    assert aggregate.t_quantile(0.975, 10**7) == pytest.approx(1.959963984540054, rel=1e-6)  # the normal limit
    with pytest.raises(ValueError):
        t975(0)


def test_summary_of_one_two_three_by_hand():
    s = summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std, s.min, s.max) == (3, 2.0, 1.0, 1.0, 3.0)
    assert s.ci95 == T2 * 1 / math.sqrt(3)
    assert (s.low, s.high) == (2.0 - T2 / math.sqrt(3), 2.0 + T2 / math.sqrt(3))
    one = summarize([4.0])
    assert (one.n, one.mean, one.min, one.max) == (1, 4.0, 4.0, 4.0) and math.isnan(one.std) and math.isnan(one.ci95)
    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)


def test_paired_difference_uses_only_shared_seeds():
    p = paired({0: 3.0, 1: 5.0, 2: 10.0, 7: 99.0}, {0: 1.0, 1: 2.0, 2: 3.0, 5: -50.0})
    # differences 2, 3, 7: mean 4, deviations -2, -1, 3, variance 14 / 2 = 7
    assert p.seeds == (0, 1, 2)
    assert (p.diff.n, p.diff.mean, p.diff.std) == (3, 4.0, math.sqrt(7))
    assert p.diff.ci95 == pytest.approx(T2 * math.sqrt(7) / math.sqrt(3), rel=1e-15)
    assert not p.significant  # [4 - 6.57, 4 + 6.57] holds 0
    clear = paired({0: 11.0, 1: 13.0, 2: 14.0}, {0: 1.0, 1: 2.0, 2: 3.0})  # differences 10, 11, 11
    assert clear.diff.mean == pytest.approx(32 / 3, rel=1e-15) and clear.significant
    assert not paired({0: 5.0}, {0: 1.0}).significant  # one pair: no interval, no mark


# ----------------------------------------------------------------------------------------------- the sweep


def test_sweep_cells_pairs_and_jobs_not_counted(sweep):
    report = build_report(load_jobs([sweep]))
    assert report.keys == ["method"]  # seed and the constant trainer.max_steps make no setting
    assert report.baseline == "trace"
    assert report.metrics == [UTIL, TPA, "time/total_seconds"]  # the defaults the runs have, in order
    assert any("eval/after/tpa/shifted" in n and "left out" in n for n in report.notes)
    for method, values in SWEEP_TPA.items():
        s = row(report, method).cells[TPA]
        mean, std, half = hand_summary(values)
        assert (s.n, s.min, s.max) == (3, min(values), max(values))
        assert s.mean == pytest.approx(mean, rel=1e-15) and s.std == pytest.approx(std, rel=1e-15)
        assert s.ci95 == pytest.approx(half, rel=1e-15)
    assert row(report, "trace").cells[TPA].ci95 == T2 / math.sqrt(3)
    # the failed u2a job (seed 3, a stale TPA of 1000) and the unfinished no_kl one count nowhere
    assert sorted(row(report, "u2a").per_seed[TPA]) == [0, 1, 2]
    assert [Path(j.path).name for j in report.failed] == ["9"]
    assert report.failed[0].failed == "RuntimeError: the oracle failed"
    assert [Path(j.path).name for j in report.unfinished] == ["10"]
    # M_old: one value per seed, 50 / 60 / 70
    before = row(report, "before", kind="before")
    assert (before.cells[TPA].mean, before.cells[TPA].std, before.cells[TPA].n) == (60.0, 10.0, 3)
    assert before.cells["time/total_seconds"] is None  # no before value for a time
    # paired against trace, seed by seed
    no_kl = pair(report, "no_kl")[TPA]  # 2, 3, 7
    assert (no_kl.diff.mean, no_kl.diff.std, no_kl.diff.n, no_kl.significant) == (4.0, math.sqrt(7), 3, False)
    assert no_kl.diff.ci95 == pytest.approx(T2 * math.sqrt(7) / math.sqrt(3), rel=1e-15)
    u2a = pair(report, "u2a")[TPA]  # 10, 11, 11: mean 32/3, variance 1/3
    assert u2a.diff.mean == pytest.approx(32 / 3, rel=1e-15)
    assert u2a.diff.ci95 == pytest.approx(T2 * math.sqrt(1 / 3) / math.sqrt(3), rel=1e-14)
    assert u2a.significant
    b = pair(report, "before", kind="before")[TPA]  # 49, 58, 67
    assert (b.diff.mean, b.diff.std, b.significant) == (58.0, 9.0, True)
    assert [r.label for r in report.rows if r.kind != "paper"] == ["before (M_old)", "trace", "no_kl", "u2a"]
    # the task name (table4_ablation) brings the paper's table4 as marked rows, after the runs, not paired
    assert list(report.paper_tables) == ["table4"]
    assert [(r.label, r.reported[TPA][0]) for r in report.rows[4:]] == [
        ("paper: TRACE (Full) (Llama-3.1-8B)", 70.7), ("paper: w/o KL Regularization (Llama-3.1-8B)", 71.5),
        ("paper: w/o Triage (Llama-3.1-8B)", 58.1), ("paper: w/o Impact Weighting (Llama-3.1-8B)", 62.8)]
    assert [r.kind for r, _ in report.paired] == ["before", "run", "run"]


def test_cli_prints_and_writes_md_csv_tex(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--metrics", TPA, UTIL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| trace | 2.00 ± 1.00 [n=3] | 50.0 ± 0.0 [n=3] |" in printed
    assert "| u2a | 12.7 ± 1.53 [n=3] |" in printed
    assert "failed: " + str(sweep / "9") + " (u2a, seed 3): RuntimeError: the oracle failed" in printed
    assert "unfinished (no metrics.json, no FAILED): " + str(sweep / "10") + " (no_kl, seed 3)" in printed
    assert "+10.67 [+9.23, +12.10] n=3 *" in printed  # u2a - trace on TPA
    assert "+4.00 [-2.57, +10.57] n=3 |" in printed  # no_kl - trace, no mark
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "table.tex", "paired.csv"}
    assert (out / "table.md").read_text() == printed[: len((out / "table.md").read_text())]

    lines = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    trace = next(r for r in lines if r["row"] == "trace" and r["metric"] == TPA)
    assert (float(trace["mean"]), float(trace["std"]), int(trace["n"])) == (2.0, 1.0, 3)
    assert float(trace["ci95"]) == T2 / math.sqrt(3)
    assert (float(trace["min"]), float(trace["max"]), trace["seeds"]) == (1.0, 3.0, "0 1 2")
    assert {r["row"] for r in lines if r["kind"] != "paper"} == {"before (M_old)", "trace", "no_kl", "u2a"}
    reference = next(r for r in lines if r["row"] == "paper: TRACE (Full) (Llama-3.1-8B)")
    assert (reference["kind"], reference["metric"], reference["mean"], reference["n"]) == ("paper", TPA, "70.7", "")

    pairs = list(csv.DictReader(io.StringIO((out / "paired.csv").read_text())))
    u2a = next(r for r in pairs if r["row"] == "u2a" and r["metric"] == TPA)
    assert (u2a["baseline"], u2a["n_pairs"], u2a["significant"], u2a["seeds"]) == ("trace", "3", "1", "0 1 2")
    assert float(u2a["mean_diff"]) == pytest.approx(32 / 3, rel=1e-15)

    tex = (out / "table.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "eval/after/tpa" in tex
    assert "trace & 2.00 $\\pm$ 1.00 [n=3] & 50.0 $\\pm$ 0.0 [n=3] \\\\" in tex
    assert "no\\_kl" in tex


def test_formats_and_default_out_folder(sweep, capsys):
    assert main([str(sweep), "--format", "csv"]) == 0
    assert (sweep / "table.csv").is_file() and (sweep / "paired.csv").is_file()
    assert not (sweep / "table.md").exists() and not (sweep / "table.tex").exists()


def test_baseline_option_and_rows_by_setting(sweep):
    report = build_report(load_jobs([sweep]), metrics=[TPA], baseline="u2a")
    trace = pair(report, "trace")[TPA]  # 1-11, 2-13, 3-14
    assert trace.diff.mean == pytest.approx(-32 / 3, rel=1e-15) and trace.significant
    with pytest.raises(TablesError, match="--baseline nope: no such method.*trace, no_kl, u2a"):
        build_report(load_jobs([sweep]), baseline="nope")
    with pytest.raises(TablesError, match="--rows data.size: not a setting"):
        build_report(load_jobs([sweep]), rows_key="data.size")


def test_a_metric_no_run_has_is_named_with_keys_there_are(sweep, capsys):
    with pytest.raises(TablesError) as err:
        build_report(load_jobs([sweep]), metrics=["eval/after/tpa_shifted"])
    assert "eval/after/tpa_shifted" in str(err.value) and "eval/after/tpa" in str(err.value)
    assert main([str(sweep), "--metrics", "eval/after/nothing"]) == 2
    assert "trace-tables: error: no run has the metric eval/after/nothing" in capsys.readouterr().err


def test_paths_without_runs_are_errors(tmp_path, capsys):
    with pytest.raises(TablesError, match=f"{tmp_path / 'absent'}: no such folder"):
        load_jobs([tmp_path / "absent"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(TablesError, match=f"{tmp_path / 'empty'}: holds no run folders"):
        load_jobs([tmp_path / "empty"])
    assert main([str(tmp_path / "absent")]) == 2
    assert "absent: no such folder" in capsys.readouterr().err


def test_unreadable_metrics_name_the_file(tmp_path):
    bad = write_run(tmp_path / "r", config=base_config("trace", 0))
    (bad / "metrics.json").write_text("[1, 2]")
    with pytest.raises(TablesError, match=f"{bad / 'metrics.json'}: expected a JSON object"):
        load_jobs([bad])
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(TablesError, match="metrics.json: cannot be read as JSON"):
        load_jobs([bad])


def test_only_failed_jobs_is_an_error_listing_them(tmp_path, capsys):
    write_run(tmp_path / "r" / "0", config=base_config("trace", 0), failed="ValueError: bad data\n")
    assert main([str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "ValueError: bad data" in err and "no finished run" in err


def test_two_finished_runs_of_one_seed_are_refused(sweep, tmp_path):
    write_run(tmp_path / "again", config=base_config("trace", 0), overrides=["method=trace", "seed=0", "trainer.max_steps=2"],
              metrics={TPA: 7.0})
    with pytest.raises(TablesError, match="two finished runs of trace with seed 0"):
        build_report(load_jobs([sweep, tmp_path / "again"]))
    assert len(load_jobs([sweep, sweep / "0", sweep.parent])) == 11  # one folder given twice counts once


def test_a_method_whose_runs_all_failed_shows_n_zero():
    jobs = [Job("a0", {"ablation.name": "full", "seed": 0}, None, {TPA: 4.0}),
            Job("b0", {"ablation.name": "no_kl", "seed": 0}, None, None, failed="OSError: disk full")]
    report = build_report(jobs, metrics=[TPA])
    assert render.cell_text(row(report, "full"), TPA) == "4.00 [n=1]"
    assert render.cell_text(row(report, "no_kl"), TPA) == "– [n=0]"
    assert render.paired_text(pair(report, "no_kl")[TPA]) == "– [n=0]"
    assert "- failed: b0 (no_kl, seed 0): OSError: disk full" in render.render_markdown(report)


# ------------------------------------------------------------------------------------------------ grouping


def test_grouping_by_overrides_gives_setting_columns(tmp_path):
    root = tmp_path / "sweep"
    job = 0
    for size, tpa in ((5000, [10.0, 20.0]), (20000, [30.0, 50.0])):
        for seed in range(2):
            write_run(root / str(job), config=base_config("full", seed, **{"data.size": size}),
                      overrides=["experiment=table3_data_size", f"data.size={size}", f"seed={seed}"],
                      metrics={TPA: tpa[seed]})
            job += 1
    report = build_report(load_jobs([root]), metrics=[TPA])
    assert report.keys == ["method", "data.size"] and report.baseline == "full"  # full: TRACE's older name
    small, large = row(report, "full", **{"data.size": 5000}), row(report, "full", **{"data.size": 20000})
    assert (small.cells[TPA].mean, small.cells[TPA].n) == (15.0, 2)
    assert (large.cells[TPA].mean, large.cells[TPA].std) == (40.0, math.sqrt(200))
    assert report.paired == []  # the baseline is the only method
    by_size = build_report(load_jobs([root]), metrics=[TPA], rows_key="data.size")
    assert by_size.keys == ["data.size", "method"]
    assert [render.label_cells(r, by_size.keys) for r in by_size.rows] == [["5000", "full"], ["20000", "full"]]


def test_grouping_falls_back_to_run_json_without_overrides(tmp_path):
    """No .hydra/: the settings that differ in run.json, less the seed, paths, the method's own fields and a
    key that copies the seed (oracle.seed), are the setting columns."""
    root = tmp_path / "runs"
    values = {("full", 0.0): [60.0, 62.0], ("full", 0.2): [40.0, 44.0], ("no_kl", 0.0): [70.0, 71.0]}
    for (method, noise), tpa in values.items():
        for seed in range(2):
            folder = root / f"{method}-{noise}-{seed}"
            config = base_config(method, seed, **{"data.label_noise": noise, "trainer.default_root_dir": str(folder),
                                                  "data.cache_path": f"/cache/{method}-{noise}-{seed}"})
            write_run(folder, config=config, metrics={TPA: tpa[seed], BEFORE_TPA: 20.0 + seed})
    report = build_report(load_jobs([root]), metrics=[TPA])
    assert report.keys == ["method", "data.label_noise"]  # no per-run folder either
    assert row(report, "full", **{"data.label_noise": 0.2}).cells[TPA].mean == 42.0
    assert row(report, "no_kl", **{"data.label_noise": 0.0}).cells[TPA].std == math.sqrt(0.5)
    assert row(report, "before", kind="before", **{"data.label_noise": 0.0}).cells[TPA].mean == 20.5
    kl = pair(report, "no_kl")[TPA]  # 70-60, 71-62
    assert (kl.diff.mean, kl.diff.n) == (9.5, 2)
    assert [r.method for r, _ in report.paired if r.kind == "before"] == ["before", "before"]


def test_method_from_method_group_then_ablation():
    def job(overrides, config):
        return Job("x", config, overrides)

    assert collect.method_of(job({"method": "u2a", "ablation": "full"}, {})) == "u2a"
    # run.json's name is the ablated method's: the override `method=trace` names the method it ablated
    assert collect.method_of(job({"method": "trace", "ablation": "no_kl"}, {"method.name": "no_kl"})) == "no_kl"
    assert collect.method_of(job({"method": "trace_nll", "ablation": "no_kl"}, {})) == "trace_nll_no_kl"
    assert collect.method_of(job({"ablation": "none"}, {})) == "run"
    assert collect.method_of(job({}, {"method.name": "trace", "ablation.name": "full"})) == "trace"
    assert collect.method_of(job(None, {"ablation.name": "no_impact"})) == "no_impact"
    assert collect.parse_overrides(["+data.size=5000", "~logger", "oracle@judge=openai", "data.label_noise=0.1"]) == {
        "data.size": 5000, "logger": "<deleted>", "oracle@judge": "openai", "data.label_noise": 0.1}


def test_before_values_that_disagree_within_a_seed_are_noted():
    jobs = [Job(f"j{m}", {"ablation.name": m, "seed": 0}, None, {TPA: 1.0, BEFORE_TPA: b}) for m, b in
            (("full", 10.0), ("no_kl", 12.0))]
    report = build_report(jobs, metrics=[TPA])
    assert row(report, "before", kind="before").cells[TPA].mean == 11.0
    assert any("differs between the runs of seed 0" in n for n in report.notes)


# ----------------------------------------------------------------------------------------- paper numbers


def size_jobs(sizes=(5000, 7000), task_name=None):
    return [Job(f"j{size}-{seed}", {"ablation.name": "full", "seed": seed, "data.size": size},
                {"data.size": size, "seed": seed}, {TPA: 10.0 + seed}, task_name=task_name)
            for size in sizes for seed in range(2)]


def test_paper_rows_only_when_asked_or_named_and_never_averaged():
    assert not [r for r in build_report(size_jobs(), metrics=[TPA]).rows if r.kind == "paper"]
    asked = build_report(size_jobs(), metrics=[TPA], paper=["table3"])
    refs = [r for r in asked.rows if r.kind == "paper"]
    assert sorted((r.label, r.reported[TPA][0]) for r in refs) == [
        ("paper: Naive Oracle DPO (Gemma-2-9B, 5k)", 37.1), ("paper: Naive Oracle DPO (Llama-3.1-8B, 5k)", 35.9),
        ("paper: TRACE (Ours) (Gemma-2-9B, 5k)", 54.4), ("paper: TRACE (Ours) (Llama-3.1-8B, 5k)", 55.9)]
    assert all(r.settings == {"data.size": 5000} for r in refs)  # only the size the runs have
    assert "paper table3: 8 reference row(s) not shown, for settings the runs do not have (data.size=10000, " \
        "data.size=20000)" in asked.notes
    own = row(asked, "full", **{"data.size": 5000})
    assert (own.cells[TPA].mean, own.cells[TPA].n) == (10.5, 2)  # the runs alone
    assert "| paper: TRACE (Ours) (Llama-3.1-8B, 5k) | 5000 | 55.9 (paper) |" in render.render_markdown(asked)
    assert [r for r, _ in asked.paired if r.kind == "paper"] == []

    named = build_report(size_jobs(task_name="table3_data_size"), metrics=[TPA])
    assert list(named.paper_tables) == ["table3"] and [r for r in named.rows if r.kind == "paper"]
    off = build_report(size_jobs(task_name="table3_data_size"), metrics=[TPA], paper=["none"])
    assert not off.paper_tables and not [r for r in off.rows if r.kind == "paper"]
    with pytest.raises(TablesError, match="--paper table99: no such table.*table4"):
        build_report(size_jobs(), paper=["table99"])


def test_paper_table_whose_metrics_are_no_column_shows_only_as_its_own_table(sweep):
    report = build_report(load_jobs([sweep]), metrics=[UTIL])  # table4 is named by the task; TPA not shown
    assert list(report.paper_tables) == ["table4"] and not [r for r in report.rows if r.kind == "paper"]
    text = render.render_markdown(report)
    assert "| paper: w/o KL Regularization (Llama-3.1-8B) | 71.5 | 64.1 | 29.8 |" in text


def test_paper_numbers_as_transcribed():
    paper = aggregate.load_paper()["tables"]
    t4 = {r["method"]: r["values"] for r in paper["table4"]["rows"]}
    assert t4["TRACE (Full)"] == {"Policy Agreement": 70.7, "MMLU": 70.2, "ASR": 27.3}
    assert t4["w/o Impact Weighting"] == {"Policy Agreement": 62.8, "MMLU": 69.5, "ASR": 32.1}
    for trace in (r for r in paper["table3"]["rows"] if r["method"] == "TRACE (Ours)"):
        naive = next(r for r in paper["table3"]["rows"] if r["method"] == "Naive Oracle DPO"
                     and r["model"] == trace["model"] and r["data"] == trace["data"])
        assert trace["values"]["Δ"] == pytest.approx(trace["values"]["TPA"] - naive["values"]["TPA"], abs=1e-9)
    t2 = paper["table2"]["rows"][2]
    assert (t2["method"], t2["values"]["HellaSwag"], t2["pm"]["HellaSwag"]) == ("TRACE (Ours)", 78.2, 0.9)
    assert [r["values"]["(metric not named, %)"] for r in paper["table8"]["rows"] if r["method"] == "TRACE (Ours)"] \
        == [70.2, 67.4, 61.5]
    for name, table in paper.items():  # every value belongs to a declared metric
        for r in table["rows"]:
            assert set(r["values"]) <= set(table["metrics"]), (name, r["method"])


# ------------------------------------------------------------------------------------------------- plots

CURVES = """step,epoch,train/loss,train/loss_invert,train/loss_kl,train/grad_norm,select/tpa
0,0,0.70,0.69,0.01,,
0,0,,,,1.5,
1,0,0.60,0.55,0.02,1.2,
1,0,,,,,40.0
2,0,0.50,0.45,0.03,0.9,
"""


def test_read_curves_skips_blank_cells():
    curves = render.read_curves(CURVES)
    assert curves["train/loss"] == [(0.0, 0.7), (1.0, 0.6), (2.0, 0.5)]
    assert curves["train/grad_norm"] == [(0.0, 1.5), (1.0, 1.2), (2.0, 0.9)]
    assert curves["select/tpa"] == [(1.0, 40.0)] and "epoch" not in curves
    assert [title for title, _ in render.curve_panels(curves)] == ["loss terms", "selection TPA", "grad norm"]
    with pytest.raises(TablesError, match="no `step` column"):
        render.read_curves("a,b\n1,2\n")


@pytest.fixture
def grid(tmp_path) -> Path:
    """full and u2a over data.size 100 / 400 and data.label_noise 0 / 0.2, two seeds; curves in two runs."""
    root = tmp_path / "grid"
    job = 0
    for method in ("full", "u2a"):
        for size in (400, 100):
            for noise in (0.0, 0.2):
                for seed in range(2):
                    tpa = {"full": 50.0, "u2a": 30.0}[method] + size / 100 - 10 * noise + 2 * seed
                    write_run(root / str(job), config=base_config(method, seed, **{"data.size": size, "data.label_noise": noise}),
                              overrides=[f"ablation={method}", f"data.size={size}", f"data.label_noise={noise}", f"seed={seed}"],
                              metrics={TPA: tpa, BEFORE_TPA: 5.0}, curves=CURVES if job < 2 else None)
                    job += 1
    return root


def test_line_series_by_hand(grid):
    report = build_report(load_jobs([grid]), metrics=[TPA])
    series = {s.label: s for s in render.line_series(report, "data.size", TPA)}
    full = series["full (data.label_noise=0.0)"]
    assert full.xs == [100.0, 400.0] and full.ys == [52.0, 55.0]  # 50 + size/100 + mean seed offset 1
    assert full.errs == [T_REFERENCE[1] * math.sqrt(2) / math.sqrt(2)] * 2  # seeds 51 / 53: std sqrt(2), n 2
    assert series["u2a (data.label_noise=0.2)"].ys == [30.0, 33.0]
    assert series["before (M_old) (data.label_noise=0.0)"].ys == [5.0, 5.0]
    assert series["before (M_old) (data.label_noise=0.0)"].errs == [0.0, 0.0]  # std 0


def test_plots_are_written(grid, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main([str(grid), "--metrics", TPA, "--plots", "--out", str(out), "--format", "md"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "tpa_vs_data_size.png" in pngs and "tpa_vs_label_noise.png" in pngs
    curves = [p for p in pngs if p.startswith("curves_")]
    assert len(curves) == 2 and "curves_full_data.size=400_data.label_noise=0.0_seed0.png" in curves
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 5000


def test_plots_without_matplotlib_say_how_to_install(grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    from trace_realign.report import plots

    with pytest.raises(plots.MatplotlibMissing, match="pip install matplotlib"):
        plots.require_matplotlib()
    assert main([str(grid), "--metrics", TPA, "--plots", "--out", str(tmp_path / "o")]) == 2
    assert "trace-tables: error: plots need matplotlib" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- wandb


def test_wandb_logs_table_and_plots_offline_and_no_secret(grid, tmp_path, monkeypatch, capsys):
    secret = "sk-planted-" + "5" * 40
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    (tmp_path / "wb").mkdir()
    assert main([str(grid), "--metrics", TPA, "--wandb", "--plots", "--out", str(tmp_path / "o")]) == 0
    runs = list((tmp_path / "wb").rglob("offline-run-*"))
    assert len(runs) == 1
    files = [p for p in runs[0].rglob("*") if p.is_file()]
    tables_logged = [p for p in files if p.name.endswith(".table.json")]
    assert {p.name.split("_")[0] for p in tables_logged} == {"results", "paired"}
    results = json.loads(next(p for p in tables_logged if p.name.startswith("results")).read_text())
    assert "mean" in results["columns"] and len(results["data"]) == len(build_report(load_jobs([grid]), metrics=[TPA]).rows)
    assert len([p for p in files if p.suffix == ".png"]) == 4
    for path in (tmp_path / "wb").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------------------- packaging, SLURM


def test_pyproject_declares_the_script_data_and_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["trace-tables"] == "trace_realign.tables:main"
    assert any(d.startswith("matplotlib") for d in project["project"]["dependencies"])
    assert any(d.startswith("hydra-submitit-launcher") for d in project["project"]["optional-dependencies"]["slurm"])
    assert "paper_results.yaml" in project["tool"]["setuptools"]["package-data"]["trace_realign.report"]
    assert aggregate.PAPER_FILE.is_file()


def test_slurm_launcher_config(monkeypatch):
    path = CONF / "hydra" / "launcher" / "slurm.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert raw["defaults"][0] == "submitit_slurm"
    assert "trace-realign -m experiment=table4_ablation hydra/launcher=slurm" in path.read_text()
    cfg = OmegaConf.load(path)
    values = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "defaults"])
    for var in ("TRACE_SLURM_PARTITION", "TRACE_SLURM_TIMEOUT_MIN", "TRACE_SLURM_GPUS"):
        monkeypatch.delenv(var, raising=False)
    plain = OmegaConf.to_container(values, resolve=True)
    assert (plain["partition"], plain["timeout_min"], plain["gpus_per_node"]) == (None, 240, 1)
    monkeypatch.setenv("TRACE_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("TRACE_SLURM_TIMEOUT_MIN", "600")
    plain = OmegaConf.to_container(values, resolve=True)
    assert (plain["partition"], plain["timeout_min"]) == ("gpu", 600)

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # composing needs the plugin
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert composed.hydra.launcher._target_.endswith("SlurmLauncher")
    assert composed.hydra.launcher.timeout_min == 600


def test_an_experiments_report_block_names_the_columns_and_the_paper_table(sweep):
    # as experiment files set it: the columns of the table (one no evaluator measured yet) and its paper table
    declared = {"table": "table8", "rows": "method", "columns": [TPA, "eval/after/asr/overall", UTIL]}
    for folder in sweep.iterdir():
        if (folder / "config.yaml").is_file():
            cfg = yaml.safe_load((folder / "config.yaml").read_text())
            (folder / "config.yaml").write_text(yaml.safe_dump({**cfg, "task_name": "main_tpa", "report": declared}))
    report = build_report(load_jobs([sweep]))
    assert report.metrics == [TPA, "eval/after/asr/overall", UTIL]
    assert row(report, "trace").cells["eval/after/asr/overall"].n == 0  # an empty column, not a dropped one
    assert any("eval/after/asr/overall" in n and "not measured" in n for n in report.notes)
    assert list(report.paper_tables) == ["table8"]  # named by the block, not by the task name
    # --metrics still wins over the block
    assert build_report(load_jobs([sweep]), metrics=[UTIL]).metrics == [UTIL]


def test_an_evaluation_folder_gives_one_row_per_model_and_its_preference_against_each_other(tmp_path):
    """trace-eval's folders (one per seed of a `trace-eval -m seed=... models_from=SWEEP`) read as jobs of
    the models they compared: eval/<label>/ becomes eval/after/, a pair's preference the first model's."""
    root = tmp_path / "multirun" / "evaluate" / "t"
    win = {0: 80.0, 1: 70.0}
    for seed in (0, 1):
        write_run(root / str(seed), config={"models_from": "/sweep", "models": None, "seed": seed, "dataset.seed": seed},
                  overrides=[f"seed={seed}", "models_from=/sweep", "eval.preference.enabled=true"],
                  metrics={"eval/trace/tpa": 60.0 + seed, "eval/u2a/tpa": 40.0, "eval/items": 8.0,
                           "preference/trace_vs_u2a/win_rate": win[seed], "preference/u2a_vs_trace/win_rate": 100 - win[seed],
                           "preference/alpha": 0.5, "preference/trace/best": 60.0, "preference/u2a/best": 30.0},
                  task_name="evaluate")
    jobs = load_jobs([root])
    assert sorted((collect.method_of(j), collect.seed_of(j)) for j in jobs) == [("trace", 0), ("trace", 1), ("u2a", 0), ("u2a", 1)]
    trace0 = next(j for j in jobs if collect.method_of(j) == "trace" and collect.seed_of(j) == 0)
    assert trace0.metrics == {"eval/after/tpa": 60.0, "preference/win_rate_vs_u2a": 80.0, "preference/alpha_all": 0.5,
                              "preference/best": 60.0}
    report = build_report(jobs, metrics=["eval/after/tpa", "preference/win_rate_vs_u2a", "preference/best"])
    assert row(report, "trace").cells["preference/win_rate_vs_u2a"].mean == 75.0
    assert row(report, "u2a").cells["preference/win_rate_vs_u2a"].n == 0  # nobody wins over itself
    assert row(report, "u2a").cells["eval/after/tpa"].mean == 40.0


def test_paper_numbers_printed_in_percent_meet_lm_evals_fractions_through_scale(tmp_path):
    mmlu = "eval/after/capability/mmlu/acc"
    for seed in (0, 1):
        write_run(tmp_path / str(seed), config=base_config("trace", seed), overrides=["method=trace", f"seed={seed}"],
                  metrics={mmlu: 0.25 + seed / 100})
    report = build_report(load_jobs([tmp_path]), metrics=[mmlu], paper=["table2"])
    refs = {r.label: r.reported[mmlu] for r in report.rows if r.kind == "paper"}
    assert refs["paper: TRACE (Ours) (PKU-SafeRLHF)"] == pytest.approx((0.702, 0.008))  # printed 70.2 ± 0.8


def test_runs_whose_selection_kept_m_old_show_as_m_old_not_as_the_methods_score(tmp_path):
    root = tmp_path / "multirun"
    for seed, best in enumerate([0, 0, 25]):
        for method, step in (("trace", best), ("dpo_gold", 0)):
            write_run(root / f"{method}{seed}", config=base_config(method, seed), overrides=[f"method={method}", f"seed={seed}"],
                      metrics={TPA: 40.0 + seed, "select/best_step": step, BEFORE_TPA: 40.0, "train/steps": 2})
    report = build_report(load_jobs([root]), metrics=[TPA, "train/steps"])
    assert row(report, "trace").kept_m_old == 2 and row(report, "dpo_gold").kept_m_old == 3
    assert render.cell_text(row(report, "trace"), TPA).endswith("[n=3; kept M_old on 2 of 3]")
    assert render.cell_text(row(report, "dpo_gold"), TPA) == "kept M_old [n=3]"
    assert "kept" not in render.cell_text(row(report, "dpo_gold"), "train/steps")  # not an evaluation after


def test_a_paired_difference_prints_at_the_precision_its_scale_needs():
    from types import SimpleNamespace

    def text(mean, low, high):
        return render.paired_text(SimpleNamespace(diff=SimpleNamespace(mean=mean, low=low, high=high, n=3),
                                                  significant=low > 0 or high < 0))

    # a fraction (lm-eval's accuracy): the digits are kept, never +0.00 [+0.00, +0.00]
    assert text(0.004, 0.0012, 0.0068) == "+0.0040 [+0.0012, +0.0068] n=3 *"
    assert text(-0.03, -0.05, -0.01) == "-0.030 [-0.050, -0.010] n=3 *"
    # points (TPA): two decimals, as ever
    assert text(18.1, 9.81, 26.3) == "+18.10 [+9.81, +26.30] n=3 *"
    assert text(0.0, 0.0, 0.0) == "+0.00 [+0.00, +0.00] n=3"
