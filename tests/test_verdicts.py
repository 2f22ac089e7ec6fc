"""The verdict store survives kills: no finished answer is lost, asked again or counted twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import kill_after_lines

from trace_realign.oracle.verdicts import VerdictStore, server_id, verdict_key

SAMPLING = {"temperature": 0.0, "max_tokens": 256}


def key(i: int, policy: str = "policy v1", template: str = "t1", server: str = "api.openai.com", **sampling) -> str:
    return verdict_key("gpt-4o", policy, f"prompt {i}", f"response {i}", template, server=server,
                       sampling={**SAMPLING, **sampling})


def test_keys_change_with_everything_that_decides_an_answer():
    base = key(1)
    assert key(1) == base
    assert key(2) != base and key(1, policy="policy v2") != base and key(1, template="t2") != base
    assert verdict_key("gpt-4o-mini", "policy v1", "prompt 1", "response 1", "t1", server="api.openai.com",
                       sampling=SAMPLING) != base
    assert key(1, server="localhost:8000/v1") != base
    assert key(1, temperature=0.7) != base and key(1, max_tokens=128) != base
    assert key(1, top_p=0.9) != base  # any sampling setting the request carries


@pytest.mark.parametrize("url,expected", [
    (None, "api.openai.com"),
    ("https://api.openai.com/v1", "api.openai.com"),
    ("http://localhost:8000/v1/", "localhost:8000/v1"),
    ("HTTP://LocalHost:8000/v1", "localhost:8000/v1"),
    ("https://localhost:8000/v1", "localhost:8000/v1"),
    ("localhost:11434/v1", "localhost:11434/v1"),
    ("http://gpu-box:8000/v1", "gpu-box:8000/v1"),
])
def test_server_id_is_host_port_and_path(url, expected):
    assert server_id(url) == expected


def test_put_get_reload_and_no_duplicates(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    with VerdictStore(path) as store:
        assert store.put(key(1), {"compliant": True, "rationale": "ok"})
        assert not store.put(key(1), {"compliant": False})  # already paid for: never overwritten
        store.put(key(2), {"compliant": False})
    with VerdictStore(path) as again:
        assert len(again) == 2 and again.get(key(1))["compliant"] is True
        assert again.get(key(2))["compliant"] is False
    assert len(path.read_text().splitlines()) == 2


def test_a_key_stored_twice_keeps_its_first_answer_and_counts_the_other(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    rows = [{"key": key(1), "compliant": True, "n": 1}, {"key": key(2), "compliant": False},
            {"key": key(1), "compliant": False, "n": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with VerdictStore(path) as store:
        assert len(store) == 2 and store.duplicate_lines == 1 and store.torn_lines == 0
        assert store.get(key(1)) == rows[0]  # the first answer paid for is the one that stands
        assert not store.put(key(1), {"compliant": False})
    assert len(path.read_text().splitlines()) == 3  # nothing appended


def test_failures_are_never_stored_and_old_failed_rows_are_asked_again(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    with VerdictStore(path) as store:
        with pytest.raises(ValueError, match="never stored"):
            store.put(key(1), {"failed": "timeout"})
        assert len(store) == 0
    assert path.read_text() == ""
    # a store written by an older version, holding failures next to answers
    rows = [{"key": key(1), "compliant": None, "failed": "gave up"}, {"key": key(2), "compliant": True},
            {"key": key(3), "compliant": None, "failed": "unreadable reply"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with VerdictStore(path) as store:
        assert store.failed_lines == 2 and len(store) == 1 and key(1) not in store and key(3) not in store
        assert store.put(key(1), {"compliant": False})  # answered now: stored after the old failure
    with VerdictStore(path) as store:
        assert store.failed_lines == 2 and store.duplicate_lines == 0
        assert store.get(key(1))["compliant"] is False and len(store) == 2


def test_torn_last_line_is_dropped_and_counted(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    with VerdictStore(path) as store:
        store.put(key(1), {"compliant": True})
    with path.open("a") as fh:
        fh.write('{"key": "abc", "compl')  # killed mid-write
    with VerdictStore(path) as store:
        assert store.torn_lines == 1 and len(store) == 1
        store.put(key(2), {"compliant": False})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in rows] == [key(1), key(2)]


WRITER = """
import sys, time
from trace_realign.oracle.verdicts import VerdictStore, verdict_key
store = VerdictStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    k = verdict_key("m", "p", f"prompt {i}", "r", "t", server="s", sampling={})
    if k in store:
        continue  # resumed: already answered
    time.sleep(0.002)  # the paid call
    store.put(k, {"compliant": i % 2 == 0, "i": i})
print("done", flush=True)
"""


def test_sigkill_then_resume_loses_nothing_and_repeats_nothing(tmp_path):
    path, n = tmp_path / "verdicts.jsonl", 400
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n)])
    kill_after_lines(proc, path, 50, timeout=20)
    answered_before = len(VerdictStore(path))
    assert 0 < answered_before < n, "killed part-way"
    res = subprocess.run([sys.executable, "-c", WRITER, str(path), str(n)], capture_output=True, text=True)
    assert res.returncode == 0 and "done" in res.stdout
    store = VerdictStore(path)
    assert len(store) == n and store.duplicate_lines == 0
    assert sorted(r["i"] for r in store) == list(range(n))
