"""Successive policy shifts: the world's third policy and its ground truth for any policy pair, D as the
organisation holds it at a later shift, a run starting from a prior run (model.from_run), agreement with
every policy of a chain, and the chain itself."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import FAST, compose_cfg

from trace_realign.data.world import SyntheticWorld, WorldJudge, load_policy
from trace_realign.data.world.synthetic import read_stance
from trace_realign.eval import EvalInputs, run_evaluators
from trace_realign.eval.tpa import TPA
from trace_realign.method.shifts import chain_policies, check_chain, drift_lines, shift_config
from trace_realign.models.from_run import FromRunError, finished_model
from trace_realign.oracle.triage import triage


def allows(policy, pair, response) -> bool:
    return read_stance(response) in policy.rules[pair.meta["axis"]]["allowed"]


def test_pi_2_shifts_an_axis_pi_new_left_alone_and_partly_reverts_one_of_its_shifts():
    old, new, two = load_policy("pi_old"), load_policy("pi_new"), load_policy("pi_2")
    left_alone = [a for a in old.rules if old.rules[a]["allowed"] == new.rules[a]["allowed"]]
    shifted_by_two = [a for a in left_alone if two.rules[a]["allowed"] != new.rules[a]["allowed"]]
    assert shifted_by_two == ["risky"]
    # medical: pi_new allowed answers with or without a caveat, pi_2 only with one; pi_old's refusal stays wrong
    assert set(two.rules["medical"]["allowed"]) < set(new.rules["medical"]["allowed"])
    assert not set(two.rules["medical"]["allowed"]) & set(old.rules["medical"]["allowed"])
    assert two.rules["privacy"] == new.rules["privacy"] and two.rules["politics"] == new.rules["politics"]


@pytest.mark.parametrize("seed", [0, 7])
def test_a_later_shift_serves_d_as_held_under_the_policy_before_with_the_ground_truth_of_the_shift(seed):
    first = SyntheticWorld(seed=seed)
    later = SyntheticWorld(seed=seed, policy_base="pi_old", policy_old="pi_new", policy_new="pi_2")
    d0, d1 = first.build()["train"], later.build()["train"]
    assert [p.prompt for p in d0] == [p.prompt for p in d1]  # the same data, re-annotated
    for p0, p1 in zip(d0, d1):
        assert allows(later.old, p1, p1.chosen) and not allows(later.old, p1, p1.rejected)  # a pi_new preference
        assert {p1.chosen, p1.rejected} <= {p0.chosen, p0.rejected} or p1.rejected == p0.chosen  # corrections win
    # the ground truth of pi_new -> pi_2 is what the judge finds
    result = triage(d1, WorldJudge(), later.new)
    assert not result.excluded and [p.category for p in result.pairs] == [p.meta["gt_category"] for p in d1]
    counts = Counter((p.meta["axis"], p.meta["gt_category"]) for p in d1)
    assert counts[("privacy", "retain")] == counts[("politics", "retain")] == 200  # the axes pi_2 left alone
    assert {c for (a, c) in counts if a == "risky"} == {"invert", "punish"}
    # DPO-Gold's data for the shift: every pair a pi_2 preference
    for p in later.relabelled("correction"):
        if p.meta["axis"] != "utility":
            assert allows(later.new, p, p.chosen) and not allows(later.new, p, p.rejected)


def test_policy_base_equal_to_policy_old_is_a_first_shift():
    a, b = SyntheticWorld(seed=3), SyntheticWorld(seed=3, policy_base="pi_old")
    assert [p.to_dict() for p in a.train_pairs()] == [p.to_dict() for p in b.train_pairs()]


def test_ground_truth_refuses_a_pair_the_old_policy_does_not_prefer():
    world = SyntheticWorld(seed=0)
    pair = next(p for p in world.build()["train"] if p.meta["axis"] == "medical")  # chosen: pi_old's refusal
    assert world.ground_truth(pair, world.old, world.new) == "invert"
    with pytest.raises(ValueError, match="pi_new does not prefer the chosen response"):
        world.ground_truth(pair, world.new, world.policy("pi_2"))


def test_from_run_refuses_a_missing_a_failed_and_an_unfinished_run(tmp_path):
    with pytest.raises(FromRunError, match="no such run folder"):
        finished_model(tmp_path / "nowhere")
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "FAILED").write_text("RuntimeError: boom\n\ntraceback")
    with pytest.raises(FromRunError, match=r"that run failed \(RuntimeError: boom\)"):
        finished_model(failed)
    unfinished = tmp_path / "unfinished"
    (unfinished / "adapter").mkdir(parents=True)
    (unfinished / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FromRunError, match="did not finish"):
        finished_model(unfinished)
    (unfinished / "metrics.json").write_text("{}")
    assert finished_model(unfinished) == unfinished / "adapter"


def test_tpa_reports_agreement_with_every_further_policy_from_the_same_responses(monkeypatch):
    import trace_realign.eval.base as base

    world = SyntheticWorld(seed=0, pairs_per_axis=4, test_prompts_per_axis=10)
    items = [it for it in world.eval_prompts() if it["kind"] == "value"]
    calls = []
    monkeypatch.setattr(base, "generate", lambda model, tok, prompts, *a, **k: calls.append(1) or
                        [WorldJudge().correct(p, world.new) for p in prompts])
    policies = {"pi_0": world.old, "pi_1": world.new, "pi_2": world.policy("pi_2")}
    inputs = EvalInputs(model=None, tokenizer=None, judge=WorldJudge(), new=world.new, old=world.old, items=items,
                        policies=policies)
    m, _, _ = run_evaluators({"tpa": TPA()}, inputs)
    assert len(calls) == 1  # one generation serves every policy
    assert m["eval/after/agree_pi_1"] == m["eval/after/tpa"] == 100.0
    assert m["eval/after/agree_pi_0"] == m["eval/after/tpa_old"]
    assert m["eval/after/agree_pi_2/privacy"] == 100.0 and m["eval/after/agree_pi_2/risky"] == 0.0
    assert "eval/after/agree_pi_2_ci95/medical" in m


def test_a_shift_config_chains_policies_models_and_data(tmp_path):
    cfg = compose_cfg(["shifts=chain"], tmp_path / "chain")
    policies = chain_policies(cfg)
    assert policies == ["pi_old", "pi_new", "pi_2"]
    one, two = (shift_config(cfg, k, policies, tmp_path / "chain") for k in (1, 2))
    assert (one.dataset.policy_base, one.dataset.policy_old, one.dataset.policy_new) == (None, "pi_old", "pi_new")
    assert (two.dataset.policy_base, two.dataset.policy_old, two.dataset.policy_new) == ("pi_old", "pi_new", "pi_2")
    assert one.model.from_run is None and two.model.from_run == str(tmp_path / "chain" / "shift1")
    assert two.paths.output_dir == str(tmp_path / "chain" / "shift2") and not two.shifts.policies
    assert two.logger.csv.save_dir == str(tmp_path / "chain" / "shift2")  # every output of a shift in its folder
    assert dict(two.eval.policies) == {"pi_old": "pi_old", "pi_new": "pi_new", "pi_2": "pi_2"}
    assert chain_policies(compose_cfg(["shifts=direct"])) == ["pi_old", "pi_2"]
    assert chain_policies(compose_cfg([])) == []


def test_a_chain_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="model.from_run=.* would replace both"):
        check_chain(compose_cfg(["shifts=chain", f"model.from_run={tmp_path}"]))
    with pytest.raises(ValueError, match="has no \\['policy_old'\\]"):
        no_policy = compose_cfg(["shifts=chain", "dataset=jsonl", "dataset.train_path=x.jsonl"])
        del no_policy.dataset.policy_old
        chain_policies(no_policy)  # named, not a KeyError
    with pytest.raises(ValueError, match="carry none of the dataset's own harm annotations that oracle=labels reads"):
        check_chain(compose_cfg(["shifts.policies=[pku_new,pku_2.yaml]", "dataset=pku_saferlhf", "oracle=labels"]))
    with pytest.raises(ValueError, match="a later shift would have no held-out prompts"):
        check_chain(compose_cfg(["shifts.policies=[pku_new,pku_2.yaml]", "dataset=pku_saferlhf", "oracle=openai",
                                 "data.eval_split=null"]))
    check_chain(compose_cfg(["shifts.policies=[a.md,b.md]", "dataset=jsonl", "dataset.train_path=x.jsonl",
                             "oracle=openai"]))  # your own data and policies chain


def test_a_later_shift_of_data_without_ground_truth_reads_what_the_shift_before_relabelled(tmp_path):
    out = tmp_path / "chain"
    jsonl = compose_cfg(["dataset=jsonl", "dataset.train_path=pairs.jsonl", "dataset.test_path=test.jsonl",
                         "dataset.triaged=true", "dataset.policy_old=v0.md", "shifts.policies=[v1.md,v2.md]",
                         "oracle=openai", "data.size=10"], out)
    policies = chain_policies(jsonl)
    assert policies == ["v0.md", "v1.md", "v2.md"]
    one, two = (shift_config(jsonl, k, policies, out) for k in (1, 2))
    assert one.dataset.train_path == "pairs.jsonl" and one.dataset.triaged and one.data.size == 10
    assert "policy_base" not in two.dataset
    assert two.dataset._target_ == "trace_realign.data.sources.JsonlSource"
    assert two.dataset.train_path == str(out / "shift1" / "data" / "relabelled.jsonl")
    assert two.dataset.test_path == "test.jsonl"  # the same held-out prompts at every shift
    assert (two.dataset.policy_old, two.dataset.policy_new, two.dataset.triaged) == ("v1.md", "v2.md", False)
    assert two.data.splits is None and two.data.size is None and two.model.from_run == str(out / "shift1")
    assert dict(two.eval.policies) == {"v0": "v0.md", "v1": "v1.md", "v2": "v2.md"}
    pku = compose_cfg(["dataset=pku_saferlhf", "oracle=openai", "shifts.policies=[pku_new,pku_2.yaml]"], out)
    two = shift_config(pku, 2, chain_policies(pku), out)
    assert two.dataset.test_path is None and two.data.splits == "given"  # held-out prompts stay in their split
    assert (two.data.train_split, two.data.eval_split) == (pku.data.train_split, pku.data.eval_split)


def test_relabelled_pairs_are_d_as_held_under_the_new_policy_in_their_splits():
    from trace_realign.core.records import PreferencePair
    from trace_realign.data.pipeline import relabelled

    pairs = {"train": [PreferencePair("a", "old", "new", "invert", meta={"axis": "medical", "stance_chosen": "refuse"}),
                       PreferencePair("b", "bad", "worse", "punish", correction="good"),
                       PreferencePair("c", "bad", "worse", "punish"),
                       PreferencePair("d", "fine", "bad", "retain")],
             "test": [PreferencePair("e", "old", "new", "invert"), PreferencePair("f", "as", "annotated")]}
    got = [(p.prompt, p.chosen, p.rejected, p.category, p.meta) for p in relabelled(pairs)]
    assert got == [("a", "new", "old", None, {"split": "train", "relabelled_from": "invert", "axis": "medical"}),
                   ("b", "good", "bad", None, {"split": "train", "relabelled_from": "punish"}),
                   ("c", "bad", "worse", None, {"split": "train", "relabelled_from": "punish"}),
                   ("d", "fine", "bad", None, {"split": "train", "relabelled_from": "retain"}),
                   ("e", "new", "old", None, {"split": "test", "relabelled_from": "invert"}),
                   ("f", "as", "annotated", None, {"split": "test"})]  # no verdict: held as annotated


def test_given_splits_are_the_pairs_own_and_a_missing_one_is_named():
    from trace_realign.core.records import PreferencePair
    from trace_realign.data.pipeline import DataPlan, given_splits

    plan = DataPlan(splits="given", train_split="train1", eval_split="test")
    pairs = [PreferencePair(x, "y", "z", meta={"split": s}) for x, s in (("a", "train1"), ("b", "test"), ("c", "train1"))]
    assert {k: [p.prompt for p in v] for k, v in given_splits(pairs, plan).items()} == {"train1": ["a", "c"], "test": ["b"]}
    with pytest.raises(ValueError, match="1 of 4 pairs have no meta.split, the first with prompt 'd'"):
        given_splits([*pairs, PreferencePair("d", "y", "z")], plan)
    with pytest.raises(ValueError, match="data.eval_split='test' names no split"):
        given_splits(pairs[:1], plan)
    with pytest.raises(ValueError, match="expected a mapping of split -> size, 'given'"):
        DataPlan(splits="random")


def test_a_policy_of_any_kind_loads_by_what_its_file_holds(tmp_path):
    from trace_realign.core.records import DataError
    from trace_realign.data.sources import load_any_policy
    from trace_realign.steps import eval_policies

    (tmp_path / "v1.md").write_text("Help with travel.\nNever book tickets.\n")
    (tmp_path / "v2.yaml").write_text("name: travel_v2\ntext: Help with travel and book tickets.\n")
    (tmp_path / "bad.yaml").write_text("rulez: {}\n")
    (tmp_path / "empty.txt").write_text("  \n")
    md, written = load_any_policy(tmp_path / "v1.md"), load_any_policy(str(tmp_path / "v2.yaml"))
    assert (md.name, md.text, md.rules) == ("v1", "Help with travel.\nNever book tickets.", {})
    assert (written.name, written.text) == ("travel_v2", "Help with travel and book tickets.")
    assert load_any_policy("pi_2").rules["risky"]["allowed"] == ["caveat"]  # the world's, by name
    assert load_any_policy("pku_new").rules["kind"] == "harm_labels"  # PKU's, by name
    with pytest.raises(DataError, match="bad.yaml.*not a policy: expected `rules`"):
        load_any_policy(tmp_path / "bad.yaml")
    with pytest.raises(DataError, match="the policy is empty"):
        load_any_policy(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="no policy of this name is shipped"):
        load_any_policy("pi_3")
    with pytest.raises(DataError, match="policy file not found"):
        load_any_policy(tmp_path / "missing.md")
    # a source that cannot load policies itself (PKU's) reports agreement with any policy file
    cfg = compose_cfg([f"+eval.policies={{v1: {tmp_path / 'v1.md'}}}"])
    assert eval_policies(cfg, object())["v1"].text == md.text


def chain_metrics(count: int, seed: int, targets: list[str], shift: float = 0.0) -> dict[str, float]:
    """A chain run's metrics.json: agreement with every policy before and after each shift."""
    m = {"shifts/count": float(count)}
    for k in range(1, count + 1):
        for when in ("before", "after"):
            for i, label in enumerate(["pi_old", "pi_new", "pi_2"]):
                value = 10.0 * k + i + seed + shift + (0 if when == "after" else -5)
                for part in ("", "/medical", "/risky", "/shifted"):
                    m[f"shift{k}/eval/{when}/agree_{label}{part}"] = value
                    m[f"shift{k}/eval/{when}/agree_{label}_ci95{part}"] = 1.0
    return m


