"""The LLM oracle against a local OpenAI-compatible server: exact call counts, retries, fallbacks, caching."""

from __future__ import annotations

import pytest

from fake_openai import FakeOpenAI
from trace_realign.llm_oracle import OpenAIOracle, parse_verdict
from trace_realign.oracle import Policy

POLICY = Policy(name="pi_new", text="Answer medical questions.")
ITEMS = [(f"prompt {i}", "COMPLY please" if i % 2 == 0 else "no way") for i in range(20)]
EXPECTED = [i % 2 == 0 for i in range(20)]


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def oracle(server, tmp_path, **kw):
    return OpenAIOracle(model="judge", base_url=server.url, cache_path=str(tmp_path / "verdicts.jsonl"),
                        backoff_base=0.01, progress=False, **kw)


def test_verdicts_and_an_identical_rerun_is_free(server, tmp_path):
    o = oracle(server, tmp_path, price_input_per_m=2.5, price_output_per_m=10.0)
    assert o.judge_batch(ITEMS, POLICY) == EXPECTED
    m = o.metrics()
    assert m["oracle/calls"] == 20 and len(server.requests) == 20 and m["oracle/failed"] == 0
    assert m["oracle/input_tokens"] == 2000 and m["oracle/cost_usd"] == pytest.approx((2000 * 2.5 + 200 * 10.0) / 1e6)
    again = oracle(server, tmp_path)
    assert again.judge_batch(ITEMS, POLICY) == EXPECTED
    assert again.metrics()["oracle/calls"] == 0 and again.metrics()["oracle/cached"] == 20
    assert len(server.requests) == 20
    # structured output was asked for
    assert server.requests[0]["body"]["response_format"]["type"] == "json_schema"


def test_retries_on_429_500_and_dropped_connections(server, tmp_path):
    server.script = ["429", "500", "drop", "429"]
    o = oracle(server, tmp_path, concurrency=1)
    assert o.judge_batch(ITEMS[:3], POLICY) == EXPECTED[:3]
    m = o.metrics()
    assert m["oracle/retries"] == 4 and m["oracle/calls"] == 7 and m["oracle/failed"] == 0


def test_gives_up_after_retries_and_records_the_failure(server, tmp_path):
    server.script = ["500"] * 3
    o = oracle(server, tmp_path, retries=2, concurrency=1)
    assert o.judge_batch(ITEMS[:1], POLICY) == [None]
    assert o.metrics()["oracle/failed"] == 1 and o.metrics()["oracle/calls"] == 3
    again = oracle(server, tmp_path)
    assert again.judge_batch(ITEMS[:1], POLICY) == [None] and again.metrics()["oracle/calls"] == 0


def test_malformed_json_and_refusal_fail_prose_is_read(server, tmp_path):
    server.script = ["malformed", "refuse", "prose", "prose"]
    o = oracle(server, tmp_path, concurrency=1)
    assert o.judge_batch(ITEMS[:4], POLICY) == [None, None, True, False]
    assert o.metrics()["oracle/failed"] == 2
    rows = list(o.store)
    assert any("refused" in r.get("failed", "") for r in rows)


def test_falls_back_from_json_schema_to_json_mode(tmp_path):
    server = FakeOpenAI(schema_supported=False)
    try:
        o = oracle(server, tmp_path, concurrency=1)
        assert o.judge_batch(ITEMS[:3], POLICY) == EXPECTED[:3]
        formats = [(r["body"].get("response_format") or {}).get("type") for r in server.requests]
        assert formats == ["json_schema", "json_object", "json_object", "json_object"]
    finally:
        server.close()


def test_api_key_from_environment_only_and_never_written(server, tmp_path, monkeypatch):
    secret = "sk-planted-" + "9" * 32
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    o = oracle(server, tmp_path)
    o.judge_batch(ITEMS[:2], POLICY)
    assert server.requests[0]["auth"] == f"Bearer {secret}"
    assert secret not in (tmp_path / "verdicts.jsonl").read_text()
    assert secret not in repr(vars(o))


