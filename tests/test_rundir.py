"""A run directory belongs to one configuration: a second run of another configuration into it is
refused and leaves it untouched; a re-run of the same configuration replaces it; a failed run says why
and leaves no metrics behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, compose_cfg

from trace_realign.core.rundir import FAILED_FILE, RUN_FILE, RunDirError, claim, record_environment, record_failure


def test_claim_records_then_accepts_the_same_configuration(tmp_path):
    cfg = compose_cfg(["seed=3"], tmp_path)
    claim(tmp_path, cfg)
    assert json.loads((tmp_path / RUN_FILE).read_text())["config"]["seed"] == 3
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / FAILED_FILE).write_text("ValueError: an earlier failure")
    claim(tmp_path, compose_cfg(["seed=3", "trainer.enable_progress_bar=false"], tmp_path))  # not a setting of the result
    assert not (tmp_path / "metrics.json").exists(), "a re-run must not leave the last run's numbers looking current"
    assert not (tmp_path / FAILED_FILE).exists(), "nor the last run's failure"
    with pytest.raises(RunDirError, match=r"seed: 3 there, 4 now"):
        claim(tmp_path, compose_cfg(["seed=4"], tmp_path))


def test_a_run_records_what_it_computed_under_and_a_rerun_its_own(tmp_path, monkeypatch):
    import torch

    import trace_realign.core.environment as environment

    cfg = compose_cfg(["seed=3"], tmp_path)
    claim(tmp_path, cfg)
    record_environment(tmp_path, torch.device("cpu"))
    env = json.loads((tmp_path / RUN_FILE).read_text())["environment"]
    assert env["libraries"]["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["device"] == "cpu" and env["python"] == sys.version.split()[0]
    head = subprocess.run(["git", "-C", str(Path(environment.__file__).parents[2]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: its commit, marked when the source differs from it
        assert env["source"].removesuffix("-dirty") == head.stdout.strip()
    real = environment.versions
    monkeypatch.setattr(environment, "versions", lambda names: {**real(names), "torch": "9.9"})
    claim(tmp_path, cfg)  # the environment is no setting: the same configuration's re-run
    record_environment(tmp_path, torch.device("cpu"))
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["environment"]["libraries"]["torch"] == "9.9" and record["config"]["seed"] == 3


@pytest.mark.parametrize("first,again", [
    (["logger=csv"], ["logger=none"]), (["logger=none"], ["logger=wandb"]),
    (["tags=[a]", "task_name=x"], ["tags=[]", "task_name=y"]),
    (["paths.cache_dir=/tmp/one"], ["paths.cache_dir=/tmp/two"]),
    (["oracle=openai", "oracle.base_url=http://x/v1"], ["oracle=openai", "oracle.base_url=http://x/v1", "oracle.progress=false"]),
    (["checkpoint.every_n_steps=10"], ["checkpoint.every_n_steps=null"]),  # how often a run saves its state
    (["eval.cache_before=true"], ["eval.cache_before=false"]),  # a stored evaluation is what evaluating gives
])
def test_settings_of_where_and_how_visibly_a_run_works_do_not_make_another_configuration(tmp_path, first, again):
    claim(tmp_path, compose_cfg(first, tmp_path))
    claim(tmp_path, compose_cfg(again, tmp_path))  # a re-run, not another configuration
    with pytest.raises(RunDirError, match="loss.beta"):
        claim(tmp_path, compose_cfg([*again, "loss.beta=0.9"], tmp_path))


def test_a_record_that_still_holds_the_empty_logger_node_is_the_same_configuration(tmp_path):
    claim(tmp_path, compose_cfg(["logger=none"], tmp_path))
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert "logger" not in record["config"]
    record["config"]["logger"] = {}  # as written before the empty node counted as a logger setting
    (tmp_path / RUN_FILE).write_text(json.dumps(record))
    claim(tmp_path, compose_cfg(["logger=csv"], tmp_path))


def test_claim_refuses_another_configuration_naming_what_differs(tmp_path):
    claim(tmp_path, compose_cfg(["ablation=no_triage"], tmp_path))
    (tmp_path / "metrics.json").write_text('{"old": 1}')
    with pytest.raises(RunDirError, match=r"method.name: 'no_triage' there, 'trace' now"):
        claim(tmp_path, compose_cfg(["method=trace"], tmp_path))
    assert (tmp_path / "metrics.json").read_text() == '{"old": 1}'  # untouched


def test_claim_refuses_a_folder_with_outputs_and_no_record(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(RunDirError, match="no record of its configuration"):
        claim(tmp_path, compose_cfg([], tmp_path))


def test_record_failure_says_why_and_removes_metrics(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    try:
        raise ValueError("the oracle said no")
    except ValueError as exc:
        record_failure(tmp_path, exc)
    text = (tmp_path / FAILED_FILE).read_text()
    assert text.startswith("ValueError: the oracle said no") and "Traceback" in text
    assert not (tmp_path / "metrics.json").exists()


def app(out: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "trace-realign"
    return subprocess.run([str(exe), *FAST, "eval.enabled=false", f"hydra.run.dir={out}", *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "1"})


@pytest.mark.slow
def test_a_pinned_run_dir_used_twice(tmp_path):
    """The scenario that trained "full" on no_triage's data: now refused, and the first run's folder,
    Hydra's record included, is left exactly as it was."""
    out = tmp_path / "run"
    first = app(out, "ablation=no_triage")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".log"}
    second = app(out, "method=trace")
    assert second.returncode != 0 and "holds a run of another configuration" in second.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after == before
    assert "no_triage" in (out / ".hydra" / "overrides.yaml").read_text()
    again = app(out, "ablation=no_triage")  # the same configuration re-runs into its own folder
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["triage/punish"] > 0


@pytest.mark.slow
def test_a_failed_run_leaves_why_and_no_metrics(tmp_path):
    out = tmp_path / "run"
    res = app(out, "dataset.policy_new=pi_old")  # nothing to re-align: the run stops
    assert res.returncode != 0
    assert "NoConflictsError" in (out / FAILED_FILE).read_text()
    assert not (out / "metrics.json").exists()


def data_app(out: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "trace-data"
    fast = [o for o in FAST if o.startswith("dataset.")]
    return subprocess.run([str(exe), *fast, f"hydra.run.dir={out}", *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HYDRA_FULL_ERROR": "1"})


def test_trace_data_claims_its_folder_and_a_failure_says_why(tmp_path):
    out = tmp_path / "run"
    first = data_app(out, "seed=1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((out / RUN_FILE).read_text())["config"]["seed"] == 1 and (out / ".hydra").is_dir()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = data_app(out, "seed=2")
    assert other.returncode != 0 and "holds a run of another configuration" in other.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    failed = data_app(tmp_path / "failed", "dataset.policy_new=pi_old")  # nothing to re-align: it stops
    assert failed.returncode != 0
    assert (tmp_path / "failed" / FAILED_FILE).read_text().startswith("NoConflictsError: ")
    assert not (tmp_path / "failed" / "metrics.json").exists()
