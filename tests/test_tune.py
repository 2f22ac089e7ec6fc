"""experiments/tune.py: one procedure for every method (the declared space and objective), the held-out
seeds refused, a study that resumes, and the chosen settings written with the command that chose them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import FAST, ROOT

SCRIPT = ROOT / "experiments" / "tune.py"
SHORT = [*FAST, *(f"model.prealign.stages.{s}.batch_size=4" for s in ("pretrain", "sft", "dpo"))]


def load():
    spec = importlib.util.spec_from_file_location("tune", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(metrics: dict[str, float]) -> dict[str, float]:
    base = {"eval/after/tpa/shifted": 50.0, "eval/after/tpa/unchanged": 99.0, "eval/after/utility": 98.0,
            "eval/before/utility": 99.0}
    return {**base, **metrics}


def test_the_objective_ranks_every_feasible_trial_above_every_infeasible_one():
    tune = load()
    ok, parts = tune.objective_of([run({}), run({"eval/after/tpa/shifted": 70.0})])
    assert ok == 60.0 and parts["feasible"] == 1.0
    # the unchanged axes below 95 on average, or utility more than 2 points under M_old's: infeasible
    low, _ = tune.objective_of([run({"eval/after/tpa/shifted": 100.0, "eval/after/tpa/unchanged": 90.0})])
    broke, _ = tune.objective_of([run({"eval/after/tpa/shifted": 100.0, "eval/after/utility": 96.9})])
    assert low == broke == 0.0 and low < tune.objective_of([run({"eval/after/tpa/shifted": 1.0})])[0]


def test_alpha_kl_is_searched_only_where_the_method_trains_a_kl_anchor():
    tune = load()
    assert tune.method_trains_kl("trace", []) and tune.method_trains_kl("trace", ["ablation=no_impact"])
    assert not any(tune.method_trains_kl(m, []) for m in ("dpo", "dpo_gold", "u2a", "naive_oracle_dpo"))
    assert not tune.method_trains_kl("trace", ["ablation=no_kl"])


def test_the_held_out_seeds_are_refused():
    res = subprocess.run([sys.executable, str(SCRIPT), "--method", "trace", "--seeds", "0", "7"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "seeds 5-9 are held out" in res.stderr


@pytest.mark.slow
def test_a_study_writes_its_choice_and_the_command_and_resumes(tmp_path):
    out = tmp_path / "tune"
    cmd = [sys.executable, str(SCRIPT), "--method", "trace", "--trials", "1", "--seeds", "0", "--steps", "2",
           "--out", str(out), "--", *SHORT, "ablation=no_kl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    best = (out / "best.yaml").read_text()
    assert "# chosen by: python experiments/tune.py --method=trace --trials=1" in best and "ablation=no_kl" in best
    assert "optimizer.lr=" in best and "loss.beta=" in best and "trainer.max_steps=2" in best
    assert "alpha_kl" not in best  # no_kl trains no KL anchor
    # the chosen row, as model.tuned holds it for recipe=tuned
    row = yaml.safe_load(best)["no_kl"]
    assert set(row) == {"lr", "beta", "max_steps"} and row["max_steps"] == 2
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 2 and "per_seed_shifted" in rows[0]
    # the study is kept: asking again for the same number of trials runs nothing new
    stamp = (out / "trial0" / "seed0" / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and (out / "trial0" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp
    # but never under another setup: its trials would be mixed with this one's
    other = subprocess.run([*cmd, "data.size=10"], capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode == 2 and "ran under another setup (overrides:" in other.stderr and "data.size=10" in other.stderr
    assert (out / "trial0" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp


def test_recipe_tuned_reads_the_methods_row_and_refuses_a_method_without_one():
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    import trace_realign  # noqa: F401  (registers the `tuned` resolver, as every app does)

    row = "++model.tuned.dpo_gold={lr: 0.002, beta: 0.5, max_steps: 100}"
    cfg = compose_cfg(["recipe=tuned", "method=dpo_gold", row])
    assert (cfg.optimizer.lr, cfg.loss.beta, cfg.trainer.max_steps) == (0.002, 0.5, 100)
    assert cfg.objective.alpha_kl == 0.1  # a method without a KL anchor has no alpha_KL in its row
    # an ablation at another method's recipe names the row
    ablation = compose_cfg(["recipe=tuned", "ablation=no_kl", "model.recipe.tuned_for=dpo_gold", row])
    assert (ablation.optimizer.lr, ablation.trainer.max_steps, ablation.method.alpha_kl) == (0.002, 100, 0.0)
    # the command line still wins over the recipe
    assert compose_cfg(["recipe=tuned", "method=dpo_gold", row, "trainer.max_steps=7"]).trainer.max_steps == 7
    with pytest.raises(Exception, match="no tuned recipe for method=sft.*experiments/tune.py --method sft"):
        OmegaConf.to_container(compose_cfg(["recipe=tuned", "method=sft", row]), resolve=True)


def test_another_methods_row_of_the_tuned_table_is_no_difference_between_runs():
    from trace_realign.core.rundir import differences, volatile

    assert volatile("model.tuned.u2a.lr") and not volatile("optimizer.lr")
    stored = {"optimizer.lr": 0.001, "model.tuned.trace.lr": 0.001}
    assert differences(stored, {**stored, "model.tuned.u2a.lr": 0.5}) == []
    assert differences(stored, {**stored, "optimizer.lr": 0.5})  # the run's own setting still is


def test_a_method_without_a_row_runs_at_the_row_its_table_names_and_its_own_row_comes_first():
    """An ablation keeps its method's recipe; dpo and rdpo run at DPO-Gold's."""
    from conftest import compose_cfg

    import trace_realign  # noqa: F401

    rows = ["++model.tuned.trace={lr: 0.002, beta: 0.5, alpha_kl: 0.7, max_steps: 100}",
            "++model.tuned.dpo_gold={lr: 0.0003, beta: 0.2, max_steps: 50}"]
    for ablation in ("no_kl", "no_triage", "no_triage_ref", "no_impact", "oracle_punish"):
        cfg = compose_cfg(["recipe=tuned", f"ablation={ablation}", *rows])
        assert (cfg.optimizer.lr, cfg.loss.beta, cfg.trainer.max_steps) == (0.002, 0.5, 100), ablation
    for shared in ("dpo", "rdpo"):
        cfg = compose_cfg(["recipe=tuned", f"method={shared}", *rows])
        assert (cfg.optimizer.lr, cfg.loss.beta, cfg.trainer.max_steps) == (0.0003, 0.2, 50), shared
    own_row = "++model.tuned.rdpo={lr: 0.01, beta: 0.9, max_steps: 200}"
    own = compose_cfg(["recipe=tuned", "method=rdpo", *rows, own_row])
    assert (own.optimizer.lr, own.trainer.max_steps) == (0.01, 200)
    # the command line's choice comes before both
    chosen = compose_cfg(["recipe=tuned", "ablation=no_kl", "model.recipe.tuned_for=dpo_gold", *rows])
    assert chosen.optimizer.lr == 0.0003


def test_dpo_shares_dpo_golds_row_because_it_composes_alike_but_for_its_name(tmp_path):
    """Why model.tuned needs no study of dpo (method.tuned_as): every resolved setting of a run is DPO-Gold's."""
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    import trace_realign  # noqa: F401

    def flat(method: str) -> dict:
        cfg = OmegaConf.to_container(compose_cfg([f"method={method}"], tmp_path), resolve=True)
        out: dict = {}

        def walk(node, prefix=""):
            for k, v in node.items():
                (walk(v, f"{prefix}{k}.") if isinstance(v, dict) else out.__setitem__(f"{prefix}{k}", v))
        walk(cfg)
        return out

    dpo, gold = flat("dpo"), flat("dpo_gold")
    assert {k for k in dpo.keys() | gold.keys() if dpo.get(k) != gold.get(k)} == {"method.name", "method.tuned_as"}


def test_rdpo_at_its_default_epsilon_is_dpo_to_the_bit_gradients_included():
    """Why rdpo shares DPO-Gold's row at eps = 0 (the reference's default)."""
    from trace_realign.method.losses import relational_loss

    torch.manual_seed(0)
    logps = [torch.randn(64, dtype=torch.float32, requires_grad=True) for _ in range(4)]
    grads = {}
    for kind in ("sigmoid", "robust"):
        loss = relational_loss(*logps, beta=0.37, kind=kind, label_smoothing=0.0)
        grads[kind] = (loss.detach(), torch.autograd.grad(loss.sum(), logps))
    assert torch.equal(grads["sigmoid"][0], grads["robust"][0])
    assert all(torch.equal(a, b) for a, b in zip(grads["sigmoid"][1], grads["robust"][1]))
