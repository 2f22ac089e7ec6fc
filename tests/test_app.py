"""The Hydra app end to end: every config option composes, every ablation and loss runs, outputs are
complete, adapters really train, and secrets never reach the outputs."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import CONF, FAST, ROOT, compose_cfg
from trace_realign.data import NoConflictsError
from trace_realign.train import run

REQUIRED_KEYS = [
    "triage/invert", "triage/punish", "triage/retain", "impact/nonzero", "impact/max",
    "train/loss", "train/loss_invert", "train/loss_punish", "train/loss_kl",
    "eval/before/tpa", "eval/after/tpa",
]
GROUPS = ["model", "dataset", "oracle", "loss", "ablation", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# What each option of a group is, as read back from the composed config.
CHOSEN = {
    "dataset": lambda c: c.dataset._target_.rsplit(".", 1)[1],
    "oracle": lambda c: c.oracle._target_.rsplit(".", 1)[1],
    "logger": lambda c: sorted(c.logger),
    "trainer": lambda c: (c.trainer.accelerator, str(c.trainer.strategy.get("_target_", c.trainer.strategy))
                          if not isinstance(c.trainer.strategy, str) else c.trainer.strategy),
    "model": lambda c: c.model.name_or_path or c.model.build.architecture,
    "ablation": lambda c: c.ablation.name,
    "loss": lambda c: c.loss.type,
}
EXPECTED_CHOICE = {
    ("dataset", "embedded"): "SyntheticWorld", ("dataset", "jsonl"): "JsonlSource",
    ("dataset", "pku_saferlhf"): "PkuSafeRLHF", ("dataset", "synthvaluebench"): "SynthValueBench",
    ("oracle", "labels"): "LabelOracle", ("oracle", "openai"): "OpenAIOracle", ("oracle", "programmatic"): "WorldJudge",
    ("logger", "csv"): ["csv"], ("logger", "wandb"): ["wandb"], ("logger", "none"): [],
    ("trainer", "default"): ("auto", "auto"), ("trainer", "cpu"): ("cpu", "auto"), ("trainer", "gpu"): ("gpu", "auto"),
    ("trainer", "ddp"): ("gpu", "ddp"), ("trainer", "fsdp"): ("gpu", "trace_realign.strategies.fsdp"),
    ("model", "tiny"): "llama", ("model", "llama-3.1-8b"): "meta-llama/Llama-3.1-8B",
    ("model", "qwen2.5-7b"): "Qwen/Qwen2.5-7B-Instruct", ("model", "gemma-2-9b"): "google/gemma-2-9b-it",
}


def targets(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["_target_"]] if "_target_" in node else []) + [t for v in node.values() for t in targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in targets(v)]
    return []


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_config_option_composes(group, option, tmp_path):
    from hydra.utils import get_object

    extra = ["dataset.train_path=x.jsonl"] if (group, option) == ("dataset", "jsonl") else []
    cfg = compose_cfg([f"{group}={option}", *extra], tmp_path)
    assert CHOSEN[group](cfg) == EXPECTED_CHOICE.get((group, option), option)
    for target in targets(OmegaConf.to_container(cfg, resolve=True)):
        assert callable(get_object(target)), target  # every class or function a config names exists
    if group == "loss":
        assert cfg.loss.beta > 0


def sweep_jobs(name: str) -> list[list[str]]:
    """Every job of an experiment file's sweep, as the override lists Hydra's basic sweeper makes."""
    import itertools

    from omegaconf import OmegaConf

    params = OmegaConf.load(CONF / "experiment" / f"{name}.yaml").get("hydra", {}).get("sweeper", {}).get("params", {})
    axes = [[f"{k}={v}" for v in str(values).split(",")] for k, values in params.items()]
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize("name", options("experiment"))
def test_every_job_of_every_experiment_file_composes(name, tmp_path):
    jobs = sweep_jobs(name)
    assert len(jobs) >= 2, f"experiment {name} sweeps nothing"
    for job in jobs:
        cfg = compose_cfg([f"experiment={name}", *job], tmp_path)
        for override in job:
            key, value = override.split("=", 1)
            if key == "ablation":
                assert cfg.ablation.name == value, (name, override)
            elif key == "loss":
                assert cfg.loss.type == value, (name, override)
            else:
                assert str(OmegaConf.select(cfg, key)) == value, (name, override)


def test_ablation_groups_set_their_flags(tmp_path):
    flags = {o: compose_cfg([f"ablation={o}"], tmp_path).ablation for o in options("ablation")}
    assert flags["no_triage"].triage is False
    assert flags["no_impact"].impact is False and flags["no_impact"].triage is True
    assert flags["no_kl"].kl is False and flags["no_kl"].impact is True
    assert flags["oracle_punish"].terms.punish == "relational_correction"
    assert flags["oracle_punish"].terms.invert == "relational_flip"


def test_hyperparameters_override_from_command_line(tmp_path):
    from trace_realign.train import build_datamodule

    cfg = compose_cfg(["optimizer.lr=0.5", "loss.beta=0.7", "objective.alpha_kl=2", "impact.gamma=3",
                       "impact.gold_batch_size=9", "objective.stop_grad_norm=0.01", "trainer.max_steps=7",
                       "model.lora.r=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj]",
                       "data.batch_size.retain=5", "trainer.accumulate_grad_batches=3", "loss=ipo", "loss.beta=0.7",
                       "objective.reduction=sum", "data.max_length=40", "data.max_prompt_length=20", "seed=4",
                       "data.size=11", "data.label_noise=0.3"], tmp_path)
    assert (cfg.impact.gamma, cfg.impact.gold_batch_size, cfg.objective.stop_grad_norm) == (3, 9, 0.01)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, list(cfg.model.lora.target_modules)) == (4, 8, ["q_proj"])
    # what the run builds from them reads them
    objective, dm = build_datamodule(cfg, None, None, None, tmp_path)
    assert (objective.beta, objective.relational, objective.alpha_kl, objective.reduction) == (0.7, "ipo", 2, "sum")
    assert dm.batch_size == {"invert": 8, "punish": 8, "retain": 5} and dm.seed == 4
    assert (dm.limits.max_length, dm.limits.max_prompt_length) == (40, 20)
    assert (dm.plan.size, dm.plan.label_noise) == (11, 0.3)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    assert optimizer.param_groups[0]["lr"] == 0.5
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert (trainer.max_steps, trainer.accumulate_grad_batches) == (7, 3)
    # an ablation without the KL anchor trains with alpha_KL = 0 whatever objective.alpha_kl says
    objective, _ = build_datamodule(compose_cfg(["ablation=no_kl", "objective.alpha_kl=2"], tmp_path), None, None,
                                    None, tmp_path)
    assert objective.alpha_kl == 0.0


def test_a_models_recipe_sets_lr_beta_and_alpha_kl_unless_overridden(tmp_path):
    tiny, hub = compose_cfg([], tmp_path), compose_cfg(["model=llama-3.1-8b"], tmp_path)
    for cfg in (tiny, hub):
        recipe = cfg.model.recipe
        assert (cfg.optimizer.lr, cfg.loss.beta, cfg.objective.alpha_kl) == (recipe.lr, recipe.beta, recipe.alpha_kl)
    assert (tiny.model.recipe.lr, tiny.model.recipe.beta) != (hub.model.recipe.lr, hub.model.recipe.beta)
    # without a recipe, the reference implementation's values
    bare = compose_cfg(["~model.recipe"], tmp_path)
    assert (bare.optimizer.lr, bare.loss.beta, bare.objective.alpha_kl) == (1e-4, 0.3, 0.1)
    ipo = compose_cfg(["model=llama-3.1-8b", "loss=ipo"], tmp_path)
    assert ipo.loss.beta == 0.1 != hub.loss.beta  # IPO's beta is a scale of its own, not the recipe's
    assert compose_cfg(["optimizer.lr=0.5", "loss.beta=0.2"], tmp_path).optimizer.lr == 0.5
    assert compose_cfg(["optimizer.lr=0.5", "loss.beta=0.2"], tmp_path).loss.beta == 0.2


def test_fsdp_strategy_instantiates(tmp_path):
    cfg = compose_cfg(["trainer=fsdp"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"


def _check_metrics(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in metrics, key
    assert all(isinstance(v, (int, float, str)) for v in metrics.values()), "metrics.json must be flat"
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert (out / "config.yaml").is_file()
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("ablation", ["full", "no_triage", "no_impact", "no_kl", "oracle_punish"])
def test_two_step_run_per_ablation(ablation, make_cfg):
    cfg = make_cfg(f"ablation={ablation}")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    m = _check_metrics(out)
    assert m["train/steps"] == 2
    n_conflict = m["triage/invert"] + m["triage/punish"]
    if ablation == "no_triage":
        assert m["triage/punish"] == m["data/rows"] and m["triage/invert"] == m["triage/retain"] == 0
    if ablation in ("no_impact", "no_triage"):
        assert m["impact/max"] == pytest.approx(1.0 / n_conflict)
    if ablation == "no_kl":
        # alpha_KL = 0: the KL is measured but does not enter the loss.
        assert m["train/loss"] == pytest.approx(m["train/loss_invert"] + m["train/loss_punish"], rel=1e-5)
    if ablation == "full":
        assert m["train/loss"] == pytest.approx(
            m["train/loss_invert"] + m["train/loss_punish"] + 0.1 * m["train/loss_kl"], rel=1e-5)
        assert m["triage/gt_accuracy"] == 1.0
    if ablation == "oracle_punish":
        triaged = [json.loads(line) for line in (out / "data" / "triaged.jsonl").read_text().splitlines()]
        assert all(r.get("correction") for r in triaged if r["category"] == "punish")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_two_step_run_per_loss(loss, make_cfg):
    # Uniform weights (no_impact): N w_i = 1, so the first step's terms are the losses at theta_ref themselves.
    cfg = make_cfg(f"loss={loss}", "ablation=no_impact")
    m = run(cfg)
    _check_metrics(Path(cfg.paths.output_dir))
    beta = cfg.loss.beta
    # First step is at theta_ref (Delta = 0, every log-ratio 0): l_rel(0), and NPO's 2 log 2 per pair.
    l0 = math.log(2) if loss == "sigmoid" else (1 / (2 * beta)) ** 2
    assert m["train/first_loss_invert"] == pytest.approx(l0, rel=1e-4)
    assert m["train/first_loss_punish"] == pytest.approx(2 * math.log(2), rel=1e-4)
    assert m["train/first_loss_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["train/first_loss"] == pytest.approx(l0 + 2 * math.log(2), rel=1e-4)
    assert m["train/loss_invert"] != m["train/first_loss_invert"]  # the second step is past theta_ref


@pytest.mark.slow
def test_sum_reduction_is_algorithm_1_literal(tmp_path):
    """sum: L_I = sum_{i in B_I} w_i l_i with w summing to 1 over the conflict set (Algorithm 1, line 24);
    mean: the batch mean of N w_i l_i. On the same first batch at theta_ref the two differ by exactly
    N / |B_I|, whatever the weights."""
    first = {}
    for reduction in ("sum", "mean"):
        cfg = compose_cfg([*FAST, f"objective.reduction={reduction}", "eval.enabled=false", "trainer.max_steps=1"],
                          tmp_path / reduction)
        first[reduction] = run(cfg)
    m = first["sum"]
    n_conflicts = m["triage/invert"] + m["triage/punish"]
    ratio = first["mean"]["train/first_loss_invert"] / m["train/first_loss_invert"]
    assert ratio == pytest.approx(n_conflicts / 2, rel=1e-5)  # data.batch_size.invert=2 in FAST
    impact = [json.loads(line)["weight"] for line in (tmp_path / "sum" / "data" / "impact.jsonl").read_text().splitlines()]
    assert sum(impact) == pytest.approx(1.0)


@pytest.mark.slow
def test_lora_adapter_weights_change(make_cfg):
    cfg = make_cfg("eval.enabled=false", "trainer.max_steps=3")
    run(cfg)
    weights = load_file(str(Path(cfg.paths.output_dir) / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must move"


@pytest.mark.slow
def test_lora_with_gradient_checkpointing_still_trains(make_cfg):
    cfg = make_cfg("eval.enabled=false", "model.gradient_checkpointing=true")
    run(cfg)
    weights = load_file(str(Path(cfg.paths.output_dir) / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_full_finetuning_switch(make_cfg):
    """Without LoRA the whole model trains, against a frozen copy of M_old: the saved model differs from
    M_old (the model realignment starts from, not the random base), and the first KL is 0."""
    from transformers import AutoModelForCausalLM

    from trace_realign.model import resolve_model_path
    from trace_realign.prealign import prealigned_model

    cfg = make_cfg("model.lora.enabled=false", "eval.enabled=false")
    m = run(cfg)
    trained = AutoModelForCausalLM.from_pretrained(Path(cfg.paths.output_dir) / "model")
    source = instantiate(cfg.dataset)
    base = resolve_model_path(cfg.model, source.corpus(), cfg.paths.cache_dir)

    def must_be_cached(*_):
        raise AssertionError("M_old was built by the run above and must come from the cache")

    m_old_path, _ = prealigned_model(cfg, base, must_be_cached, source)
    m_old = AutoModelForCausalLM.from_pretrained(m_old_path)
    diffs = {n: float((a - b).detach().abs().max())
             for (n, a), (_, b) in zip(trained.named_parameters(), m_old.named_parameters())}
    assert max(diffs.values()) > 0
    assert sum(d > 0 for d in diffs.values()) > len(diffs) / 2, "full fine-tuning moves most tensors, not an adapter's"
    assert m["train/first_loss_kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_grad_norm_threshold_stops_training(make_cfg):
    m = run(make_cfg("objective.stop_grad_norm=1e9", "trainer.max_steps=10", "eval.enabled=false"))
    assert m["train/steps"] == 1 and m["train/stopped_by_grad_norm"] == 1


def test_no_conflicts_stops_with_clear_message(make_cfg):
    # pi_new == pi_old: every chosen response still complies, so there is nothing to re-align.
    with pytest.raises(NoConflictsError, match="no pair to invert or punish"):
        run(make_cfg("dataset.policy_new=pi_old"))


@pytest.mark.slow
def test_empty_punish_category_still_trains(make_cfg, tmp_path):
    policy = (ROOT / "trace" / "world" / "policies" / "pi_new.yaml").read_text()
    # Keep politics as it was: with no tightened axis nothing is punished.
    policy = policy.replace("allowed: [neutral]", "allowed: [comply]")
    path = tmp_path / "no_punish.yaml"
    path.write_text(policy)
    m = run(make_cfg(f"dataset.policy_new={path}", "eval.enabled=false"))
    assert m["triage/punish"] == 0 and m["triage/invert"] > 0
    assert m["train/loss_punish"] == 0.0 and m["train/steps"] == 2


@pytest.mark.slow
def test_wandb_offline_without_credentials_and_no_key_in_outputs(make_cfg, tmp_path, monkeypatch):
    secret = "sk-planted-" + "7" * 40
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # a key in the environment must never be written anywhere
    from trace_realign.loggers import wandb_credentials_present

    assert not wandb_credentials_present()
    cfg = make_cfg("logger=wandb", "eval.enabled=false")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    offline = list(out.rglob("offline-run-*"))
    assert offline, "without credentials wandb must run offline"
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_wandb_with_key_in_environment_counts_as_credentials(monkeypatch, tmp_path):
    from trace_realign.loggers import wandb_credentials_present

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_present()


def test_package_imports_outside_repo_and_stdlib_trace_survives(tmp_path):
    code = ("import trace, trace_realign, sysconfig, os; "
            "assert os.path.dirname(trace.__file__) == sysconfig.get_paths()['stdlib'], trace.__file__; "
            "import trace_realign.train; print(trace_realign.__version__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def readme_run_command() -> list[str]:
    """The run command of the README's quick start (the line after its marker comment)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"# run the embedded default\n(trace-realign[^\n]*)", text)
    assert match, "README must show the run command under '# run the embedded default'"
    return shlex.split(match.group(1))