def test_drift_lines_show_every_policy_after_every_shift():
    lines = drift_lines(chain_metrics(2, 0, ["pi_new", "pi_2"]), ["pi_old", "pi_new", "pi_2"])
    assert lines[2].split() == ["after", "policy", "all", "medical", "risky"]  # groups that are not axes left out
    assert lines[3].split()[:5] == ["shift", "1", "pi_old", "10.0", "±"] and len(lines) == 3 + 6


def test_tables_read_a_chain_as_one_job_per_shift_and_compare_it_with_one_shift(tmp_path):
    from trace_realign.report.collect import Job
    from trace_realign.report.drift import chain_against_direct, drift_reports, expand_shifts, render_drift

    jobs = []
    for seed in (5, 6, 7):
        for kind, policies, extra in (("chain", ["pi_new", "pi_2"], 0.0), ("direct", ["pi_2"], -2.0 - seed)):
            count = len(policies)
            jobs.append(Job(path=str(tmp_path / f"{kind}{seed}"), config={"method.name": "trace", "seed": seed,
                                                                         "dataset.policy_old": "pi_old",
                                                                         "shifts.policies": policies},
                            overrides={"shifts": kind, "method": "trace", "seed": seed},
                            metrics=chain_metrics(count, seed, policies, extra)))
    expanded = expand_shifts(jobs)
    assert len(expanded) == 3 * (3 + 2)  # shifts 0-2 of each chain, 0-1 of each direct run
    start = next(j for j in expanded if j.config["shift"] == 0 and j.overrides["shifts"] == "chain")
    assert start.metrics["eval/after/agree_pi_old"] == 10.0 + 0 + 5 - 5  # shift 1 before training
    reports = drift_reports(expanded)
    assert list(reports) == ["pi_old", "pi_new", "pi_2"]
    cells = {(r.settings.get("shifts"), r.settings.get("shift")): r.cells["eval/after/agree_pi_2"].mean
             for r in reports["pi_2"].rows if r.kind == "run"}
    assert cells[("chain", 2)] == 20 + 2 + 6 and cells[("direct", 1)] == 10 + 2 + 6 - 2 - 6
    # the chain's last shift against pi_2 reached in one shift, paired by seed
    compared = {m: p for _, m, p in chain_against_direct(expanded)}
    assert set(compared) == {"eval/after/agree_pi_2", "eval/after/agree_pi_2/medical", "eval/after/agree_pi_2/risky"}
    diff = compared["eval/after/agree_pi_2"].diff
    assert diff.n == 3 and diff.mean == pytest.approx(10 + 2 + 6) and compared["eval/after/agree_pi_2"].significant
    text = render_drift(expanded)
    assert "## Agreement with pi_2" in text and "| trace | agree_pi_2 | +18.00 [+15.52, +20.48] n=3 * |" in text


