"""The console of a run carries the project's own lines: progress bars, stage lines, the summary and the
verdict. Library chatter goes to the run's log file, and a user's error is its message alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST

# a library's log line: [time][logger][LEVEL] from a logger outside trace_realign
LIBRARY_LINE = re.compile(r"\]\[(?!trace_realign)[\w.]+\]\[(DEBUG|INFO|WARNING)\]")
NOISE = ("Traceback", "warn", "Warn", "fatal:", "GPU available", "Running generate_until", "Epoch 0/", "HTTP Request")


def app(name: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / name
    full = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | env
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=600)


def noise(console: str) -> list[str]:
    return [line for line in console.splitlines() if LIBRARY_LINE.search(line) or any(n in line for n in NOISE)]


@pytest.mark.slow
def test_a_default_run_prints_the_projects_lines_and_logs_the_libraries(tmp_path):
    # the default's evaluators (lm-eval's capability among them) and its training bar, with few steps
    fast = [o for o in FAST if o != "trainer.enable_progress_bar=false"]
    res = app("trace-realign", *fast, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    console = res.stdout + res.stderr
    assert not noise(console), noise(console)
    assert "verdict:" in console and "trace-realign: outputs in" in console
    # written to a pipe (a log, CI): no training bar, whose live display would redraw for nobody
    assert not re.search(r"train .*2/2", console)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "GPU available" in log  # Lightning's lines are kept, in the run's log file
    assert "not a git repository" not in console


@pytest.mark.slow
def test_trace_data_with_a_language_model_oracle_prints_no_request_lines(tmp_path):
    from fake_openai import FakeOpenAI

    server = FakeOpenAI()
    try:
        res = app("trace-data", *FAST, "oracle=openai", f"oracle.base_url={server.url}",
                  f"oracle.cache_path={tmp_path / 'verdicts.jsonl'}", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path, OPENAI_API_KEY="sk-planted-" + "7" * 32)
    finally:
        server.close()
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(server.requests) > 20
    assert not noise(res.stdout + res.stderr), noise(res.stdout + res.stderr)


@pytest.mark.slow
def test_a_users_error_is_its_message_alone_and_hydra_full_error_shows_the_traceback(tmp_path):
    args = [*FAST, "dataset.policy_new=pi_old"]  # pi_new = pi_old: nothing to re-align
    res = app("trace-realign", *args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]  # after the stages' bars, the message
    assert last.startswith("trace-realign: error: ") and "Traceback" not in res.stderr + res.stdout
    assert f"traceback in {tmp_path / 'a' / 'FAILED'}" in res.stderr
    assert "Traceback" in (tmp_path / "a" / "FAILED").read_text()
    full = app("trace-realign", *args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path, HYDRA_FULL_ERROR="1")
    assert full.returncode == 1 and "Traceback" in full.stderr and "NoConflictsError" in full.stderr


def test_progress_bars_are_drawn_on_a_terminal_and_never_into_a_log(capsys):
    from tqdm import tqdm

    from trace_realign.core.progress import bar_off

    # stderr is captured here, as in a log file: a bar the caller wants stays off, and so does an unwanted one
    for wanted in (True, False):
        for _ in tqdm(range(3), desc="bar-under-test", disable=bar_off(wanted)):
            pass
    assert "bar-under-test" not in capsys.readouterr().err
    assert bar_off(True) is None and bar_off(False) is True  # None: tqdm asks the stream whether it is a terminal


@pytest.mark.slow
def test_the_training_bar_is_drawn_on_a_terminal_and_counts_steps(tmp_path):
    import pty
    import select

    master, slave = pty.openpty()
    fast = [o for o in FAST if o != "trainer.enable_progress_bar=false"]
    exe = Path(sys.executable).parent / "trace-realign"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"COLUMNS": "120"}
    proc = subprocess.Popen([str(exe), *fast, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    assert proc.wait(timeout=600) == 0
    os.close(master)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))
    assert re.search(r"train .*2/2", screen), screen[-2000:]  # the bar counts steps, not "Epoch 0/-2"
