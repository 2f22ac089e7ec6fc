"""The LLM oracle against a local OpenAI-compatible server: exact call counts, retries, fallbacks, caching,
and failures that are counted but never kept."""

from __future__ import annotations

from collections import Counter

import pytest
from fake_openai import FakeOpenAI

from trace_realign.oracle.base import Policy
from trace_realign.oracle.llm import OpenAIOracle, OracleAuthError, OracleConfigError, parse_verdict
from trace_realign.oracle.verdicts import VerdictStore

POLICY = Policy(name="pi_new", text="Answer medical questions.")
ITEMS = [(f"prompt {i}", "COMPLY please" if i % 2 == 0 else "no way") for i in range(20)]
EXPECTED = [i % 2 == 0 for i in range(20)]


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def oracle(server, tmp_path, **kw):
    cache = str(tmp_path / "verdicts.jsonl") if tmp_path is not None else None
    return OpenAIOracle(model="judge", base_url=server.url, cache_path=cache, backoff_base=0.01, progress=False, **kw)


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


def test_gives_up_after_retries_stores_nothing_and_the_next_run_asks_again(server, tmp_path):
    server.script = ["500"] * 3
    o = oracle(server, tmp_path, retries=2, concurrency=1)
    assert o.judge_batch(ITEMS[:2], POLICY) == [None, False]
    m = o.metrics()
    assert m["oracle/failed"] == 1 and m["oracle/failed/server_error"] == 1 and m["oracle/calls"] == 4
    assert o.failure_counts() == Counter({"server_error": 1}) and o.failed_calls == 1
    store = VerdictStore(tmp_path / "verdicts.jsonl")
    assert len(store) == 1 and store.failed_lines == 0  # the answer only
    # a second oracle on the same cache file asks exactly the failed item once more, and gets its verdict
    again = oracle(server, tmp_path)
    assert again.judge_batch(ITEMS[:2], POLICY) == EXPECTED[:2]
    assert again.metrics()["oracle/calls"] == 1 and again.metrics()["oracle/cached"] == 1
    assert len(server.requests) == 5
    third = oracle(server, tmp_path)
    assert third.judge_batch(ITEMS[:2], POLICY) == EXPECTED[:2] and third.metrics()["oracle/calls"] == 0


def test_a_failure_is_not_remembered_within_the_run_either(server, tmp_path):
    server.script = ["500"]
    o = oracle(server, None, retries=0, concurrency=1)  # no store: answers are memoised in memory
    assert o.judge_batch(ITEMS[:1], POLICY) == [None]
    assert o.judge_batch(ITEMS[:1], POLICY) == [True] and o.metrics()["oracle/calls"] == 2
    assert o.judge_batch(ITEMS[:1], POLICY) == [True] and o.metrics()["oracle/calls"] == 2


def test_an_unreadable_answer_or_refusal_is_asked_again_within_the_run(server, tmp_path):
    server.script = ["malformed", "refuse", "ok", "empty", "ok"]
    o = oracle(server, tmp_path, concurrency=1)
    assert o.judge_batch(ITEMS[:3], POLICY) == EXPECTED[:3]
    m = o.metrics()
    assert m["oracle/calls"] == 3 + 2 + 1 and m["oracle/reasked"] == 2 + 1 and m["oracle/failed"] == 0
    assert len(o.store) == 3


def test_answers_that_stay_unreadable_fail_and_are_not_kept(server, tmp_path):
    server.script = ["malformed", "empty", "refuse", "malformed", "malformed"]
    o = oracle(server, tmp_path, concurrency=1, malformed_retries=2)
    assert o.judge_batch(ITEMS[:2], POLICY) == [None, False]  # item 2: malformed twice, then answered
    m = o.metrics()
    assert m["oracle/calls"] == 6 and m["oracle/reasked"] == 4
    assert m["oracle/failed"] == 1 and m["oracle/failed/refused"] == 1 and m["oracle/failed/malformed"] == 0
    assert len(o.store) == 1
    again = oracle(server, tmp_path)
    assert again.judge_batch(ITEMS[:2], POLICY) == EXPECTED[:2] and again.metrics()["oracle/calls"] == 1
    none = oracle(server, tmp_path / "b", concurrency=1, malformed_retries=0)
    server.script = ["malformed"]
    assert none.judge_batch(ITEMS[:1], POLICY) == [None] and none.metrics()["oracle/failed/malformed"] == 1