@pytest.mark.slow
def test_the_chain_runs_each_shift_from_the_model_the_one_before_realigned(tmp_path):
    from trace_realign.train import run

    cfg = compose_cfg(FAST + ["shifts=chain", "eval.evaluators.capability=null", "eval.evaluators.asr=null"],
                      tmp_path / "chain")
    metrics = run(cfg)
    assert metrics["shifts/count"] == 2
    second = json.loads((tmp_path / "chain" / "shift2" / "run.json").read_text())["config"]
    assert second["model.from_run"] == str(tmp_path / "chain" / "shift1")
    assert (second["dataset.policy_old"], second["dataset.policy_new"]) == ("pi_new", "pi_2")
    # the second shift starts where the first ended: the same model answers the same prompts alike
    for label in ("pi_old", "pi_new", "pi_2"):
        assert metrics[f"shift2/eval/before/agree_{label}"] == metrics[f"shift1/eval/after/agree_{label}"]
    assert metrics["shift2/triage/invert"] > 0 and metrics["shift2/triage/punish"] > 0
    assert json.loads((tmp_path / "chain" / "metrics.json").read_text())["shifts/count"] == 2
    # a later run may name the finished shift as its start; a failed one is refused
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "FAILED").write_text("ValueError: x")
    with pytest.raises(FromRunError, match="that run failed"):
        run(compose_cfg(FAST + [f"model.from_run={tmp_path / 'bad'}"], tmp_path / "next"))
