"""SynthValueBench built against a local OpenAI-compatible server: prompts from PKU-schema files, axes,
written responses, ground truth from pi_new, every call cached and accounted."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from conftest import compose_cfg
from fake_openai import FakeOpenAI
from pku_fixture import row, write_jsonl

from trace_realign.data.synthvaluebench import SynthValueBench
from trace_realign.data.world import WorldJudge, load_policy
from trace_realign.oracle.llm import OpenAIOracle
from trace_realign.oracle.triage import triage_category
from trace_realign.prepare import prepare

AXES = ("medical", "privacy", "politics", "risky")
OLD, NEW = load_policy("pi_old"), load_policy("pi_new")


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


@pytest.fixture
def prompts_file(tmp_path):
    # 10 prompts per axis (the fake classifier reads the axis word), 6 about nothing, a repeat, an empty one
    rows = [row(f"A {axis} question number {i}?", "a", "b") for axis in AXES for i in range(10)]
    rows += [row(f"A cooking question number {i}?", "a", "b") for i in range(6)]
    rows += [row("A medical question number 0?", "c", "d"), row("", "e", "f")]
    return write_jsonl(rows, tmp_path / "prompts" / "train.jsonl")


def writer(server, tmp_path, **kw):
    return OpenAIOracle(model="writer", base_url=server.url, cache_path=str(tmp_path / "answers.jsonl"),
                        backoff_base=0.01, progress=False, **kw)


def bench(prompts_file, tmp_path, server, writer_kw=None, **kw):
    args = dict(prompts={"path": str(prompts_file)}, num_prompts=46, test_prompts=10, verify=False,
                cache_dir=str(tmp_path / "cache"), seed=0)
    args.update(kw)
    b = SynthValueBench(**args)
    b.bind_writer(writer(server, tmp_path, **(writer_kw or {})))
    return b


def test_pairs_follow_their_stances_and_ground_truth_follows_pi_new(prompts_file, tmp_path, server):
    b = bench(prompts_file, tmp_path, server)
    pairs = b.train_pairs()
    stats = b.data_stats()
    assert stats["data/rows"] == 48 and stats["data/removed/duplicate_prompt"] == 1 and stats["data/removed/empty_prompt"] == 1
    no_axis = stats.get("data/removed/no_axis_train", 0) + stats.get("data/removed/no_axis_test", 0)
    assert no_axis == 6  # the cooking prompts
    assert stats["data/rows"] == sum(v for k, v in stats.items() if k.startswith("data/removed/")) \
        + stats["data/pairs"] + stats["data/test_prompts"]
    for p in pairs:
        axis = p.meta["axis"]
        assert axis in p.prompt
        assert p.meta["stance_chosen"] in OLD.rules[axis]["allowed"]
        assert p.meta["stance_rejected"] not in OLD.rules[axis]["allowed"]
        expected = triage_category(p.meta["stance_chosen"] in NEW.rules[axis]["allowed"],
                                   p.meta["stance_rejected"] in NEW.rules[axis]["allowed"])
        assert p.meta["gt_category"] == expected
    assert {p.meta["gt_category"] for p in pairs} == {"invert", "punish", "retain"}
    # the test prompts are held out, with their axis, shift and category for grouped TPA
    test = b.eval_prompts()
    assert len(test) == stats["data/test_prompts"] and not {t["prompt"] for t in test} & {p.prompt for p in pairs}
    assert {t["axis"] for t in test} <= set(AXES) and all(t["kind"] == "value" for t in test)
    assert all(t["shift"] == ("shifted" if t["axis"] in ("medical", "politics") else "unchanged") for t in test)
    # one classification per prompt, two written responses per training pair
    m = b.writer.metrics()
    assert m["oracle/calls"] == 46 + 2 * len(pairs) and m["oracle/failed"] == 0
    assert m["oracle/input_tokens"] == 100 * m["oracle/calls"]  # what the fake server bills a call


def test_a_rebuild_asks_nothing(prompts_file, tmp_path, server):
    first = bench(prompts_file, tmp_path, server).train_pairs()
    calls = len(server.requests)
    again = bench(prompts_file, tmp_path, server)
    assert again.train_pairs() == first and len(server.requests) == calls and again.cache.hits == ["synthvaluebench"]
    # with the stage cache gone, every answer still comes from the answer store
    import shutil

    shutil.rmtree(tmp_path / "cache")
    rebuilt = bench(prompts_file, tmp_path, server)
    assert rebuilt.train_pairs() == first and len(server.requests) == calls
    assert rebuilt.writer.metrics()["oracle/cached"] == 46 + 2 * len(first)


def test_verification_removes_responses_that_miss_their_stance(prompts_file, tmp_path, server):
    plain = bench(prompts_file, tmp_path, server).train_pairs()
    verified = bench(prompts_file, tmp_path, server, verify=True)
    kept = verified.train_pairs()
    # The fake judge calls a response compliant when it does what was asked (comply or caveat), whatever
    # the policy; under pi_old that is right for politics' chosen answers only.
    judged = lambda s: s in ("comply", "caveat")  # noqa: E731
    expected = [p for p in plain if judged(p.meta["stance_chosen"]) and not judged(p.meta["stance_rejected"])]
    assert [p.prompt for p in kept] == [p.prompt for p in expected] and kept
    assert verified.data_stats()["data/removed/off_policy"] == len(plain) - len(kept)


def test_failed_writes_are_counted_not_kept_and_asked_again(tmp_path, server):
    rows = [row(f"A risky question number {i}?", "a", "b") for i in range(8)]
    rows += [row(f"A risky WRITEFAIL question {i}?", "a", "b") for i in range(4)]
    path = write_jsonl(rows, tmp_path / "p" / "train.jsonl")
    b = bench(path, tmp_path, server, num_prompts=12, test_prompts=2)
    pairs = b.train_pairs()
    assert not any("WRITEFAIL" in p.prompt for p in pairs)
    # test prompts are not written; every WRITEFAIL prompt in training is counted out
    held_out = sum("WRITEFAIL" in t["prompt"] for t in b.eval_prompts())
    failing = 4 - held_out
    assert b.data_stats()["data/removed/write_failed"] == failing
    assert len(pairs) == 10 - failing
    # an empty reply is asked again twice, then failed; the build serves this run and is not cached
    m = b.writer.metrics()
    assert m["oracle/failed"] == m["oracle/failed/empty"] == 2 * failing and m["oracle/reasked"] == 4 * failing
    assert b.partial and b.cache.unstored == ["synthvaluebench"] and ":partial:" in b.fingerprint()
    asked = len(server.requests)
    again = bench(path, tmp_path, server, num_prompts=12, test_prompts=2)
    assert again.train_pairs() == pairs and again.cache.hits == []
    assert len(server.requests) - asked == 2 * failing * 3  # only the failed writes, each with its re-asks
    assert again.fingerprint() == b.fingerprint()  # the same partial content, the same name


def test_failed_calls_leave_a_partial_benchmark_that_the_next_build_completes(prompts_file, tmp_path, server):
    server.script = ["500", "500"]  # two classifications fail
    first = bench(prompts_file, tmp_path, server, writer_kw={"retries": 0})
    pairs = first.train_pairs()
    stats = first.data_stats()
    assert stats.get("data/removed/classify_failed_train", 0) + stats.get("data/removed/classify_failed_test", 0) == 2
    assert first.partial and first.writer.metrics()["oracle/failed/server_error"] == 2
    assert stats["data/rows"] == sum(v for k, v in stats.items() if k.startswith("data/removed/")) \
        + stats["data/pairs"] + stats["data/test_prompts"]
    asked = len(server.requests)
    second = bench(prompts_file, tmp_path, server)
    complete = second.train_pairs()
    new_pairs = len(complete) - len(pairs)
    assert all(p in complete for p in pairs)  # each prompt's stances are its own: nothing rewritten
    # the two classifications again, and the writes of the pairs they add: nothing else
    assert len(server.requests) - asked == 2 + 2 * new_pairs
    assert not second.partial and second.cache.hits == []
    assert not any(k.startswith("data/removed/classify_failed") for k in second.data_stats())
    assert second.fingerprint() != first.fingerprint()
    third = bench(prompts_file, tmp_path, server)
    assert third.train_pairs() == complete and third.cache.hits == ["synthvaluebench"]
    assert len(server.requests) - asked == 2 + 2 * new_pairs


def test_a_failed_verification_is_no_off_policy_pair(prompts_file, tmp_path, server):
    plain = bench(prompts_file, tmp_path, server, axis_assignment="balanced").train_pairs()
    server.script = ["ok"] * (2 * len(plain)) + ["500"]  # the writes are answered, then the first verdict fails
    serial = {"retries": 0, "concurrency": 1}
    verified = bench(prompts_file, tmp_path / "v", server, serial, axis_assignment="balanced", verify=True)
    kept = verified.train_pairs()
    judged = lambda s: s in ("comply", "caveat")  # noqa: E731  (the fake judge: see the test above)
    expected = [p.prompt for p in plain if judged(p.meta["stance_chosen"]) and not judged(p.meta["stance_rejected"])]
    assert [p.prompt for p in kept] == [x for x in expected if x != plain[0].prompt]
    stats = verified.data_stats()
    assert stats["data/removed/verify_failed"] == 1 and verified.partial
    assert stats["data/removed/off_policy"] == len(plain) - 1 - len(kept)
    again = bench(prompts_file, tmp_path / "v", server, axis_assignment="balanced", verify=True)
    assert [p.prompt for p in again.train_pairs()] == expected
    assert again.writer.metrics()["oracle/calls"] == 1 and "data/removed/verify_failed" not in again.data_stats()


def trace_data_cfg(prompts_file, tmp_path, server, run: str):
    return compose_cfg(["dataset=synthvaluebench", f"dataset.prompts.path={prompts_file}", "dataset.num_prompts=46",
                        "dataset.test_prompts=10", "dataset.verify=false", "oracle=openai", "oracle.retries=0",
                        f"oracle.base_url={server.url}", "oracle.progress=false",
                        f"oracle.cache_path={tmp_path / 'answers.jsonl'}", f"paths.cache_dir={tmp_path / 'cache'}",
                        "logger=none"], tmp_path / run)


def test_a_partial_benchmark_caches_no_stage_built_on_it(prompts_file, tmp_path, server):
    server.script = ["500"]  # one classification fails
    m = prepare(trace_data_cfg(prompts_file, tmp_path, server, "first"))
    assert m["oracle/failed"] == 1 and "triage/excluded/oracle_failed" not in m
    stages = tmp_path / "cache" / "stages"
    assert not (stages / "synthvaluebench").exists() and not (stages / "triage").exists()
    asked = len(server.requests)
    again = prepare(trace_data_cfg(prompts_file, tmp_path, server, "again"))
    assert again["data/cache_hits"] == 0 and again["oracle/failed"] == 0
    new_pairs = again["data/pairs"] - m["data/pairs"]
    # the failed classification, the new pair's two writes and its two verdicts: the rest is cached
    assert len(server.requests) - asked == 1 + 4 * new_pairs
    third = prepare(trace_data_cfg(prompts_file, tmp_path, server, "third"))
    assert third["data/cache_hits"] == 2 and third["oracle/calls"] == 0  # synthvaluebench, triage


def test_balanced_assignment_needs_no_classifier(prompts_file, tmp_path, server):
    b = bench(prompts_file, tmp_path, server, axis_assignment="balanced")
    pairs = b.train_pairs()
    counts = Counter(p.meta["axis"] for p in pairs) + Counter(t["axis"] for t in b.eval_prompts())
    assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == 46
    assert b.writer.metrics()["oracle/calls"] == 2 * len(pairs)


def test_a_judge_that_cannot_write_is_refused_clearly(prompts_file, tmp_path):
    b = SynthValueBench(prompts={"path": str(prompts_file)}, num_prompts=20, test_prompts=5, cache_dir=str(tmp_path))
    b.bind_writer(WorldJudge())
    with pytest.raises(ValueError, match="oracle=openai"):
        b.train_pairs()
    with pytest.raises(ValueError, match="dataset.prompts: .*expected keys"):
        SynthValueBench(prompts={"file": "x"}, num_prompts=20, test_prompts=5)
    with pytest.raises(ValueError, match="test_prompts"):
        SynthValueBench(prompts={"path": str(prompts_file)}, num_prompts=20, test_prompts=20)


def test_trace_data_triages_synthvaluebench_and_scores_triage_against_ground_truth(prompts_file, tmp_path, server):
    cfg = compose_cfg(["dataset=synthvaluebench", f"dataset.prompts.path={prompts_file}", "dataset.num_prompts=46",
                       "dataset.test_prompts=10", "dataset.verify=false", "oracle=openai",
                       f"oracle.base_url={server.url}", "oracle.progress=false",
                       f"oracle.cache_path={tmp_path / 'answers.jsonl'}", f"paths.cache_dir={tmp_path / 'cache'}",
                       "logger=none"], tmp_path / "run")
    m = prepare(cfg)
    n = m["data/pairs"]
    assert sum(m[f"triage/{c}"] for c in ("invert", "punish", "retain")) == n
    # every call of the build and of triage is in one account
    assert m["oracle/calls"] == 46 + 2 * n + 2 * n
    # The fake judge ignores the policy (a response that does what was asked, comply or caveat, complies), so
    # its triage is often wrong: the report says how often, by kind, as counted here from the stances.
    from trace_realign.core.records import load_pairs

    triaged = load_pairs(tmp_path / "run" / "data" / "triaged.jsonl", require_category=True)
    assert len(triaged) == n

    def fake(stance):
        return stance in ("comply", "caveat")

    assert all(p.category == triage_category(fake(p.meta["stance_chosen"]), fake(p.meta["stance_rejected"]))
               for p in triaged)
    right = [p for p in triaged if p.category == p.meta["gt_category"]]
    assert 0 < len(right) < n
    assert m["triage/gt_accuracy"] == pytest.approx(len(right) / n)
    for c in ("invert", "punish", "retain"):
        truly = [p for p in triaged if p.meta["gt_category"] == c]
        said = [p for p in triaged if p.category == c]
        hits = sum(p.category == c for p in truly)
        assert m.get(f"triage/gt_recall/{c}") == (pytest.approx(hits / len(truly)) if truly else None), c
        assert m.get(f"triage/gt_precision/{c}") == (pytest.approx(hits / len(said)) if said else None), c
    items = (tmp_path / "run" / "data" / "eval.jsonl").read_text().splitlines()
    assert len(items) == m["data/test_prompts"]


def test_a_killed_build_resumes_asking_only_what_is_missing(prompts_file, tmp_path):
    import subprocess
    import sys

    from conftest import kill_after_lines

    from trace_realign.oracle.verdicts import VerdictStore

    server = FakeOpenAI(latency=0.05)
    answers = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "trace_realign.prepare", "dataset=synthvaluebench",
           f"dataset.prompts.path={prompts_file}", "dataset.num_prompts=46", "dataset.test_prompts=10",
           "dataset.verify=false", "ablation=no_triage", "oracle=openai", f"oracle.base_url={server.url}",
           "oracle.progress=false", "oracle.concurrency=4", f"oracle.cache_path={answers}",
           f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_after_lines(proc, answers, 60, timeout=120)  # in the middle of writing responses
        done_before, asked_before = len(VerdictStore(answers)), len(server.requests)
        assert 46 < done_before
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        server.close()
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    store = VerdictStore(answers)
    assert len(store) == 46 + 2 * m["data/pairs"] and store.duplicate_lines == 0
    assert done_before < len(store)
    # the rerun asked exactly for the answers the store lacked (calls in flight at the kill count as lacking)
    assert len(server.requests) - asked_before == len(store) - done_before
