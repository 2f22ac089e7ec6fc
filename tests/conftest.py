"""Shared fixtures: the real configs composed as the app composes them, small enough for a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Under pytest-xdist (`-n auto`: one worker a core) each worker, and every run it launches, takes one torch
# thread: workers whose threads fight over the cores run many times slower than they would alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A run the tests launch that dies of a signal (a segfault in a collective, say) prints its Python stack, and
# every rank of a distributed run inherits this: the failure names where each process was.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

# A few steps on a few pairs: what every end-to-end test runs unless it says otherwise.
FAST = [
    "trainer.max_steps=2",
    "dataset.pairs_per_axis=8",
    "dataset.test_prompts_per_axis=2",
    "dataset.utility_in_data=4",
    "dataset.utility_eval=2",
    "model.prealign.stages.pretrain.steps=2",
    "model.prealign.stages.sft.steps=3",
    "model.prealign.stages.dpo.steps=2",
    "impact.gold_batch_size=6",
    "data.batch_size.invert=2",
    "data.batch_size.punish=2",
    "data.batch_size.retain=2",
    "eval.max_new_tokens=4",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "select.enabled=false",
]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    """One model cache per test session, never the user's."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["TRACE_CACHE_DIR"] = str(path)
    return path


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The config an app sees: composed, and its ablation applied to the method (as the apps do first)."""
    from trace_realign.method.ablation import ablate

    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return ablate(compose(config_name="train", overrides=list(overrides) + extra))


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_cfg((FAST if fast else []) + list(overrides), tmp_path / "run")

    return make


def kill_after_lines(proc, path: Path, lines: int, timeout: float = 30.0) -> None:
    """SIGKILL `proc` once `path` holds `lines` lines (or after `timeout`): a kill in mid-run."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and (not path.exists() or len(path.read_text().splitlines()) < lines):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
