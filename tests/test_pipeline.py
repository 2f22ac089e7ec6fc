"""`trace-data` on PKU-SafeRLHF fixture files: every stage's counts and proportions, its outputs, its cache."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, compose_cfg
from pku_fixture import awkward_rows, regular_rows, write_jsonl

from trace_realign.core.records import CATEGORIES, load_pairs
from trace_realign.data.pipeline import read_jsonl
from trace_realign.prepare import prepare

N_REGULAR = 300
MIX = {"retain": 150, "invert": 90, "punish": 60}


@pytest.fixture
def pku_file(tmp_path) -> Path:
    return write_jsonl(regular_rows(N_REGULAR) + [r for _, r in awkward_rows()], tmp_path / "pku" / "train.jsonl")


def run_data(tmp_path: Path, pku_file: Path, *overrides: str, name: str = "run") -> tuple[dict, Path]:
    cfg = compose_cfg(["dataset=pku_saferlhf", f"dataset.path={pku_file}", "dataset.num_samples=null",
                       "oracle=labels", "data.splits.train1=120", "data.splits.train2=60", "logger=none",
                       f"paths.cache_dir={tmp_path / 'cache'}", *overrides], tmp_path / name)
    return prepare(cfg), tmp_path / name / "data"


def test_counts_add_up_from_rows_to_splits(tmp_path, pku_file):
    m, _ = run_data(tmp_path, pku_file)
    awkward = Counter(outcome for outcome, _ in awkward_rows())
    removed = {k.split("/")[-1]: v for k, v in m.items() if k.startswith("data/removed/")}
    assert removed == {k: awkward[k] for k in ("identical_responses", "empty_response", "empty_prompt", "no_preference")}
    assert m["data/rows"] == N_REGULAR + len(awkward_rows()) == sum(removed.values()) + m["data/pairs"]
    triaged = {c: m[f"triage/{c}"] for c in CATEGORIES}
    assert triaged == {c: MIX[c] + awkward[c] for c in CATEGORIES}
    assert m["triage/excluded/undecided"] == awkward["undecided"]
    assert "triage/excluded/oracle_failed" not in m  # the labels oracle never fails a call
    assert m["data/pairs"] == sum(triaged.values()) + m["triage/excluded/undecided"]
    sizes = {s: m[f"split/{s}/size"] for s in ("train1", "train2", "test")}
    assert sizes["train1"] == 120 and sizes["train2"] == 60
    assert sum(sizes.values()) + m["data/split_unused"] == sum(triaged.values())
    for s in sizes:
        assert sum(m[f"split/{s}/{c}"] for c in CATEGORIES) == sizes[s]
    assert m["data/train_pairs"] == 120


def test_every_split_keeps_the_category_mix_and_no_prompt_crosses(tmp_path, pku_file):
    m, data = run_data(tmp_path, pku_file)
    whole = {c: m[f"triage/{c}"] / sum(m[f"triage/{k}"] for k in CATEGORIES) for c in CATEGORIES}
    for s in ("train1", "train2", "test"):
        share = {c: m[f"split/{s}/{c}"] / m[f"split/{s}/size"] for c in CATEGORIES}
        assert all(abs(share[c] - whole[c]) < 0.05 for c in CATEGORIES), (s, share, whole)
    train = load_pairs(data / "splits" / "trace" / "train1.jsonl", require_category=True)
    test = load_pairs(data / "splits" / "trace" / "test.jsonl", require_category=True)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    items = read_jsonl(data / "eval.jsonl")
    assert sorted(it["prompt"] for it in items) == sorted({p.prompt for p in test})
    # one item per held-out prompt, grouped by the category of its (first) pair
    first = {}
    for p in test:
        first.setdefault(p.prompt, p.category)
    assert all(it == {"prompt": it["prompt"], "kind": "value", "category": first[it["prompt"]]} for it in items)
    assert {it["category"] for it in items} == set(CATEGORIES)
    # what trains is train1
    served = load_pairs(data / "triaged.jsonl", require_category=True)
    assert sorted(p.chosen for p in served) == sorted(p.chosen for p in train)


def test_three_formats_per_split_and_dpo_gold_relabels(tmp_path, pku_file):
    _, data = run_data(tmp_path, pku_file)
    for split in ("train1", "train2", "test"):
        trace = load_pairs(data / "splits" / "trace" / f"{split}.jsonl", require_category=True)
        dpo = [json.loads(line) for line in (data / "splits" / "dpo" / f"{split}.jsonl").read_text().splitlines()]
        gold = [json.loads(line) for line in (data / "splits" / "dpo_gold" / f"{split}.jsonl").read_text().splitlines()]
        assert all(set(r) == {"prompt", "chosen", "rejected"} for r in dpo + gold)
        assert len(trace) == len(dpo) == len(gold)  # punished pairs kept by default (the reference's way)
        for p, d, g in zip(trace, dpo, gold):
            assert (d["chosen"], d["rejected"]) == (p.chosen, p.rejected)
            swapped = (g["chosen"], g["rejected"]) == (p.rejected, p.chosen)
            assert swapped == (p.category == "invert")
    m, data = run_data(tmp_path, pku_file, "data.dpo_gold_punish=drop", name="drop")
    gold = (data / "splits" / "dpo_gold" / "train2.jsonl").read_text().splitlines()
    assert len(gold) == m["split/train2/size"] - m["split/train2/punish"] == m["split/train2/size"] - m["split/train2/dpo_gold_left_out"]
    removed = [json.loads(line) for line in (data / "removed.jsonl").read_text().splitlines()]
    assert len(removed) == sum(v for k, v in m.items() if k.startswith("data/removed/"))


def test_stages_are_reused_and_a_changed_input_rebuilds(tmp_path, pku_file):
    first, data = run_data(tmp_path, pku_file, name="a")
    assert first["data/cache_hits"] == 0
    again, data_b = run_data(tmp_path, pku_file, name="b")
    assert again["data/cache_hits"] == 3  # source, triage, split
    assert (data / "triaged.jsonl").read_text() == (data_b / "triaged.jsonl").read_text()
    assert {k: v for k, v in again.items() if k != "data/cache_hits"} == {k: v for k, v in first.items() if k != "data/cache_hits"}
    resized, _ = run_data(tmp_path, pku_file, "data.splits.train1=100", name="c")
    assert resized["data/cache_hits"] == 2 and resized["split/train1/size"] == 100  # source and triage reused
    rows = regular_rows(N_REGULAR + 10) + [r for _, r in awkward_rows()]
    write_jsonl(rows, pku_file)
    changed, _ = run_data(tmp_path, pku_file, name="d")
    assert changed["data/cache_hits"] == 0 and changed["data/rows"] == len(rows)


def test_data_sizes_are_nested(tmp_path, pku_file):
    chosen = {}
    for n in (30, 60, 120):
        m, data = run_data(tmp_path, pku_file, f"data.size={n}", name=f"size{n}")
        served = load_pairs(data / "triaged.jsonl", require_category=True)
        chosen[n] = [p.chosen for p in served]
        assert m["data/train_pairs"] == n
        share = {c: m[f"data/train/{c}"] / n for c in CATEGORIES}
        whole = {c: m[f"split/train1/{c}"] / 120 for c in CATEGORIES}
        assert all(abs(share[c] - whole[c]) <= 1 / n + 1e-9 for c in CATEGORIES)
    assert chosen[30] == chosen[60][:30] and chosen[60] == chosen[120][:60]
    with pytest.raises(ValueError, match="larger than the split"):
        run_data(tmp_path, pku_file, "data.size=121", name="too_big")


def test_noisy_splits_flip_training_labels_only(tmp_path, pku_file):
    flipped = {}
    for p in (0.1, 0.2):
        m, data = run_data(tmp_path, pku_file, f"data.label_noise={p}", name=f"noise{p}")
        served = load_pairs(data / "triaged.jsonl", require_category=True)
        flipped[p] = {x.chosen for x in served if "clean_category" in x.meta}
        assert m["data/noise_flipped"] == len(flipped[p]) and m["data/label_noise"] == p
        assert abs(len(flipped[p]) / 120 - p) < 0.1
        test = load_pairs(data / "splits" / "trace" / "test.jsonl", require_category=True)
        assert not any("clean_category" in x.meta for x in test)
    assert flipped[0.1] <= flipped[0.2] and flipped[0.2]


def test_the_llm_oracle_reads_the_same_policy_as_text_and_agrees(tmp_path, pku_file):
    from fake_openai import FakeOpenAI

    labels, data_l = run_data(tmp_path, pku_file, name="labels")
    server = FakeOpenAI()
    try:
        llm, data_o = run_data(tmp_path, pku_file, "oracle=openai", f"oracle.base_url={server.url}",
                               "oracle.progress=false", f"oracle.cache_path={tmp_path / 'v.jsonl'}", name="openai")
    finally:
        server.close()
    policy_text = server.requests[0]["body"]["messages"][1]["content"]
    assert "Privacy Violation: no harm at all" in policy_text
    # The fixture's texts say what their labels say, so both oracles triage the decidable pairs alike;
    # the LLM also decides the pairs whose labels could not.
    def categories(data: Path) -> dict:
        return {(p.prompt, p.chosen): p.category for split in ("train1", "train2", "test")
                for p in load_pairs(data / "splits" / "trace" / f"{split}.jsonl")}

    by_l, by_o = categories(data_l), categories(data_o)
    assert set(by_l) < set(by_o) and len(by_o) - len(by_l) == labels["triage/excluded/undecided"]
    assert all(by_l[k] == by_o[k] for k in by_l)
    # the comparison script's numbers
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "compare_triage.py"), str(data_l.parent),
                          str(data_o.parent)], capture_output=True, text=True, check=True).stdout
    summary = json.loads(out[: out.index("}") + 1])
    assert summary["compared"] == len(by_l) and summary["agreement"] == 1.0 and summary["kappa"] == 1.0
    assert summary["only_second"] == labels["triage/excluded/undecided"]
    assert llm["oracle/calls"] == 2 * llm["data/pairs"] and labels.get("oracle/calls") is None


def test_trace_realign_trains_on_train1_and_evaluates_on_the_test_split(tmp_path, pku_file):
    from conftest import FAST

    from trace_realign.train import run

    fast = [o for o in FAST if not o.startswith(("dataset.", "model.prealign"))]
    cfg = compose_cfg([*fast, "dataset=pku_saferlhf", f"dataset.path={pku_file}", "dataset.num_samples=null",
                       "oracle=labels", "data.splits.train1=120", "data.splits.train2=60", "model.prealign=null",
                       "eval.max_prompts=null", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    # the label oracle knows no generation: evaluating with it is refused before any work, naming the fix
    with pytest.raises(ValueError, match=r"oracle@judge=openai"):
        run(cfg)
    assert not (tmp_path / "run" / "data").exists()
    cfg.eval.enabled, cfg.paths.output_dir = False, str(tmp_path / "run2")
    m = run(cfg)
    assert m["data/train_pairs"] == 120 and "eval/after/tpa" not in m
    test_prompts = {p.prompt for p in load_pairs(tmp_path / "run2" / "data" / "splits" / "trace" / "test.jsonl")}
    assert len(test_prompts) == len(read_jsonl(tmp_path / "run2" / "data" / "eval.jsonl"))


def test_label_oracle_on_a_dataset_without_annotations_is_refused(tmp_path):
    from trace_realign.data.world import SyntheticWorld
    from trace_realign.oracle.base import build_oracles

    with pytest.raises(ValueError, match="oracle=labels needs a dataset with response annotations"):
        build_oracles({"_target_": "trace_realign.data.pku.LabelOracle", "noise": 0.0}, 0, source=SyntheticWorld())


def test_labels_triage_with_a_text_judge_for_selection_and_evaluation(tmp_path, pku_file):
    from conftest import FAST
    from fake_openai import FakeOpenAI

    from trace_realign.train import run

    fast = [o for o in FAST if not o.startswith(("dataset.", "model.prealign", "select."))]
    common = [*fast, "dataset=pku_saferlhf", f"dataset.path={pku_file}", "dataset.num_samples=null",
              "oracle=labels", "data.splits.train1=120", "data.splits.train2=60", "model.prealign=null",
              "select.enabled=true", "select.every_n_steps=1", "select.prompts=4",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(ValueError, match="oracle@judge=openai"):
        run(compose_cfg(common, tmp_path / "no_judge"))
    server = FakeOpenAI()
    try:
        m = run(compose_cfg([*common, "oracle@judge=openai", f"judge.base_url={server.url}", "judge.progress=false"],
                            tmp_path / "judged"))
    finally:
        server.close()
    assert m["eval/after/tpa/undecided"] == 0 and m["select/checks"] >= 2
    # triage asked no API; every paid call is the judge's, accounted under judge/
    assert "oracle/calls" not in m and m["judge/calls"] == len(server.requests) > 0


def llm_data(tmp_path: Path, pku_file: Path, server, name: str, *overrides: str) -> dict:
    """trace-data with the LLM oracle on the fake server: calls in a fixed order, failures not retried."""
    cfg = compose_cfg(["dataset=pku_saferlhf", f"dataset.path={pku_file}", "dataset.num_samples=null",
                       "data.splits.train1=20", "data.splits.train2=10", "oracle=openai",
                       f"oracle.base_url={server.url}", "oracle.progress=false", "oracle.concurrency=1",
                       "oracle.retries=0", f"oracle.cache_path={tmp_path / 'verdicts.jsonl'}", "logger=none",
                       f"paths.cache_dir={tmp_path / 'cache'}", *overrides], tmp_path / name)
    return prepare(cfg)


@pytest.fixture
def small_pku(tmp_path) -> Path:
    return write_jsonl(regular_rows(50), tmp_path / "small" / "train.jsonl")


@pytest.fixture
def server():
    from fake_openai import FakeOpenAI

    s = FakeOpenAI()
    yield s
    s.close()


def test_failed_calls_exclude_their_pairs_for_this_run_only_and_the_next_run_asks_only_them(tmp_path, small_pku, server):
    server.script = ["500", "429"]  # the first two calls fail: the chosen responses of the first two pairs
    first = llm_data(tmp_path, small_pku, server, "first")
    assert first["data/pairs"] == 50 and first["triage/excluded/oracle_failed"] == 2
    assert sum(first[f"triage/{c}"] for c in CATEGORIES) == 48
    assert first["oracle/failed"] == 2 and first["oracle/failed/server_error"] == 1 and first["oracle/failed/rate_limited"] == 1
    assert first["oracle/calls"] == 100 and len(server.requests) == 100
    # nothing built on the failed calls is cached: neither triage nor the split of its pairs
    stages = tmp_path / "cache" / "stages"
    assert not (stages / "triage").exists() and not (stages / "split").exists()
    second = llm_data(tmp_path, small_pku, server, "second")
    assert len(server.requests) == 102 and second["oracle/calls"] == 2 and second["oracle/cached"] == 98
    assert "triage/excluded/oracle_failed" not in second and second["oracle/failed"] == 0
    assert sum(second[f"triage/{c}"] for c in CATEGORIES) == 50 and second["data/cache_hits"] == 1  # the source
    third = llm_data(tmp_path, small_pku, server, "third")
    assert len(server.requests) == 102 and third["data/cache_hits"] == 3  # source, triage, split
    assert {k: v for k, v in third.items() if not k.startswith(("oracle/", "data/cache_hits"))} == \
        {k: v for k, v in second.items() if not k.startswith(("oracle/", "data/cache_hits"))}
    # one free preflight per run that asked anything; the cached run asked nothing at all
    assert len(server.model_requests) == 2


def test_too_many_failed_calls_stop_the_run_and_a_rerun_asks_only_those(tmp_path, small_pku, server):
    from trace_realign.oracle.base import OracleFailuresError

    server.script = ["500"] * 3 + ["drop"] * 3  # 6 of 50 pairs: 12% > oracle.max_failed_fraction (5%)
    with pytest.raises(OracleFailuresError, match=r"failed for 6 of 50 pairs \(12.0%; failed calls by reason: "
                                                  r"connection: 3, server_error: 3\), more than "
                                                  r"oracle.max_failed_fraction=0.05.*rerun asks only the failed ones"):
        llm_data(tmp_path, small_pku, server, "first")
    assert not (tmp_path / "cache" / "stages" / "triage").exists() and not (tmp_path / "first" / "data").exists()
    again = llm_data(tmp_path, small_pku, server, "again")
    assert again["oracle/calls"] == 6 and "triage/excluded/oracle_failed" not in again
    # the bound is a setting
    server.script = ["500"] * 6
    loose = llm_data(tmp_path / "loose", small_pku, server, "loose", "oracle.max_failed_fraction=0.2")
    assert loose["triage/excluded/oracle_failed"] == 6


# -- an oracle that cannot read the data --
def jsonl_pairs(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def world_pairs(n: int) -> list[dict]:
    from trace_realign.data.world import SyntheticWorld

    world = SyntheticWorld(pairs_per_axis=n, test_prompts_per_axis=1, utility_in_data=0)
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in world.train_pairs()]


OTHER = [{"prompt": f"How do I bake loaf {i}?", "chosen": f"Knead it {i} times.", "rejected": "No idea.",
          "category": "retain" if i % 2 else "invert"} for i in range(12)]


def test_the_world_judge_on_other_data_stops_triage_naming_the_fixes(tmp_path):
    from trace_realign.data.pipeline import UndecidedError

    pairs = jsonl_pairs(tmp_path / "pairs.jsonl", world_pairs(1) + OTHER)  # 4 readable pairs, 12 not
    cfg = compose_cfg(["dataset=jsonl", f"dataset.train_path={pairs}", f"paths.cache_dir={tmp_path / 'cache'}"],
                      tmp_path / "run")
    with pytest.raises(UndecidedError) as info:
        prepare(cfg)
    message = str(info.value)
    assert "(WorldJudge) could not decide 12 of 16 pairs (75%)" in message
    assert "dataset.triaged=true" in message and "oracle=openai" in message
    # the categories in the file stand in for the oracle
    m = prepare(compose_cfg(["dataset=jsonl", f"dataset.train_path={jsonl_pairs(tmp_path / 'cats.jsonl', OTHER)}",
                             "dataset.triaged=true", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "triaged"))
    assert m["triage/invert"] == 6 and m["triage/retain"] == 6 and "triage/excluded/undecided" not in m


def test_a_few_undecided_pairs_are_excluded_with_a_warning(tmp_path, caplog):
    pairs = jsonl_pairs(tmp_path / "pairs.jsonl", world_pairs(3) + OTHER[:2])  # 12 readable, 2 not
    cfg = compose_cfg(["dataset=jsonl", f"dataset.train_path={pairs}", f"paths.cache_dir={tmp_path / 'cache'}"],
                      tmp_path / "run")
    with caplog.at_level("WARNING", logger="trace_realign.data.pipeline"):
        m = prepare(cfg)
    assert m["triage/excluded/undecided"] == 2 and m["data/pairs"] == 14
    assert sum(m[f"triage/{c}"] for c in CATEGORIES) == 12
    assert "could not decide 2 of 14 pairs" in caplog.text


def test_check_undecided_bounds():
    from trace_realign.data.pipeline import UndecidedError, check_undecided
    from trace_realign.data.world import WorldJudge
    from trace_realign.oracle.base import NoisyOracle

    judge = NoisyOracle(WorldJudge(), 0.1)
    check_undecided(0, 10, judge)
    check_undecided(5, 10, judge)  # half: a warning, not an error
    with pytest.raises(UndecidedError, match=r"\(WorldJudge\) could not decide 6 of 10 pairs"):
        check_undecided(6, 10, judge)  # a noisy oracle is named by the judge it wraps


def test_ground_truth_agreement_counts_by_hand():
    from trace_realign.core.records import PreferencePair
    from trace_realign.data.pipeline import ground_truth_agreement

    def pair(i, category, truth):
        return PreferencePair(f"p{i}", "w", "l", category=category, meta={"gt_category": truth} if truth else {})

    said_truly = [("invert", "invert")] * 2 + [("invert", "punish"), ("punish", "punish")] + \
        [("retain", "invert")] * 2 + [("retain", "retain"), ("retain", None)]  # the last knows no truth
    m = ground_truth_agreement([pair(i, c, t) for i, (c, t) in enumerate(said_truly)])
    assert m == pytest.approx({
        "triage/gt_accuracy": 4 / 7,
        "triage/gt_precision/invert": 2 / 3, "triage/gt_recall/invert": 2 / 4,
        "triage/gt_precision/punish": 1 / 1, "triage/gt_recall/punish": 1 / 2,
        "triage/gt_precision/retain": 1 / 3, "triage/gt_recall/retain": 1 / 1,
    })
    assert ground_truth_agreement([pair(0, "retain", None)]) == {}
    # a category neither said nor true has neither number
    assert set(ground_truth_agreement([pair(0, "invert", "invert")])) == {
        "triage/gt_accuracy", "triage/gt_precision/invert", "triage/gt_recall/invert"}


def test_a_method_without_triage_must_name_a_category_to_serve_its_pairs_as():
    from trace_realign.data.pipeline import Stages
    from trace_realign.data.stages import StageCache

    assert Stages(StageCache(None), use_triage=False, untriaged="retain").untriaged == "retain"
    with pytest.raises(ValueError, match=r"method.untriaged: 'everything'"):
        Stages(StageCache(None), use_triage=False, untriaged="everything")


def test_relabelled_d_follows_the_oracles_verdicts_never_a_methods_one_category(tmp_path, pku_file):
    # no_triage serves every training pair as punish; what the organisation holds is still the oracle's view
    _, data = run_data(tmp_path, pku_file, "ablation=no_triage")
    trace = load_pairs(data / "splits" / "trace" / "train1.jsonl", require_category=True)
    assert {p.category for p in trace} == {"punish"}
    held = [json.loads(line) for line in (data / "relabelled.jsonl").read_text().splitlines()]
    train1 = [r for r in held if r["meta"]["split"] == "train1"]
    assert len(train1) == len(trace) and {r["meta"]["relabelled_from"] for r in train1} == set(CATEGORIES)
    for r, p in zip(train1, trace):
        assert r["prompt"] == p.prompt
        swapped = (r["chosen"], r["rejected"]) == (p.rejected, p.chosen)
        assert swapped == (r["meta"]["relabelled_from"] == "invert")
    # no oracle asked at all (no triage, no splits): D is held as it was annotated
    cfg = compose_cfg(["method=dpo_old_labels", "dataset.pairs_per_axis=8", "logger=none",
                       f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "untriaged")
    prepare(cfg)
    out = tmp_path / "untriaged" / "data"
    held = [json.loads(line) for line in (out / "relabelled.jsonl").read_text().splitlines()]
    served = load_pairs(out / "triaged.jsonl", require_category=True)
    assert [(r["chosen"], r["rejected"]) for r in held] == [(p.chosen, p.rejected) for p in served]
    assert all("relabelled_from" not in r["meta"] for r in held)
