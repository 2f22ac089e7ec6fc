"""The ablation group: one component of a method's table changed, over any method that has it."""

from __future__ import annotations

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf


def test_an_ablation_of_trace_is_named_as_table_4_names_it_and_changes_only_its_component(tmp_path):
    base = OmegaConf.to_container(compose_cfg([], tmp_path).method, resolve=True)
    for ablation, changed in [("no_kl", {"alpha_kl": 0.0}), ("no_impact", {"weights": "uniform"}),
                              ("no_triage", {"triage": False, "untriaged": "punish", "weights": "uniform"}),
                              ("oracle_punish", {"terms": {**base["terms"], "punish": "relational_correction"}})]:
        method = OmegaConf.to_container(compose_cfg([f"ablation={ablation}"], tmp_path).method, resolve=True)
        assert method == {**base, **changed, "name": ablation, "tuned_as": "trace"}, ablation


def test_an_ablation_of_another_method_carries_both_names():
    method = compose_cfg(["method=trace_nll", "ablation=no_kl"]).method
    got = (method.name, method.alpha_kl, method.nll.weight, method.tuned_as)
    assert got == ("trace_nll_no_kl", 0.0, 1.0, "trace_nll")


@pytest.mark.parametrize("method, ablation, missing", [
    ("u2a", "no_kl", "method.terms.retain='kl'"),            # U2A trains no KL anchor
    ("dpo_gold", "no_impact", "method.weights='impact'"),    # DPO-Gold weighs its pairs uniformly
    ("naive_oracle_dpo", "oracle_punish", "method.terms.punish='npo'"),
    ("sft", "no_triage", "method.triage=True"),
])
def test_an_ablation_of_a_method_without_its_component_is_refused_naming_both(method, ablation, missing):
    with pytest.raises(ValueError, match=rf"ablation={ablation} .* needs {missing}, and method={method} has"):
        compose_cfg([f"method={method}", f"ablation={ablation}"])


def test_applying_an_ablation_twice_changes_nothing_more(tmp_path):
    from trace_realign.method.ablation import ablate

    once = compose_cfg(["ablation=no_triage"], tmp_path)
    again = OmegaConf.to_container(ablate(once), resolve=True)
    assert again == OmegaConf.to_container(once, resolve=True) and again["method"]["name"] == "no_triage"


def test_the_stages_that_build_m_old_never_see_the_runs_ablation(tmp_path):
    from trace_realign.models.prealign import stage_config

    cfg = compose_cfg(["ablation=no_kl"], tmp_path)
    stage = stage_config(cfg, "sft", cfg.model.prealign.stages.sft, "m", tmp_path)
    assert "ablation" not in stage and stage.method.name == "sft"