@pytest.mark.slow
def test_readme_run_command(tmp_path):
    cmd = readme_run_command() + FAST + [f"hydra.run.dir={tmp_path / 'out'}"]
    exe = Path(sys.executable).parent / cmd[0]
    res = subprocess.run([str(exe), *cmd[1:]], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HYDRA_FULL_ERROR": "1"}, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "outputs in" in res.stdout and "TPA, shifted axes" in res.stdout and "verdict:" in res.stdout
    _check_metrics(tmp_path / "out")
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_multirun_sweep_writes_one_folder_per_job(tmp_path):
    exe = Path(sys.executable).parent / "trace-realign"
    sweep = tmp_path / "sweep"
    res = subprocess.run([str(exe), "-m", "ablation=full,no_kl", *FAST, "eval.enabled=false",
                          f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    full, no_kl = (json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1"))
    # each folder holds its own job: its record, its overrides, and the loss its ablation defines
    assert "ablation=full" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "ablation=no_kl" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((sweep / "1" / "run.json").read_text())["config"]["ablation.kl"] is False
    assert full["train/loss"] == pytest.approx(full["train/loss_invert"] + full["train/loss_punish"] + 0.1 * full["train/loss_kl"], rel=1e-5)
    assert no_kl["train/loss"] == pytest.approx(no_kl["train/loss_invert"] + no_kl["train/loss_punish"], rel=1e-5)
    assert no_kl["train/loss_kl"] > 0


def test_bad_dataset_file_fails_before_training(make_cfg, tmp_path):
    from trace_realign.records import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, record 1, field 'chosen': empty text"):
        run(make_cfg("dataset=jsonl", f"dataset.train_path={bad}", "logger=none", fast=False))



def _impact(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data" / "impact.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path):
    """Impact scores are sharded over ranks and summed: the weights must equal a single process's, and
    only rank 0 writes outputs."""
    exe = str(Path(sys.executable).parent / "trace-realign")
    common = [*FAST, "eval.enabled=false", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, extra in ((one, []), (two, ["trainer=ddp", "trainer.devices=2"])):
        res = subprocess.run([exe, *common, *extra, f"hydra.run.dir={out}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    w1, w2 = _impact(one), _impact(two)
    assert [r["prompt"] for r in w1] == [r["prompt"] for r in w2]
    assert [r["weight"] for r in w2] == pytest.approx([r["weight"] for r in w1], rel=1e-5, abs=1e-9)
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["train/world_size"] == 2
    assert m2["train/batch_size_effective"] == 2 * json.loads((one / "metrics.json").read_text())["train/batch_size_effective"]
    assert not list(tmp_path.glob("outputs")), "no stray output folders from other ranks"


@pytest.mark.slow
def test_impact_weights_are_seeded_and_deterministic(make_cfg, tmp_path):
    outs = []
    for name in ("a", "b"):
        cfg = compose_cfg([*FAST, "eval.enabled=false"], tmp_path / name)
        run(cfg)
        outs.append(_impact(tmp_path / name))
    assert outs[0] == outs[1]
    weights = [r["weight"] for r in outs[0]]
    scores = [r["score"] for r in outs[0]]
    # line 20: max(0, <g_J, g_k> / gamma), normalised; gamma = 1 here
    positive = [max(0.0, x) for x in scores]
    assert weights == pytest.approx([x / sum(positive) for x in positive], rel=1e-5, abs=1e-9)
    assert any(x < 0 for x in scores) and any(x > 0 for x in scores)  # some clipped, some kept
    assert len({round(w, 6) for w in weights if w > 0}) > 1  # not the uniform fallback


@pytest.mark.slow
def test_default_m_old_follows_pi_old(tmp_path):
    """The default recipe really aligns the tiny model to pi_old (a minute on two CPU cores)."""
    cfg = compose_cfg(["trainer.max_steps=1", "logger=none", "trainer.enable_progress_bar=false"], tmp_path / "run")
    m = run(cfg)
    assert m["prealign/cached"] == 0.0 and m["prealign/seconds"] < 600
    assert m["eval/before/tpa_old"] >= 95, "M_old follows pi_old on held-out prompts"
    assert m["eval/before/tpa/shifted"] <= 10, "and so violates pi_new where the policy shifted"
    assert m["eval/before/utility"] >= 95, "and answers the held-out sums it was taught"
    assert m["eval/before/n"] == 800 and m["eval/before/tpa_ci95/shifted"] <= 5.0


@pytest.mark.slow
def test_a_category_without_a_term_gets_no_weight_and_no_batches(make_cfg):
    m = run(make_cfg("ablation.terms.invert=null", "eval.enabled=false"))
    assert m["train/loss_invert"] == 0.0 and m["train/steps"] == 2
    out = Path(make_cfg().paths.output_dir)
    rows = [json.loads(line) for line in (out / "data" / "impact.jsonl").read_text().splitlines()]
    assert all(r["weight"] == 0.0 for r in rows if r["category"] == "invert")
    assert any(r["weight"] > 0 for r in rows if r["category"] == "punish")


@pytest.mark.slow
def test_selection_by_oracle_runs_and_reports(make_cfg, caplog):
    import ast

    cfg = make_cfg("select.enabled=true", "select.every_n_steps=1", "select.prompts=4", "trainer.max_steps=3")
    with caplog.at_level("INFO", logger="trace_realign.select"):
        m = run(cfg)
    assert m["select/checks"] == 4  # theta_ref and each of the three steps
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("select: kept step"))
    history = ast.literal_eval(line[line.index(" of [") + 4:])
    assert [step for step, _ in history] == [0, 1, 2, 3]
    scores = [score for _, score in history]
    assert all(score in (0.0, 25.0, 50.0, 75.0, 100.0) for score in scores)  # percent of 4 judged prompts
    # the reported choice is the best score, the earliest step that reached it
    assert m["select/best_tpa"] == max(scores) and m["select/best_step"] == scores.index(max(scores))
    # the kept parameters are the ones saved and evaluated: theta_ref (LoRA B = 0) if step 0 was kept
    adapter = load_file(str(Path(cfg.paths.output_dir) / "adapter" / "adapter_model.safetensors"))
    moved = any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert moved == (m["select/best_step"] > 0)
    if m["select/best_step"] == 0:
        assert m["eval/after/tpa"] == m["eval/before/tpa"] and m["eval/after/utility"] == m["eval/before/utility"]


@pytest.mark.slow
def test_oracle_noise_reaches_triage_not_evaluation(tmp_path):
    from trace_realign.oracle import NoisyOracle
    from trace_realign.records import load_pairs
    from trace_realign.triage import triage
    from trace_realign.world import WorldJudge

    cfg = compose_cfg([*FAST, "oracle.noise=0.3", "dataset.pairs_per_axis=24"], tmp_path / "noisy")
    m = run(cfg)
    # triage is the noisy oracle's, seeded by the run's seed: the same flips as one made here
    world = instantiate(cfg.dataset)
    noisy = NoisyOracle(WorldJudge(), 0.3, seed=cfg.seed)
    expected = triage(world.train_pairs(), noisy, world.new).pairs
    triaged = load_pairs(tmp_path / "noisy" / "data" / "triaged.jsonl", require_category=True)
    assert [(p.prompt, p.chosen, p.category) for p in triaged] == [(p.prompt, p.chosen, p.category) for p in expected]
    assert m["oracle/noise"] == 0.3 and m["oracle/noise_flipped"] == noisy.flipped > 0
    assert m["triage/gt_accuracy"] < 1.0  # the noisy labels really changed triage
    clean = run(compose_cfg([*FAST, "dataset.pairs_per_axis=24"], tmp_path / "clean"))
    assert clean["triage/gt_accuracy"] == 1.0 and "oracle/noise" not in clean
    # evaluation judged M_old's generations with the clean judge in both runs
    assert m["eval/before/tpa"] == clean["eval/before/tpa"] and m["eval/before/tpa_old"] == clean["eval/before/tpa_old"]


@pytest.mark.slow
def test_llm_oracle_end_to_end_against_a_local_server(make_cfg, monkeypatch):
    from fake_openai import FakeOpenAI

    secret = "sk-planted-" + "5" * 32
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    server = FakeOpenAI()
    try:
        cfg = make_cfg("oracle=openai", f"oracle.base_url={server.url}", "oracle.progress=false")
        m = run(cfg)
    finally:
        server.close()
    assert m["oracle/calls"] == len(server.requests) > 0 and m["oracle/failed"] == 0
    # the fake server bills 100 input and 10 output tokens a call, at the config's 2.5 and 10 USD per million
    assert (m["oracle/input_tokens"], m["oracle/output_tokens"]) == (100 * m["oracle/calls"], 10 * m["oracle/calls"])
    assert m["oracle/cost_usd"] == pytest.approx(m["oracle/calls"] * (100 * 2.5 + 10 * 10.0) / 1e6)
    # this server finds nothing compliant: every pair is punished, no gold batch can be built
    assert m["triage/punish"] == m["data/rows"] and m["impact/gold_empty"] == 1
    out = Path(cfg.paths.output_dir)
    for path in list(out.rglob("*")) + list(Path(cfg.paths.cache_dir).rglob("*.jsonl")):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_trace_data_pays_once_and_trace_realign_reuses_its_verdicts(tmp_path):
    from fake_openai import FakeOpenAI

    from trace_realign.prepare import prepare

    server = FakeOpenAI()
    try:
        common = [*FAST, "oracle=openai", f"oracle.base_url={server.url}", "oracle.progress=false",
                  f"oracle.cache_path={tmp_path / 'verdicts.jsonl'}", "eval.enabled=false", "ablation=no_impact"]
        data = prepare(compose_cfg(common, tmp_path / "data_run"))
        assert (tmp_path / "data_run" / "data" / "triaged.jsonl").is_file()
        assert data["oracle/calls"] == 2 * data["data/rows"] and data["oracle/cached"] == 0
        trained = run(compose_cfg(common, tmp_path / "train_run"))
    finally:
        server.close()
    # the triage stage itself is reused from the stage cache: not even a cached verdict is looked up
    assert trained["oracle/calls"] == 0 and trained["data/cache_hits"] >= 1
    assert json.loads((tmp_path / "data_run" / "metrics.json").read_text())["triage/punish"] == trained["triage/punish"]