@pytest.mark.parametrize("text,expected", [
    ('{"compliant": true, "rationale": "fine"}', True),
    ('```json\n{"compliant": false, "rationale": "no"}\n```', False),
    ("The response is non-compliant.", False),
    ("It complies.", True),
    ("banana", None),
    ('{"compliant": maybe', None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text)[0] is expected


def test_corrections_are_judged_and_retried_a_bounded_number_of_times(server, tmp_path):
    from trace_realign.records import PreferencePair
    from trace_realign.triage import triage

    pairs = [PreferencePair(p, "no A", "no B") for p in ("FLAKY prompt", "prompt 1", "prompt 2")]  # all punish
    o = oracle(server, tmp_path, concurrency=1)
    result = triage(pairs, o, POLICY, corrections=True)
    assert [p.category for p in result.pairs] == ["punish"] * 3
    assert all(p.correction.startswith("COMPLY") for p in result.pairs)
    writes = [r for r in server.requests if "Write the assistant" in r["body"]["messages"][0]["content"]]
    assert len(writes) == 4  # three first tries, one retry for the rejected correction
    # a prompt whose corrections always fail is excluded, with a count, after the bounded tries
    before = len(server.requests)
    result = triage([PreferencePair("BADFIX prompt", "no A", "no B")], oracle(server, tmp_path / "b", concurrency=1),
                    POLICY, corrections=True)
    assert result.pairs == [] and result.excluded["correction_failed"] == 1
    # two verdicts, three writes, and one judgment: the same rejected text is not judged twice (cache)
    assert len(server.requests) - before == 2 + 3 + 1


def test_pair_mode_halves_the_calls_and_triages_the_same(server, tmp_path):
    from trace_realign.records import PreferencePair
    from trace_realign.triage import triage

    pairs = [PreferencePair(f"p{i}", "COMPLY w" if i % 3 == 0 else "w", "COMPLY l" if i % 2 == 0 else "l")
             for i in range(12)]
    single = triage(pairs, oracle(server, tmp_path / "a"), POLICY)
    calls_single = len(server.requests)
    paired_oracle = oracle(server, tmp_path / "b", pair_mode=True)
    paired = triage(pairs, paired_oracle, POLICY)
    assert [p.category for p in paired.pairs] == [p.category for p in single.pairs]
    assert len(server.requests) - calls_single == calls_single // 2 == 12
    again = oracle(server, tmp_path / "b", pair_mode=True)
    assert triage(pairs, again, POLICY).counts() == paired.counts() and again.metrics()["oracle/calls"] == 0


JUDGE_RUN = """
import sys
from trace_realign.llm_oracle import OpenAIOracle
from trace_realign.oracle import Policy
o = OpenAIOracle(model="judge", base_url=sys.argv[1], cache_path=sys.argv[2], concurrency=4, progress=False)
items = [(f"prompt {i}", "COMPLY" if i % 2 else "no") for i in range(int(sys.argv[3]))]
print(sum(v is True for v in o.judge_batch(items, Policy(name="p", text="t"))), flush=True)
"""


def test_killed_run_resumes_without_asking_twice_or_losing_answers(tmp_path):
    import subprocess
    import sys

    from conftest import kill_after_lines
    from trace_realign.verdicts import VerdictStore

    n = 120
    server = FakeOpenAI(latency=0.02)
    cache = tmp_path / "verdicts.jsonl"
    try:
        proc = subprocess.Popen([sys.executable, "-c", JUDGE_RUN, server.url, str(cache), str(n)],
                                stdout=subprocess.PIPE, text=True)
        kill_after_lines(proc, cache, 30)
        done_before = len(VerdictStore(cache))
        asked_before = len(server.requests)
        assert 0 < done_before < n
        res = subprocess.run([sys.executable, "-c", JUDGE_RUN, server.url, str(cache), str(n)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout.strip() == str(n // 2)
    finally:
        server.close()
    store = VerdictStore(cache)
    assert len(store) == n and store.duplicate_lines == 0
    # nothing already stored was asked again: the resumed run asked exactly for what was missing
    # (calls in flight at the kill were paid but never stored, so they count as missing)
    assert len(server.requests) - asked_before == n - done_before


def test_falls_back_to_plain_text_when_no_json_mode(tmp_path):
    server = FakeOpenAI(schema_supported=False, json_mode_supported=False)
    try:
        o = oracle(server, tmp_path, concurrency=1)
        assert o.judge_batch(ITEMS[:2], POLICY) == EXPECTED[:2]
        formats = [(r["body"].get("response_format") or {}).get("type") for r in server.requests]
        assert formats == ["json_schema", "json_object", None, None]
    finally:
        server.close()


def test_timeouts_are_retried_then_recorded_as_failed(tmp_path):
    server = FakeOpenAI(latency=0.5)
    try:
        o = oracle(server, tmp_path, timeout=0.1, retries=1, concurrency=1)
        assert o.judge_batch(ITEMS[:1], POLICY) == [None]
        m = o.metrics()
        assert m["oracle/retries"] == 1 and m["oracle/calls"] == 2 and m["oracle/failed"] == 1
        assert "APITimeoutError" in list(o.store)[0]["failed"]
    finally:
        server.close()
