"""The verdict store survives kills: no finished answer is lost, asked again or counted twice."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import kill_after_lines
from trace_realign.verdicts import VerdictStore, verdict_key


def key(i: int, policy: str = "policy v1", template: str = "t1") -> str:
    return verdict_key("gpt-4o", policy, f"prompt {i}", f"response {i}", template)


def test_keys_change_with_everything_that_decides_an_answer():
    base = key(1)
    assert key(1) == base
    assert key(2) != base and key(1, policy="policy v2") != base and key(1, template="t2") != base
    assert verdict_key("gpt-4o-mini", "policy v1", "prompt 1", "response 1", "t1") != base


def test_put_get_reload_and_no_duplicates(tmp_path):
    path = tmp_path / "verdicts.jsonl"
    with VerdictStore(path) as store:
        assert store.put(key(1), {"compliant": True, "rationale": "ok"})
        assert not store.put(key(1), {"compliant": False})  # already paid for: never overwritten
        store.put(key(2), {"compliant": None, "failed": "unparseable"})
    with VerdictStore(path) as again:
        assert len(again) == 2 and again.get(key(1))["compliant"] is True
        assert again.get(key(2))["failed"] == "unparseable"
    assert len(path.read_text().splitlines()) == 2


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
from trace_realign.verdicts import VerdictStore, verdict_key
store = VerdictStore(sys.argv[1])
for i in range(int(sys.argv[2])):
    k = verdict_key("m", "p", f"prompt {i}", "r", "t")
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