def test_prose_is_read(server, tmp_path):
    server.script = ["prose", "prose"]
    o = oracle(server, tmp_path, concurrency=1)
    assert o.judge_batch(ITEMS[:2], POLICY) == [True, False]
    assert o.metrics()["oracle/failed"] == 0 and o.metrics()["oracle/reasked"] == 0


def test_a_missing_key_for_openai_itself_stops_at_construction(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(OracleAuthError, match="environment variable OPENAI_API_KEY is not set.*oracle.api_key_env"):
        OpenAIOracle(model="gpt-4o", cache_path=str(tmp_path / "v.jsonl"))
    monkeypatch.setenv("MY_JUDGE_KEY", "")
    with pytest.raises(OracleAuthError, match="MY_JUDGE_KEY is not set"):
        OpenAIOracle(model="gpt-4o", api_key_env="MY_JUDGE_KEY")
    assert not (tmp_path / "v.jsonl").exists()
    # a local server (vLLM, Ollama) may need no key
    OpenAIOracle(model="llama", base_url="http://localhost:11434/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    OpenAIOracle(model="gpt-4o")


def test_a_rejected_key_stops_at_the_free_preflight_before_any_paid_call(server, tmp_path, monkeypatch):
    secret = "sk-planted-" + "7" * 32
    monkeypatch.setenv("JUDGE_KEY", secret)
    server.models_status = 401
    o = oracle(server, tmp_path, api_key_env="JUDGE_KEY")
    with pytest.raises(OracleAuthError, match="rejected the API key in the environment variable JUDGE_KEY") as err:
        o.judge_batch(ITEMS, POLICY)
    assert secret not in str(err.value) and "sk-pla" not in str(err.value)
    assert len(server.requests) == 0 and len(server.model_requests) == 1
    assert (tmp_path / "verdicts.jsonl").read_text() == ""
    with pytest.raises(OracleAuthError, match="JUDGE_KEY"):
        o.preflight()
    monkeypatch.delenv("JUDGE_KEY")
    with pytest.raises(OracleAuthError, match="asks for an API key .* JUDGE_KEY is not set"):
        oracle(server, tmp_path, api_key_env="JUDGE_KEY").judge_batch(ITEMS, POLICY)


def test_the_preflight_runs_once_and_never_for_a_cached_rerun(server, tmp_path):
    o = oracle(server, tmp_path)
    o.judge_batch(ITEMS[:2], POLICY)
    o.judge_batch(ITEMS[2:4], POLICY)
    assert len(server.model_requests) == 1 and len(server.requests) == 4
    again = oracle(server, tmp_path)
    assert again.judge_batch(ITEMS[:4], POLICY) == EXPECTED[:4]
    assert len(server.model_requests) == 1 and len(server.requests) == 4  # offline and free
    # a server without /models (or one that fails it) is not stopped by the preflight
    for n, status in enumerate((404, 500), start=2):
        server.models_status = status
        assert oracle(server, tmp_path / str(status)).judge_batch(ITEMS[:1], POLICY) == EXPECTED[:1]
        assert len(server.model_requests) == n


def test_no_server_is_no_configuration_error_but_failed_calls(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    o = OpenAIOracle(model="judge", base_url=url, cache_path=str(tmp_path / "v.jsonl"), retries=0, progress=False)
    assert o.judge_batch(ITEMS[:2], POLICY) == [None, None]
    assert o.failure_counts() == Counter({"connection": 2}) and len(o.store) == 0


@pytest.mark.parametrize("status", ["401", "403"])
def test_a_key_rejected_mid_batch_aborts_the_batch(server, tmp_path, status):
    server.script = ["ok", status]
    o = oracle(server, tmp_path, concurrency=1)
    with pytest.raises(OracleAuthError, match=f"HTTP {status}.*OPENAI_API_KEY"):
        o.judge_batch(ITEMS[:6], POLICY)
    # the answer before the rejection is kept; the rejected call and the rest of the batch are not asked
    assert len(server.requests) == 2 and o.metrics()["oracle/retries"] == 0
    store = VerdictStore(tmp_path / "verdicts.jsonl")
    assert len(store) == 1 and store.failed_lines == 0


def test_a_model_the_server_does_not_have_is_a_configuration_error(server, tmp_path):
    server.script = ["404"]
    o = oracle(server, tmp_path, concurrency=1)
    with pytest.raises(OracleConfigError, match="oracle.model='judge'.*no such model"):
        o.judge_batch(ITEMS[:3], POLICY)
    assert len(server.requests) == 1 and len(VerdictStore(tmp_path / "verdicts.jsonl")) == 0


def test_a_changed_server_temperature_or_max_tokens_asks_again(server, tmp_path):
    o = oracle(server, tmp_path)
    o.judge_batch(ITEMS[:2], POLICY)
    assert len(server.requests) == 2
    # the same server, written differently: the same answers
    same = OpenAIOracle(model="judge", base_url=server.url + "/", cache_path=str(tmp_path / "verdicts.jsonl"),
                        progress=False)
    assert same.judge_batch(ITEMS[:2], POLICY) == EXPECTED[:2] and len(server.requests) == 2
    assert same.fingerprint() == o.fingerprint()
    other_host = server.url.replace("127.0.0.1", "localhost")
    for kw in ({"temperature": 0.5}, {"max_tokens": 128}, {"base_url": other_host}):
        asked = len(server.requests)
        changed = OpenAIOracle(**{"model": "judge", "base_url": server.url, "cache_path": str(tmp_path / "verdicts.jsonl"),
                                  "progress": False, **kw})
        assert changed.judge_batch(ITEMS[:2], POLICY) == EXPECTED[:2]
        assert len(server.requests) - asked == 2, kw
        assert changed.fingerprint() != o.fingerprint()
    assert server.requests[-3]["body"]["max_tokens"] == 128


def test_corrections_are_keyed_by_the_writers_own_temperature(server, tmp_path):
    o = oracle(server, tmp_path, temperature=0.2)
    o.correct_batch(["p"], POLICY)
    assert server.requests[-1]["body"]["temperature"] == 0.7
    oracle(server, tmp_path, temperature=0.5).correct_batch(["p"], POLICY)  # still 0.7: the same answer
    assert len(server.requests) == 1
    oracle(server, tmp_path, temperature=0.9).correct_batch(["p"], POLICY)
    assert len(server.requests) == 2 and server.requests[-1]["body"]["temperature"] == 0.9


def test_pair_mode_failures_are_counted_and_asked_again(server, tmp_path):
    from trace_realign.core.records import PreferencePair
    from trace_realign.oracle.triage import triage

    pairs = [PreferencePair(f"p{i}", "COMPLY w", "l") for i in range(3)]
    server.script = ["500"]
    result = triage(pairs, oracle(server, tmp_path, pair_mode=True, retries=0, concurrency=1), POLICY)
    assert result.excluded == Counter({"oracle_failed": 1}) and len(result.pairs) == 2
    again = oracle(server, tmp_path, pair_mode=True)
    assert not triage(pairs, again, POLICY).excluded and again.metrics()["oracle/calls"] == 1


def test_http_logging_stays_quiet(server, tmp_path):
    import logging

    logging.getLogger("httpx").setLevel(logging.INFO)
    oracle(server, tmp_path).judge_batch(ITEMS[:1], POLICY)
    assert logging.getLogger("httpx").level == logging.WARNING and logging.getLogger("openai").level == logging.WARNING


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
    from trace_realign.core.records import PreferencePair
    from trace_realign.oracle.triage import triage

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
    from trace_realign.core.records import PreferencePair
    from trace_realign.oracle.triage import triage

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
from trace_realign.oracle.llm import OpenAIOracle
from trace_realign.oracle.base import Policy
o = OpenAIOracle(model="judge", base_url=sys.argv[1], cache_path=sys.argv[2], concurrency=4, progress=False)
items = [(f"prompt {i}", "COMPLY" if i % 2 else "no") for i in range(int(sys.argv[3]))]
print(sum(v is True for v in o.judge_batch(items, Policy(name="p", text="t"))), flush=True)
"""


def test_killed_run_resumes_without_asking_twice_or_losing_answers(tmp_path):
    import subprocess
    import sys

    from conftest import kill_after_lines

    from trace_realign.oracle.verdicts import VerdictStore

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


def test_timeouts_are_retried_then_counted_as_failed_and_not_kept(tmp_path):
    server = FakeOpenAI(latency=0.5)
    try:
        o = oracle(server, tmp_path, timeout=0.1, retries=1, concurrency=1)
        assert o.judge_batch(ITEMS[:1], POLICY) == [None]
        m = o.metrics()
        assert m["oracle/retries"] == 1 and m["oracle/calls"] == 2
        assert m["oracle/failed"] == 1 and m["oracle/failed/timeout"] == 1
        assert len(o.store) == 0
    finally:
        server.close()


def test_a_triage_with_failed_calls_counts_them_apart_and_the_next_run_asks_only_them(server, tmp_path):
    from trace_realign.core.records import PreferencePair
    from trace_realign.oracle.triage import triage

    pairs = [PreferencePair(f"p{i}", "COMPLY w" if i % 2 else "w", "l") for i in range(6)]
    server.script = ["500", "429", "ok", "drop"]  # retries=0: three chosen responses fail
    first = oracle(server, tmp_path, retries=0, concurrency=1)
    result = triage(pairs, first, POLICY)
    assert result.excluded == Counter({"oracle_failed": 3}) and len(result.pairs) == 3
    assert first.failure_counts() == Counter({"server_error": 1, "rate_limited": 1, "connection": 1})
    assert len(first.store) == 12 - 3
    again = oracle(server, tmp_path)
    result = triage(pairs, again, POLICY)
    assert not result.excluded and again.metrics()["oracle/calls"] == 3 and again.metrics()["oracle/cached"] == 9


def status_error(status: int, message: str = "error"):
    import httpx
    import openai

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    return openai.APIStatusError(message, response=httpx.Response(status, request=request), body=None)


def test_failure_reasons_by_status_and_what_stops_the_run():
    import httpx
    import openai

    o = OpenAIOracle(model="judge", base_url="http://127.0.0.1:1/v1", progress=False)
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    reasons = {s: o._failure_reason(status_error(s)) for s in (400, 404, 408, 422, 429, 500, 502, 503)}
    assert reasons == {400: "bad_request", 404: "bad_request", 408: "timeout", 422: "bad_request",
                       429: "rate_limited", 500: "server_error", 502: "server_error", 503: "server_error"}
    assert o._failure_reason(openai.APITimeoutError(request=request)) == "timeout"
    assert o._failure_reason(openai.APIConnectionError(request=request)) == "connection"
    with pytest.raises(OracleConfigError, match="no such model"):
        o._failure_reason(status_error(404, "The model `judge` does not exist"))
    for status in (401, 403):
        with pytest.raises(OracleAuthError):
            o._failure_reason(status_error(status))


def test_retry_after_is_honoured_up_to_the_cap_else_a_jittered_exponential_backoff():
    import random
    from types import SimpleNamespace

    o = OpenAIOracle(model="judge", base_url="http://127.0.0.1:1/v1", backoff_base=2.0, backoff_cap=10.0,
                     progress=False)

    def exc(header=None):
        return SimpleNamespace(response=SimpleNamespace(headers={"retry-after": header} if header else {}))

    assert o._delay(1, exc("3")) == 3.0 and o._delay(4, exc("0.5")) == 0.5  # the server's word, any attempt
    assert o._delay(1, exc("120")) == 10.0  # but never past the cap
    random.seed(0)
    for attempt, bound in ((1, 2.0), (3, 8.0), (5, 10.0)):  # base * 2^(attempt-1), capped
        delays = [o._delay(attempt, exc()) for _ in range(300)] + [o._delay(attempt, exc("soon")) for _ in range(300)]
        assert min(delays) >= 0 and max(delays) <= bound and max(delays) > 0.8 * bound, (attempt, max(delays))
        assert len(set(delays)) > 100  # jittered, not one fixed wait


def test_the_same_item_twice_in_a_batch_is_asked_once(server, tmp_path):
    o = oracle(server, tmp_path)
    assert o.judge_batch([ITEMS[0], ITEMS[1], ITEMS[0]], POLICY) == [True, False, True]
    assert len(server.requests) == 2 and o.metrics()["oracle/calls"] == 2
