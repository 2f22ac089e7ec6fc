"""The Hydra app end to end: every config option composes, every method and loss runs, outputs are
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
from conftest import CONF, FAST, ROOT, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import load_file

from trace_realign.data.sources import NoConflictsError
from trace_realign.train import run

REQUIRED_KEYS = [
    "triage/invert", "triage/punish", "triage/retain", "impact/nonzero", "impact/max",
    "train/loss", "train/loss_invert", "train/loss_punish", "train/loss_kl",
    "eval/before/tpa", "eval/after/tpa",
]
GROUPS = ["model", "dataset", "oracle", "loss", "method", "ablation", "trainer", "logger", "eval", "shifts"]


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
    "method": lambda c: c.method.name,
    "ablation": lambda c: c.method.name,  # the ablated method is named for its ablation
    "loss": lambda c: c.loss.type,
    "shifts": lambda c: list(c.shifts.policies),
    "eval": lambda c: (list(c.eval.evaluators), list(c.eval.evaluators.capability.tasks)),
}
EXPECTED_CHOICE = {
    ("dataset", "embedded"): "SyntheticWorld", ("dataset", "jsonl"): "JsonlSource",
    ("dataset", "pku_saferlhf"): "PkuSafeRLHF", ("dataset", "synthvaluebench"): "SynthValueBench",
    ("oracle", "labels"): "LabelOracle", ("oracle", "openai"): "OpenAIOracle", ("oracle", "programmatic"): "WorldJudge",
    ("logger", "csv"): ["csv"], ("logger", "wandb"): ["wandb"], ("logger", "none"): [],
    ("trainer", "default"): ("auto", "auto"), ("trainer", "cpu"): ("cpu", "auto"), ("trainer", "gpu"): ("gpu", "auto"),
    ("trainer", "ddp"): ("gpu", "ddp"), ("trainer", "fsdp"): ("gpu", "trace_realign.method.strategies.fsdp2"),
    ("trainer", "fsdp1"): ("gpu", "trace_realign.method.strategies.fsdp"),
    ("model", "tiny"): "llama", ("model", "llama-3.1-8b"): "meta-llama/Llama-3.1-8B",
    ("model", "qwen2.5-7b"): "Qwen/Qwen2.5-7B-Instruct", ("model", "gemma-2-9b"): "google/gemma-2-9b-it",
    ("model", "smollm2-135m"): "HuggingFaceTB/SmolLM2-135M-Instruct",
    ("eval", "default"): (["tpa", "utility", "capability", "asr"], []),
    ("ablation", "none"): "trace",
    ("shifts", "none"): [], ("shifts", "chain"): ["pi_new", "pi_2"], ("shifts", "direct"): ["pi_2"],
    ("eval", "paper"): (["tpa", "utility", "capability", "asr"], ["gpqa_main_zeroshot", "mmlu", "hellaswag", "gsm8k"]),
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
            if key == "method":
                assert cfg.method.name == value, (name, override)
            elif key == "ablation":
                assert cfg.ablation.name == value, (name, override)
            elif key == "loss":
                assert cfg.loss.type == value, (name, override)
            elif key == "shifts":
                assert list(cfg.shifts.policies) == OmegaConf.load(CONF / "shifts" / f"{value}.yaml").policies, override
            else:
                assert str(OmegaConf.select(cfg, key)) == value, (name, override)


# What each method is, as (triage, untriaged, terms invert/punish/retain, weights, weighted, alpha_kl or None
# for "the objective's"): the tables the method files document, read back from the composed config.
METHODS = {
    "trace": (True, None, ("relational_flip", "npo", "kl"), "impact", ["invert", "punish"], None),
    "trace_nll": (True, None, ("relational_flip", "npo", "kl"), "impact", ["invert", "punish"], None),
    # the ablations of TRACE (conf/ablation/, `ablation=NAME` over method=trace)
    "no_impact": (True, None, ("relational_flip", "npo", "kl"), "uniform", ["invert", "punish"], None),
    "no_kl": (True, None, ("relational_flip", "npo", "kl"), "impact", ["invert", "punish"], 0.0),
    "no_triage": (False, "punish", ("relational_flip", "npo", "kl"), "uniform", ["invert", "punish"], None),
    "no_triage_ref": (True, None, ("npo_rejected",) * 3, "impact", ["invert", "punish", "retain"], 0.0),
    "oracle_punish": (True, None, ("relational_flip", "relational_correction", "kl"), "impact", ["invert", "punish"], None),
    "dpo": (True, None, ("relational_flip", "relational", "relational"), "uniform", ["invert", "punish"], 0.0),
    "dpo_old_labels": (False, "retain", (None, None, "relational"), "uniform", [], 0.0),
    "sft": (False, "retain", (None, None, "nll"), "uniform", [], 0.0),
    "rdpo": (True, None, ("relational_flip", "relational", "relational"), "uniform", ["invert", "punish"], 0.0),
    "dpo_gold": (True, None, ("relational_flip", "relational", "relational"), "uniform", ["invert", "punish"], 0.0),
    "dpo_gold_retrain": (True, None, ("relational_flip", "relational", "relational"), "uniform", ["invert", "punish"], 0.0),
    "gold_finetune": (True, None, ("relational_flip", "relational", "relational"), "uniform", ["invert", "punish"], 0.0),
    "naive_oracle_dpo": (True, None, ("relational_flip", "relational_flip", "relational"), "uniform", ["invert", "punish"], 0.0),
    "u2a": (True, None, ("npo_chosen", "npo", None), "impact", ["invert", "punish"], 0.0),
}


ABLATIONS = {"no_impact", "no_kl", "no_triage", "no_triage_ref", "oracle_punish"}


def chosen(name: str) -> str:
    """The override that selects a row of METHODS: a method, or an ablation of TRACE."""
    return f"ablation={name}" if name in ABLATIONS else f"method={name}"


def test_every_method_file_is_the_table_it_documents(tmp_path):
    assert sorted(set(METHODS) - ABLATIONS) == options("method")
    assert sorted(ABLATIONS | {"none"}) == options("ablation")
    for name, (triage, untriaged, terms, weights, weighted, alpha) in METHODS.items():
        m = compose_cfg([chosen(name)], tmp_path).method
        got = (m.triage, m.untriaged, (m.terms.invert, m.terms.punish, m.terms.retain), m.weights, list(m.weighted))
        assert got == (triage, untriaged, terms, weights, weighted), name
        assert m.alpha_kl == (0.1 if alpha is None else alpha), name  # None: the tiny model's recipe
        assert m.retrain is (name in ("dpo_gold_retrain", "gold_finetune")), name
        assert (m.retrain_from, m.retrain_stages) == (("m_old", ["sft", "dpo"]) if name == "gold_finetune" else ("base", None))
        assert (m.nll.weight, list(m.nll.categories)) == ((1.0, ["invert"]) if name == "trace_nll" else (0.0, [])), name
    # the reference's rDPO: TRL's robust loss at its default label smoothing, 0; a setting of the loss group
    assert compose_cfg(["method=rdpo"], tmp_path).method.loss == {"type": "robust"}
    assert compose_cfg(["method=rdpo"], tmp_path).loss.label_smoothing == 0.0


def test_dpo_gold_punished_pairs_follow_data_dpo_gold_punish(tmp_path):
    for rule, term in (("keep", "relational"), ("drop", None), ("correction", "relational_correction")):
        for name in ("dpo_gold", "dpo", "rdpo", "dpo_gold_retrain", "gold_finetune"):
            assert compose_cfg([f"method={name}", f"data.dpo_gold_punish={rule}"], tmp_path).method.terms.punish == term
    with pytest.raises(Exception, match="dpo_gold_punish"):
        OmegaConf.to_container(compose_cfg(["method=dpo_gold", "data.dpo_gold_punish=swap"], tmp_path), resolve=True)


def test_a_method_with_an_unknown_or_missing_key_is_refused(tmp_path):
    from trace_realign.train import build_datamodule

    with pytest.raises(ValueError, match=r"unknown keys \['kl'\]"):
        build_datamodule(compose_cfg(["+method.kl=false"], tmp_path), None, None, None, tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \['weighted'\]"):
        build_datamodule(compose_cfg(["~method.weighted"], tmp_path), None, None, None, tmp_path)
    with pytest.raises(ValueError, match="method.weights"):
        build_datamodule(compose_cfg(["method.weights=topk"], tmp_path), None, None, None, tmp_path)


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
    # a method without the KL anchor trains with alpha_KL = 0 whatever objective.alpha_kl says
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


def test_fsdp_strategies_instantiate(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from trace_realign.method.strategies import FSDPTrainableCheckpoints, ShardedDataParallel, is_sharded

    fsdp1 = instantiate(compose_cfg(["trainer=fsdp1"], tmp_path).trainer.strategy)
    fsdp2 = instantiate(compose_cfg(["trainer=fsdp"], tmp_path).trainer.strategy)
    assert isinstance(fsdp1, FSDPTrainableCheckpoints) and isinstance(fsdp1, FSDPStrategy)
    assert isinstance(fsdp2, ShardedDataParallel)
    assert is_sharded(fsdp1) and is_sharded(fsdp2)


@pytest.mark.parametrize("overrides,refusal", [
    (["trainer=fsdp1", "trainer.accelerator=cpu"], "FSDP1 needs GPUs"),
    (["trainer=fsdp1", "trainer.accelerator=cpu", "ablation=no_impact", "select.enabled=false"], "FSDP1 needs GPUs"),
    (["trainer=fsdp1"], "impact scores call the policy outside the training step"),
    (["trainer=fsdp1", "ablation=no_impact", "select.enabled=true"], "select.enabled=false"),
    (["trainer=fsdp", "impact.method=loop"], "use impact.method=batched"),
    (["trainer=fsdp", "model.lora.enabled=false"], "set model.lora.enabled=true"),
    (["trainer=fsdp", "probe.enabled=true"], "probe.enabled=false"),
])
def test_a_trainer_that_cannot_carry_the_run_is_refused_before_any_work(overrides, refusal, make_cfg, monkeypatch):
    """Refused at start-up, naming the fix: nothing is triaged, loaded or written first."""
    import trace_realign.train as train

    monkeypatch.setattr(train, "build_judges", lambda *a: pytest.fail("the oracle was built before the refusal"))
    cfg = make_cfg(*overrides)
    with pytest.raises(ValueError, match=refusal):
        run(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_trainers_that_can_carry_the_run_pass_the_start_up_check(tmp_path):
    from trace_realign.method.strategies import check_distributed

    for overrides in (["trainer=fsdp"], ["trainer=ddp"], ["trainer=fsdp1", "ablation=no_impact", "select.enabled=false"],
                      ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"], ["trainer=fsdp", "method=dpo_gold_retrain"]):
        cfg = compose_cfg(overrides, tmp_path)
        if "trainer=fsdp1" in overrides:
            cfg.trainer.accelerator = "gpu"
        check_distributed(cfg)


def _check_metrics(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED_KEYS:
        assert key in metrics, key
    assert all(isinstance(v, (int, float, str)) for v in metrics.values()), "metrics.json must be flat"
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert (out / "config.yaml").is_file()
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_step_run_per_method(method, make_cfg):
    cfg = make_cfg(chosen(method))
    run(cfg)
    out = Path(cfg.paths.output_dir)
    retrain = method in ("dpo_gold_retrain", "gold_finetune")
    m = json.loads((out / "metrics.json").read_text()) if retrain else _check_metrics(out)
    triage, untriaged, terms, weights, weighted, _ = METHODS[method]
    if method == "dpo_gold_retrain":
        # nothing is fine-tuned: the pipeline that built M_old re-runs under pi_new's labels
        # (its pretraining stage is M_old's: the same data and settings, read from the cache)
        assert m["train/steps"] == 0 and m["retrain/stages_built"] == 2 and "eval/after/tpa" in m
        return
    if method == "gold_finetune":
        # M_old's SFT and DPO stages re-run from M_old under pi_new's labels: two stages built, no pretraining
        assert m["train/steps"] == 0 and m["finetune/stages_built"] == 2 and "retrain/stages_built" not in m
        assert "eval/after/tpa" in m
        return
    assert m["train/steps"] == 2
    served = {c: m[f"data/train/{c}"] for c in ("invert", "punish", "retain")}
    if not triage:
        # no oracle is asked: every pair is served as the method's one category
        assert served[untriaged] == m["data/rows"] and sum(served.values()) == m["data/rows"]
        assert "triage/gt_accuracy" not in m
    else:
        assert m["triage/gt_accuracy"] == 1.0 and min(served.values()) > 0
    n_weighted = sum(served[c] for c in weighted)
    if weights == "uniform" and n_weighted:
        assert m["impact/max"] == pytest.approx(1.0 / n_weighted)
    if weights == "impact":
        assert m["impact/gold_invert"] > 0 and len((out / "data" / "impact.jsonl").read_text().splitlines()) == n_weighted
    # the loss is the sum of the terms the table names (alpha_KL times the KL when retain is `kl`)
    alpha = cfg.method.alpha_kl if terms[2] == "kl" else 0.0
    assert m["train/loss"] == pytest.approx(
        m["train/loss_invert"] + m["train/loss_punish"] + m["train/loss_retain"] + alpha * m["train/loss_kl"], rel=1e-5)
    for category, term in zip(("invert", "punish", "retain"), terms):
        first = m[f"train/first_loss_{category}"]
        if term is None or term == "kl" or not served[category]:
            assert first == 0.0, (category, term)
        elif weights == "uniform" and term in ("relational", "relational_flip", "relational_correction"):
            assert first == pytest.approx(math.log(2), rel=1e-4)  # at theta_ref every margin is 0: -log sigma(0)
        elif weights == "impact" and category in weighted:
            assert first >= 0, (category, term)  # a batch of samples whose scores clipped to 0 weighs 0
        else:
            assert first > 0, (category, term)
    assert m["train/first_loss"] > 0
    if method == "oracle_punish":
        triaged = [json.loads(line) for line in (out / "data" / "triaged.jsonl").read_text().splitlines()]
        assert all(r.get("correction") for r in triaged if r["category"] == "punish")


def test_each_methods_loss_is_its_formula_by_hand(tmp_path):
    """Every method's objective, built from its config, on hand-chosen log-probabilities at one pair:
    the value its paper or its file writes down."""
    from trace_realign.method.objective import TERM_RESPONSES, category_losses
    from trace_realign.train import build_datamodule

    # log pi and log pi_ref of the responses of one pair: chosen, rejected, correction
    pol = {"chosen": -2.0, "rejected": -5.0, "correction": -3.0}
    ref = {"chosen": -3.0, "rejected": -4.0, "correction": -3.5}

    def lr(y: str) -> float:
        return pol[y] - ref[y]

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x))

    for name in sorted(METHODS):
        cfg = compose_cfg([chosen(name)], tmp_path)
        objective, _ = build_datamodule(cfg, None, None, None, tmp_path)
        beta, eps = objective.beta, objective.label_smoothing
        expected = {
            "relational": lambda a, b: -logsig(beta * (lr(a) - lr(b))),
            "npo": lambda a, b: -logsig(-beta * lr(a)) - logsig(-beta * lr(b)),
        }
        if name == "rdpo":
            assert objective.relational == "robust" and eps == 0.0  # the reference's: TRL's default
            objective = build_datamodule(compose_cfg([f"method={name}", "loss.label_smoothing=0.1"], tmp_path),
                                         None, None, None, tmp_path)[0]
            beta, eps = objective.beta, objective.label_smoothing
            assert eps == 0.1
            expected["relational"] = lambda a, b: (-(1 - eps) * logsig(beta * (lr(a) - lr(b)))
                                                   + eps * logsig(-beta * (lr(a) - lr(b)))) / (1 - 2 * eps)
        for category, term in objective.terms.items():
            if term in (None, "kl", "nll"):
                continue
            rows = TERM_RESPONSES[term]
            got = category_losses(category, torch.tensor([pol[y] for y in rows]), torch.tensor([ref[y] for y in rows]),
                                  objective).item()
            if len(rows) == 1:
                want = -logsig(-beta * lr(rows[0]))  # NPO on one response (U2A)
            else:
                want = expected["npo" if term == "npo" else "relational"](*rows)
            assert got == pytest.approx(want, rel=1e-6), (name, category, term)


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

    from trace_realign.models.loading import resolve_model_path
    from trace_realign.models.prealign import prealigned_model

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
    policy = (ROOT / "trace" / "data" / "world" / "policies" / "pi_new.yaml").read_text()
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
    from trace_realign.report.loggers import wandb_credentials_present

    assert not wandb_credentials_present()
    cfg = make_cfg("logger=wandb", "eval.enabled=false")
    run(cfg)
    out = Path(cfg.paths.output_dir)
    offline = list(out.rglob("offline-run-*"))
    assert offline, "without credentials wandb must run offline"
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_wandb_groups_a_sweep_by_task_and_types_each_job_by_method(tmp_path):
    logger = compose_cfg(["logger=wandb", "experiment=table8_noise", "method=u2a"], tmp_path).logger.wandb
    assert (logger.group, logger.job_type) == ("table8_noise", "u2a")


def test_wandb_with_key_in_environment_counts_as_credentials(monkeypatch, tmp_path):
    from trace_realign.report.loggers import wandb_credentials_present

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
    res = subprocess.run([str(exe), "-m", "ablation=none,no_kl", *FAST, "eval.enabled=false",
                          f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    full, no_kl = (json.loads((sweep / job / "metrics.json").read_text()) for job in ("0", "1"))
    # each folder holds its own job: its record, its overrides, and the loss its method defines
    assert "ablation=none" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "ablation=no_kl" in (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((sweep / "1" / "run.json").read_text())["config"]["method.alpha_kl"] == 0.0
    assert full["train/loss"] == pytest.approx(full["train/loss_invert"] + full["train/loss_punish"] + 0.1 * full["train/loss_kl"], rel=1e-5)
    assert no_kl["train/loss"] == pytest.approx(no_kl["train/loss_invert"] + no_kl["train/loss_punish"], rel=1e-5)
    assert no_kl["train/loss_kl"] > 0


def test_bad_dataset_file_fails_before_training(make_cfg, tmp_path):
    from trace_realign.core.records import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, record 1, field 'chosen': empty text"):
        run(make_cfg("dataset=jsonl", f"dataset.train_path={bad}", "logger=none", fast=False))



def _impact(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "data" / "impact.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_cpu_processes_match_one_process(tmp_path):
    """DDP and FSDP2 (gloo, two processes) against one process on the same seed: the impact weights (scored
    on each rank's share of the samples, then summed) and rank 0's first-step losses (rank 0 draws the same
    first batch at theta_ref) agree; selection runs with rank 0 alone judging; only rank 0 writes; and the
    two strategies, which see the same data on each rank and average the same gradients, save the same
    adapter, which loads back. Tolerances: 1e-5 relative (FSDP2's gathered layers sum in another order)."""
    from safetensors.torch import load_file

    from trace_realign.models.loading import load_for_eval

    exe = str(Path(sys.executable).parent / "trace-realign")
    common = [*FAST, "eval.enabled=false", "trainer.accelerator=cpu", "trainer.precision=32-true",
              "select.enabled=true", "select.every_n_steps=1", "select.prompts=4", "impact.batch_size=4"]
    runs = {"one": [], "ddp": ["trainer=ddp", "trainer.devices=2"], "fsdp": ["trainer=fsdp", "trainer.devices=2"]}
    for name, extra in runs.items():
        res = subprocess.run([exe, *common, *extra, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs}
    weights = {name: _impact(tmp_path / name) for name in runs}
    for name in ("ddp", "fsdp"):
        assert [r["prompt"] for r in weights[name]] == [r["prompt"] for r in weights["one"]]
        assert [r["weight"] for r in weights[name]] == pytest.approx([r["weight"] for r in weights["one"]], rel=1e-5, abs=1e-9)
        m = metrics[name]
        assert (m["train/world_size"], m["train/batch_size_effective"]) == (2, 2 * metrics["one"]["train/batch_size_effective"])
        firsts = [k for k in metrics["one"] if k.startswith("train/first_loss")]
        assert {k: m[k] for k in firsts} == pytest.approx({k: metrics["one"][k] for k in firsts}, rel=1e-5, abs=1e-7)
        assert m["select/checks"] == 3 and m["select/best_step"] == metrics["ddp"]["select/best_step"]
    ddp, fsdp = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6)
    for name in ("ddp", "fsdp"):
        model = load_for_eval(str(tmp_path / name / "adapter"), OmegaConf.to_container(compose_cfg([]).model, resolve=True))
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(ddp)
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
    assert m["prealign/cached"] == 0.0  # built here, from the base model (its time is in prealign/seconds)
    assert m["eval/before/tpa_old"] >= 95, "M_old follows pi_old on held-out prompts"
    assert m["eval/before/tpa/shifted"] <= 10, "and so violates pi_new where the policy shifted"
    assert m["eval/before/utility"] >= 95, "and answers the held-out sums it was taught"
    assert m["eval/before/n"] == 800 and m["eval/before/tpa_ci95/shifted"] <= 5.0


@pytest.mark.slow
def test_a_category_without_a_term_gets_no_weight_and_no_batches(make_cfg):
    m = run(make_cfg("method.terms.invert=null", "eval.enabled=false"))
    assert m["train/loss_invert"] == 0.0 and m["train/steps"] == 2
    out = Path(make_cfg().paths.output_dir)
    rows = [json.loads(line) for line in (out / "data" / "impact.jsonl").read_text().splitlines()]
    assert all(r["weight"] == 0.0 for r in rows if r["category"] == "invert")
    assert any(r["weight"] > 0 for r in rows if r["category"] == "punish")


@pytest.mark.slow
def test_selection_by_oracle_runs_and_reports(make_cfg, caplog):
    import ast

    cfg = make_cfg("select.enabled=true", "select.every_n_steps=1", "select.prompts=4", "trainer.max_steps=3")
    with caplog.at_level("INFO", logger="trace_realign.method.select"):
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
def test_eval_last_is_the_run_without_selection_from_the_same_run(tmp_path):
    """select.eval_last: the last step's parameters evaluated beside the kept ones, exactly what the same
    run without selection scores (judging candidates never moves training), and the kept ones are saved."""
    sel = ["select.enabled=true", "select.every_n_steps=1", "select.prompts=4", "trainer.max_steps=3"]
    m = run(compose_cfg([*FAST, *sel, "select.eval_last=true"], tmp_path / "sel"))
    plain = run(compose_cfg([*FAST, "trainer.max_steps=3"], tmp_path / "plain"))
    keys = [k for k in plain if k.startswith("eval/after/")]
    assert keys and {k: m[k.replace("/after/", "/last/")] for k in keys} == {k: plain[k] for k in keys}
    assert m["select/best_step"] < 3 or all(m[k] == m[k.replace("/after/", "/last/")] for k in keys)
    if m["select/best_step"] == 0:  # the kept parameters were put back after the last step's evaluation
        assert m["eval/after/tpa"] == m["eval/before/tpa"]


@pytest.mark.slow
def test_oracle_noise_reaches_triage_not_evaluation(tmp_path):
    from trace_realign.core.records import load_pairs
    from trace_realign.data.world import WorldJudge
    from trace_realign.oracle.base import NoisyOracle
    from trace_realign.oracle.triage import triage

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


def test_batched_and_loop_impact_give_the_same_weights(tmp_path):
    # The module end to end under both impact.method settings: same raw scores, same clipped weights.
    got = {}
    for method in ("batched", "loop"):
        cfg = compose_cfg(FAST + ["eval.enabled=false", "trainer.max_steps=1", f"impact.method={method}",
                                  "impact.batch_size=3"], tmp_path / method)
        run(cfg)
        out = Path(cfg.paths.output_dir)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["impact/method"] == method and metrics["impact/seconds"] > 0
        got[method] = [json.loads(line) for line in (out / "data" / "impact.jsonl").read_text().splitlines()]
    batched, loop = got["batched"], got["loop"]
    assert len(batched) == len(loop) > 3  # more conflict samples than one batch holds
    # fp32 forwards of a sample alone and in a padded batch differ in the last bits: a score that nearly
    # cancels (|w_k| << max |w|) is compared to within 1e-6 of the largest score instead
    scale = max(abs(r["score"]) for r in loop)
    assert [r["score"] for r in batched] == pytest.approx([r["score"] for r in loop], rel=1e-4, abs=1e-6 * scale)
    assert [r["weight"] for r in batched] == pytest.approx([r["weight"] for r in loop], rel=1e-4, abs=1e-9)
    assert [r["weight"] > 0 for r in batched] == [r["weight"] > 0 for r in loop]


@pytest.mark.parametrize("method", ["dpo_gold_retrain", "gold_finetune"])
def test_a_reference_with_perfect_labels_needs_a_model_this_package_aligned(method, make_cfg):
    with pytest.raises(ValueError, match="model.prealign"):
        run(make_cfg(f"method={method}", "model.prealign=null"))


@pytest.mark.slow
def test_the_likelihood_probe_follows_every_stance_and_changes_no_result(make_cfg, tmp_path):
    probed = make_cfg("probe.enabled=true", "probe.every_n_steps=1", "probe.prompts=2", "trainer.max_steps=3", "logger=csv")
    m = run(probed)
    plain = compose_cfg([*FAST, "trainer.max_steps=3"], tmp_path / "plain")
    p = run(plain)
    for axis in ("medical", "politics", "privacy", "risky"):
        for stance in ("comply", "refuse", "caveat", "neutral"):
            assert m[f"probe/start/logp/{axis}/{stance}"] < 0 and f"probe/end/logp/{axis}/{stance}" in m
        assert m[f"probe/start/entropy_first/{axis}"] >= 0
    # M_old's probabilities over the four stances of a prompt cannot sum past 1
    assert sum(math.exp(m[f"probe/start/logp/medical/{s}"]) for s in ("comply", "refuse", "caveat", "neutral")) <= 1 + 1e-6
    rows = (Path(probed.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "probe/logp/medical/comply" in header and "train/logps/invert/chosen" in header
    steps = {r.split(",")[header.index("step")] for r in rows[1:] if r.split(",")[header.index("probe/logp/medical/comply")]}
    assert steps == {"0", "1", "2", "3"}  # before the first step and after each
    # reading the policy changes nothing it computes
    assert {k: v for k, v in m.items() if k.startswith(("train/loss", "eval/after/"))} == \
        {k: v for k, v in p.items() if k.startswith(("train/loss", "eval/after/"))}


def test_the_probe_needs_a_dataset_with_response_groups():
    from trace_realign.eval.likelihood import probe_items

    with pytest.raises(ValueError, match="probe_responses"):
        probe_items(object(), [{"prompt": "x", "axis": "a"}], 2)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, method", [("reference", "trace"), ("reference_dpo", "dpo")])
def test_the_reference_recipes_train_one_epoch_with_the_reference_adapters(recipe, method, make_cfg):
    cfg = make_cfg(f"recipe={recipe}", f"method={method}")
    m = run(cfg)
    served = {c: m[f"data/train/{c}"] for c in ("invert", "punish", "retain")}
    per_step = sum(min(cfg.data.batch_size[c], n) for c, n in served.items())
    assert m["train/steps"] == math.ceil(sum(served.values()) / per_step) and m["train/epochs"] == 1.0
    adapter = json.loads((Path(cfg.paths.output_dir) / "adapter" / "adapter_config.json").read_text())
    want = {"reference": (32, 16, 0.1, {"q_proj", "v_proj"}),
            "reference_dpo": (16, 16, 0.05, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})}
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"], set(adapter["target_modules"])) == want[recipe]
    saved = OmegaConf.load(Path(cfg.paths.output_dir) / "config.yaml")
    assert saved.trainer.max_steps == m["train/steps"]  # the schedule ended where training did
