"""Resumable training: a run killed mid-training and re-run in its folder ends exactly where an
uninterrupted run of the same seed ends; the step stream continues where it stood; a checkpoint holds the
trainable state only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST
from torch.utils.data import DataLoader

from trace_realign.method.datamodule import StepStream
from trace_realign.method.module import TraceModule
from trace_realign.method.objective import ObjectiveConfig
from trace_realign.method.resume import StepCheckpoint, checkpoint_path, resume_point
from trace_realign.method.strategies import trainable_state_dict


def rows(n: int, start: int) -> list[dict]:
    return [{"index": start + i, "first": ([1, 2, 3 + i % 3], [-100, 2, 3 + i % 3]),
             "second": ([1, 4], [-100, 4])} for i in range(n)]


def take(stream: StepStream, n: int, workers: int = 0) -> list[dict]:
    it = iter(DataLoader(stream, batch_size=None, num_workers=workers))
    return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[c][k], y[c][k]) for c in x for k in x[c]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers,start", [(0, 5), (2, 3)])
def test_a_resumed_stream_serves_the_tail_of_the_uninterrupted_one(workers, start):
    data = {"invert": rows(5, 0), "punish": rows(3, 5), "retain": rows(7, 100)}
    sizes = {"invert": 2, "punish": 2, "retain": 3}
    whole = take(StepStream(data, sizes, pad_id=0, seed=1), 12, workers)
    tail = take(StepStream(data, sizes, pad_id=0, seed=1, start=start), 12 - start, workers)
    assert same(whole[start:], tail)
    assert not same(whole[: 12 - start], tail)  # and it is not simply the stream from its beginning


def test_only_an_unfinished_run_resumes_and_a_finished_one_drops_its_checkpoints(tmp_path):
    assert resume_point(tmp_path, finished=False) is None  # nothing saved: a fresh start
    ckpt = checkpoint_path(tmp_path)
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"state")
    assert resume_point(tmp_path, finished=False) == ckpt
    assert resume_point(tmp_path, finished=True) is None and not ckpt.parent.exists()


class FakeTrainer:
    """What StepCheckpoint reads of a trainer; save_checkpoint notes the step it saved."""

    def __init__(self, max_steps: int):
        self.global_step, self.max_steps, self.should_stop, self.is_global_zero = 0, max_steps, False, True
        self.saved: list[int] = []

    def save_checkpoint(self, path: Path, weights_only: bool = False) -> None:
        Path(path).write_text(str(self.global_step))
        self.saved.append(self.global_step)


def test_checkpoints_fall_on_step_boundaries_and_never_once_training_is_over(tmp_path):
    trainer = FakeTrainer(max_steps=9)
    cb = StepCheckpoint(tmp_path / "last.ckpt", every_n_steps=3)
    cb.on_train_start(trainer, None)
    for step in (0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9):  # after each micro-batch, 2 per step
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None)
    # once per step, at its last micro-batch; never at max_steps (Lightning would skip the end hooks)
    assert trainer.saved == [3, 6] and cb.path.read_text() == "6"
    assert [f.name for f in tmp_path.iterdir()] == ["last.ckpt"]  # written beside it, then renamed

    resumed, trainer.saved = StepCheckpoint(tmp_path / "last.ckpt", every_n_steps=3), []
    trainer.global_step = 6
    resumed.on_train_start(trainer, None)
    resumed.on_train_batch_end(trainer, None)  # step 7's first micro-batch: the step resumed from is saved already
    trainer.global_step, trainer.max_steps, trainer.should_stop = 9, 12, True
    StepCheckpoint(tmp_path / "last.ckpt", every_n_steps=3).on_train_batch_end(trainer, None)  # a stop requested
    assert trainer.saved == []


def lora_module(path: Path, seed: int) -> TraceModule:
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    torch.manual_seed(seed)  # LoRA's A matrices start random: two modules differ until one loads the other's
    module = TraceModule(str(path), {"lora": {"enabled": True, "r": 2, "alpha": 4}}, ObjectiveConfig(),
                         optimizer=torch.optim.AdamW)
    module.configure_model()
    return module


def test_a_lora_checkpoint_holds_only_the_trainable_state_and_loads_back(tmp_path):
    saved = lora_module(tmp_path / "base", seed=1)
    saved.weights = torch.tensor([0.5, 1.5])
    saved.first_losses = {"train/first_loss": 0.7}
    checkpoint = {"state_dict": saved.state_dict(), "global_step": 4}
    saved.on_save_checkpoint(checkpoint)
    trainable = {n for n, p in saved.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable | {"weights"}
    assert trainable and all("lora_" in n for n in trainable)
    size = lambda state: sum(v.numel() for v in state.values())  # noqa: E731
    assert size(checkpoint["state_dict"]) < size(saved.state_dict()) / 2  # the frozen base stays out

    # what FSDP1 and FSDP2 gather for a checkpoint: the same keys, never the frozen base
    gathered = trainable_state_dict(saved)
    assert set(gathered) == set(checkpoint["state_dict"])
    assert all(torch.equal(gathered[k], v) for k, v in checkpoint["state_dict"].items())

    loaded = lora_module(tmp_path / "base", seed=2)
    loaded.on_load_checkpoint(checkpoint)
    loaded.load_state_dict(checkpoint["state_dict"], strict=loaded.strict_loading)
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.resumed_from_step == 4 and loaded.first_losses == {"train/first_loss": 0.7}

    # weights for other data are an error naming the file, never used
    loaded._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_conflicts=3), ckpt_path="run/last.ckpt",
                                      world_size=1, global_rank=0)
    with pytest.raises(ValueError, match="run/last.ckpt holds 2 impact weights.*3 weighted pairs"):
        loaded.on_load_checkpoint(checkpoint)
    # and one written by a run of another number of processes (each drew its own batches)
    loaded._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_conflicts=2), ckpt_path="run/last.ckpt",
                                      world_size=2, global_rank=1)
    with pytest.raises(ValueError, match="written by a run of 1 processes, this one has 2"):
        loaded.on_load_checkpoint(checkpoint)
    # a checkpoint holding more (or less) than this run trains is refused
    frozen = next(n for n in saved.state_dict() if n not in trainable and n != "weights")
    with pytest.raises(ValueError, match="does not hold this run's trainable state"):
        loaded.on_load_checkpoint({**checkpoint, "state_dict": {**checkpoint["state_dict"], frozen: torch.zeros(1)}})


# Timings and the resume marker differ by design; the model cache says where M_old came from.
IGNORED = ("seconds", "train/resumed_from_step", "prealign/cached", "prealign/stages_built", "data/cache_hits")
# Selection checks every 2 steps, checkpoints every 3: the checkpoint at step 3 falls between two checks.
STEPS, EVERY = 8, 3


# FSDP2 over two gloo processes: each rank's reference log-probs and generators come back to it, and the
# sharded parameters and optimizer state are restored whole.
STRATEGIES = {"one_process": [], "fsdp2": ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                                           "trainer.precision=32-true"]}


def command(out: Path, strategy: str = "one_process") -> list[str]:
    exe = Path(sys.executable).parent / "trace-realign"
    return [str(exe), *FAST, *STRATEGIES[strategy], "select.enabled=true", "select.every_n_steps=2", "select.prompts=8",
            f"trainer.max_steps={STEPS}", f"checkpoint.every_n_steps={EVERY}", "eval.max_new_tokens=8",
            # evaluation after training only, without lm-eval and attacks: it reads the result, and costs
            # each of the three processes seconds (the "before" one is deterministic and simply re-runs)
            "eval.before=false", "eval.evaluators.capability=null", "eval.evaluators.asr=null",
            # one torch thread: on a busy machine two threads that wait on each other run many times slower
            "threads=1",
            f"hydra.run.dir={out}"]


def results(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not any(word in k for word in IGNORED)}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, strategy, cache_dir):
    env = {**os.environ, "TRACE_CACHE_DIR": str(cache_dir)}
    whole = subprocess.run(command(tmp_path / "whole", strategy), capture_output=True, text=True, timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert not (tmp_path / "whole" / "checkpoints").exists()  # a finished run keeps no checkpoints

    out = tmp_path / "killed"
    # a new session: the kill takes every process of the run (a launched rank dies with its launcher)
    proc = subprocess.Popen(command(out, strategy), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    ckpt, deadline = checkpoint_path(out), time.time() + 300
    while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file() and not (out / "metrics.json").exists(), "the run was not killed in mid-training"
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step < STEPS and step % EVERY == 0

    again = subprocess.run(command(out, strategy), capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {step}" in again.stdout + again.stderr
    assert json.loads((out / "metrics.json").read_text())["train/resumed_from_step"] == step
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["train/resumed_from_step"] == 0
    # exact float equality: the same computations in the same order, only split over two processes
    assert results(out) == results(tmp_path / "whole")
    assert results(out)["select/checks"] == STEPS // 2 + 1
    for name in ("generations.jsonl", "data/impact.jsonl", "adapter/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not ckpt.parent.exists()
